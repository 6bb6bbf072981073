"""DeCoProjector: a drop-in for LLaVA's mlp2x_gelu projector after DeCo's adaptive pooling."""

import pytest
import torch
from torch import nn

import deco_ops
from harness import DEVICE, assert_close, randn


class AvgPoolProjector(nn.Module):
    """The DeCo paper's published projector (arXiv 2405.20985), written out in plain PyTorch."""

    def __init__(self, query_num=144, mm_hidden_size=64, llm_hidden_size=96):
        super().__init__()
        hw = int(query_num**0.5)
        self.sampler = nn.AdaptiveAvgPool2d((hw, hw))
        self.mlp_projector = nn.Sequential(nn.Linear(mm_hidden_size, llm_hidden_size), nn.GELU(), nn.Linear(llm_hidden_size, llm_hidden_size))

    def forward(self, x):
        b, n, d = x.shape
        hw = int(n**0.5)
        img = x.transpose(1, 2).reshape(b, d, hw, hw)
        return self.mlp_projector(self.sampler(img).flatten(2).transpose(1, 2))


def llava_mlp2x_gelu(c, h):
    return nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))


def test_loads_llava_mm_projector_state_dict(backend):
    torch.manual_seed(0)
    llava = llava_mlp2x_gelu(40, 56)
    proj = deco_ops.DeCoProjector(40, 56, grid=(8, 8), out_grid=(4, 4))
    proj.load_state_dict(llava.state_dict())
    assert set(proj.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(3, 64, 40, requires_grad=True)
    y = proj(x)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x.transpose(1, 2).reshape(3, 40, 8, 8), (4, 4)).flatten(2).transpose(1, 2)
    assert_close(y, llava(pooled), torch.float32)
    # and the other way round: our state_dict loads into LLaVA's Sequential
    llava.load_state_dict(proj.state_dict())


def test_matches_deco_paper_projector_forward_and_grads(backend):
    torch.manual_seed(1)
    paper = AvgPoolProjector(144, 64, 96).double()
    proj = deco_ops.DeCoProjector(64, 96)  # the defaults: the paper's 24x24 -> 12x12 grids (576 -> 144 tokens)
    proj.load_state_dict(paper.state_dict())
    x = torch.randn(1, 576, 64)
    x_ours, x_ref = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y = proj(x_ours)
    ref = paper(x_ref)
    assert_close(y, ref, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    assert_close(x_ours.grad, x_ref.grad, torch.float32, "grad x")
    assert_close(proj.fc1.weight.grad, paper.mlp_projector[0].weight.grad, torch.float32, "grad w1")
    assert_close(proj.fc2.bias.grad, paper.mlp_projector[2].bias.grad, torch.float32, "grad b2")


@pytest.mark.parametrize("prefix", [1, 5])  # a CLS token; CLS and four registers (DINOv2-reg, SigLIP2-style towers)
def test_prefix_tokens_are_dropped(backend, prefix):
    proj = deco_ops.DeCoProjector(16, 24, grid=(4, 4), out_grid=(2, 2), num_prefix_tokens=prefix)
    x = torch.randn(2, prefix + 16, 16)
    x_nan_prefix = x.clone()
    x_nan_prefix[:, :prefix] = float("nan")
    y = proj(x)
    assert torch.equal(proj(x_nan_prefix), y)
    assert torch.equal(y, deco_ops.pool_mlp(x[:, prefix:], proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc2.bias,
                                            grid=(4, 4), out_grid=(2, 2)))


@pytest.mark.parametrize("mode", ["average", "bilinear"])
def test_project_then_pool_takes_the_mode(backend, mode):
    """order="mlp_pool" pools the projected tokens with the module's mode (bilinear: LLaVA-OneVision's
    interpolation), as deco_ops.mlp_pool does."""
    proj = deco_ops.DeCoProjector(8, 8, grid=(4, 4), out_grid=(3, 3), order="mlp_pool", mode=mode)
    x = torch.randn(1, 16, 8)
    expected = deco_ops.mlp_pool(x, proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc2.bias, grid=(4, 4),
                                 out_grid=(3, 3), mode=mode)
    assert torch.equal(proj(x), expected)


def test_per_call_grid(backend):
    proj = deco_ops.DeCoProjector(16, 24, grid=(4, 4), out_grid=(2, 2))
    x = torch.randn(2, 6 * 5, 16)
    y = proj(x, grid=(6, 5), out_grid=(3, 2))
    expected = deco_ops.pool_mlp(x, proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc2.bias, grid=(6, 5), out_grid=(3, 2))
    assert torch.equal(y, expected)


def test_hidden_features_and_activation():
    proj = deco_ops.DeCoProjector(16, 24, hidden_features=40, activation="silu", bias=False, grid=(4, 4), out_grid=(2, 2))
    assert proj.fc1.weight.shape == (40, 16) and proj.fc2.weight.shape == (24, 40)
    assert proj.fc1.bias is None and proj.fc2.bias is None  # bias=False: neither Linear has one
    assert "silu" in repr(proj)


def test_torch_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(2)
    proj = deco_ops.DeCoProjector(32, 48, grid=(6, 6), out_grid=(3, 3), num_prefix_tokens=1)
    x = torch.randn(2, 37, 32)
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = proj(xe), compiled(xc)
    assert torch.equal(ye, yc)
    dy = torch.randn_like(ye)
    (ge,) = torch.autograd.grad(ye, xe, dy)
    (gc,) = torch.autograd.grad(yc, xc, dy)
    assert torch.equal(ge, gc)
    explanation = torch._dynamo.explain(proj)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_features": 0}, "in_features"),
        ({"hidden_features": -1}, "hidden_features"),
        ({"grid": (24,)}, "grid must have 2"),
        ({"out_grid": (12, 12, 1)}, "as many entries"),
        ({"activation": "relu"}, "activation"),
        ({"num_prefix_tokens": -1}, "num_prefix_tokens"),
    ],
)
def test_bad_construction(kwargs, match):
    args = {"in_features": 8, "out_features": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        deco_ops.DeCoProjector(args.pop("in_features"), args.pop("out_features"), **args)


@pytest.mark.parametrize("make", [
    lambda dtype: deco_ops.DeCoProjector(8, 8, dtype=dtype),
    # separate k/v projections and bias_k/bias_v: every parameter MHA can have
    lambda dtype: deco_ops.CrossAttention(8, 2, add_bias_kv=True, kdim=6, vdim=4, dtype=dtype),
    lambda dtype: deco_ops.QueryResampler(4, 8, 6, 2, dtype=dtype), lambda dtype: deco_ops.PatchMergerProjector(8, 8, dtype=dtype)],
    ids=["DeCoProjector", "CrossAttention", "QueryResampler", "PatchMergerProjector"])
def test_every_module_names_a_dtype_its_parameters_cannot_have(make):
    """An integer or bool dtype raises TypeError naming dtype (not torch's RuntimeError about
    gradients of integer tensors); float64 builds, for the PyTorch path."""
    for dtype in (torch.int32, torch.bool, "float32"):
        with pytest.raises(TypeError, match=r"dtype must be None or one of float16, bfloat16, float32, float64, got"):
            make(dtype)
    assert {p.dtype for p in make(torch.float64).parameters()} == {torch.float64}


@pytest.mark.parametrize("order,mode", [("pool_mlp", "average"), ("pool_mlp", "bilinear"), ("mlp_pool", "average")])
def test_wrong_input_width_names_x_and_in_features(order, mode):
    """Not the op's w1, which the caller never passed."""
    proj = deco_ops.DeCoProjector(8, 4, grid=(4, 4), out_grid=(2, 2), order=order, mode=mode, num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"x has 7 features \(x.shape\[-1\]\) but this DeCoProjector takes in_features = 8"):
        proj(torch.randn(2, 17, 7))


def test_wrong_token_count_names_prefix():
    proj = deco_ops.DeCoProjector(8, 8, grid=(4, 4), out_grid=(2, 2))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        proj(torch.randn(1, 17, 8))


LAYER_FORMATS = {
    "llava": ("0.", "2."),
    "hf": ("linear_1.", "linear_2."),
    "deco": ("mlp_projector.0.", "mlp_projector.2."),
}


@pytest.mark.parametrize("fmt", sorted(LAYER_FORMATS))
@pytest.mark.parametrize("outer", ["", *deco_ops.modules.PROJECTOR_PREFIXES])
def test_loads_every_checkpoint_format_and_prefix(fmt, outer):
    torch.manual_seed(3)
    first, second = LAYER_FORMATS[fmt]
    weights = {"0.weight": torch.randn(12, 8), "0.bias": torch.randn(12), "2.weight": torch.randn(10, 12), "2.bias": torch.randn(10)}
    names = {"0.": first, "2.": second}
    checkpoint = {outer + names[k[:2]] + k[2:]: v for k, v in weights.items()}
    checkpoint["model.language_model.layers.0.weight"] = torch.randn(3)  # the rest of a whole-model checkpoint
    checkpoint[outer + first + "weight_scale"] = torch.randn(1)  # not a parameter of ours: reported under its own name
    proj = deco_ops.DeCoProjector(8, 10, hidden_features=12, grid=(2, 2), out_grid=(1, 1))
    result = proj.load_state_dict(checkpoint, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == sorted(
        ["model.language_model.layers.0.weight", outer + first + "weight_scale"])
    for key, value in weights.items():
        assert torch.equal(proj.state_dict()[key], value), key


def test_loads_hf_keys_as_a_submodule_and_strict():
    """Inside a parent model the prefix comes from the parent; strict loading of a projector-only dict works."""
    parent = nn.Module()
    parent.multi_modal_projector = deco_ops.DeCoProjector(8, 10, grid=(2, 2), out_grid=(1, 1))
    hf = nn.Module()
    hf.linear_1, hf.linear_2 = nn.Linear(8, 10), nn.Linear(10, 10)
    parent.load_state_dict({f"multi_modal_projector.{k}": v for k, v in hf.state_dict().items()})
    assert torch.equal(parent.multi_modal_projector.fc2.weight, hf.linear_2.weight)


def test_load_without_any_projector_key_follows_strict():
    """strict=False: nothing raised, every parameter in missing_keys, the weights untouched; strict:
    RuntimeError listing them (as any nn.Module)."""
    proj = deco_ops.DeCoProjector(8, 10, grid=(2, 2), out_grid=(1, 1))
    before = {k: v.clone() for k, v in proj.state_dict().items()}
    unrelated = {"vision_tower.0.weight": torch.randn(10, 8), "linear_3.weight": torch.randn(10, 10)}
    result = proj.load_state_dict(unrelated, strict=False)
    assert sorted(result.missing_keys) == sorted(before) and sorted(result.unexpected_keys) == sorted(unrelated)
    assert all(torch.equal(proj.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*0\.weight"):
        proj.load_state_dict(unrelated)
    assert all(torch.equal(proj.state_dict()[k], v) for k, v in before.items())


def test_a_module_pickled_before_keys_existed_still_runs_and_loads():
    """``torch.save(module)`` of a DeCoProjector from before ``keys``: no ``keys`` attribute, and its
    load pre-hook the bare function (LLaVA's names, the default layout)."""
    import io

    proj = deco_ops.DeCoProjector(8, 10, grid=(2, 2), out_grid=(1, 1))
    del proj.keys
    proj._load_state_dict_pre_hooks.clear()
    proj._register_load_state_dict_pre_hook(deco_ops.DeCoProjector._rename_projector_keys)
    buffer = io.BytesIO()
    torch.save(proj, buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)
    fc1, fc2 = nn.Linear(8, 10), nn.Linear(10, 10)
    old.load_state_dict({"linear_1.weight": fc1.weight, "linear_1.bias": fc1.bias,
                         "linear_2.weight": fc2.weight, "linear_2.bias": fc2.bias})
    assert torch.equal(old.fc1.weight, fc1.weight) and old(torch.randn(1, 4, 8)).shape == (1, 1, 10)


def test_two_formats_for_one_parameter_raise():
    proj = deco_ops.DeCoProjector(8, 10, grid=(2, 2), out_grid=(1, 1))
    sd = dict(proj.state_dict())
    sd["linear_1.weight"] = torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="name the projector's '0.weight'"):
        proj.load_state_dict(sd)


@pytest.mark.parametrize("hf_name,ours", sorted(deco_ops.modules.HF_ACTIVATIONS.items()))
def test_hf_activation_names(hf_name, ours):
    assert deco_ops.DeCoProjector(8, 8, grid=(2, 2), out_grid=(1, 1), activation=hf_name).activation == ours


def _grids():
    return torch.tensor([[4, 4], [2, 4]], device=DEVICE), torch.tensor([[2, 2], [1, 2]], device=DEVICE)


_IN_PLACE_CASES = {
    "pool_mlp": lambda x, xp, w: deco_ops.pool_mlp(x, *w, grid=(4, 4), out_grid=(2, 2)),
    "pool_linear": lambda x, xp, w: deco_ops.pool_linear(x, *w[:2], grid=(4, 4), out_grid=(2, 2)),
    "mlp_pool": lambda x, xp, w: deco_ops.mlp_pool(x, *w, grid=(4, 4), out_grid=(2, 2)),
    "adaptive_avg_pool_tokens": lambda x, xp, w: deco_ops.adaptive_avg_pool_tokens(x, (4, 4), (2, 2)),
    "bilinear_pool_tokens": lambda x, xp, w: deco_ops.bilinear_pool_tokens(x, (4, 4), (3, 3)),
    "merge_mlp": lambda x, xp, w: deco_ops.merge_mlp(x, None, None, torch.ones(6, 32, device=DEVICE), None, w[2], w[3]),
    "merge_mlp 2D": lambda x, xp, w: deco_ops.merge_mlp(x[0], None, None, torch.ones(6, 32, device=DEVICE), None, w[2], w[3]),
    "pool_mlp_packed": lambda x, xp, w: deco_ops.pool_mlp_packed(xp, _grids()[0], *w, out_grids=_grids()[1])[0],
    "bilinear_pool_tokens_packed": lambda x, xp, w: deco_ops.bilinear_pool_tokens_packed(xp, _grids()[0], out_grids=_grids()[1])[0],
    "merge_mlp_packed": lambda x, xp, w: deco_ops.merge_mlp_packed(xp, _grids()[0], None, None, torch.ones(6, 32, device=DEVICE), None, w[2], w[3])[0],
    "cross_attention weights": lambda x, xp, w: deco_ops.cross_attention(
        x.view(2, 4, 4, 8)[:, :3], x.view(2, 4, 4, 8), x.view(2, 4, 4, 8), need_weights=True)[1],
}


@pytest.mark.parametrize("op", list(_IN_PLACE_CASES))
def test_outputs_may_be_changed_in_place_as_eager_ones(op, backend):
    """What an op returns can be changed in place before backward, as the eager code it replaces
    allows (``y = projector(x); y += pos_embed``): autograd refuses that for a view that a Function
    of several outputs returns, and the ops' bodies return their GEMM rows as such views. The
    gradients are those of the unchanged call (adding a constant)."""
    g = torch.Generator().manual_seed(4)
    x, xp = randn(2, 16, 8, generator=g), randn(24, 8, generator=g)
    weights = [randn(*shape, generator=g) for shape in ((6, 8), (6,), (5, 6), (5,))]
    grads = []
    for in_place in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, xp, *weights)]
        y = _IN_PLACE_CASES[op](leaves[0], leaves[1], leaves[2:])
        if in_place:
            y += 1.0
        y.sum().backward()
        grads.append([t.grad for t in leaves])
    for plain, changed in zip(*grads):
        assert (plain is None) == (changed is None) and (plain is None or torch.equal(plain, changed))
