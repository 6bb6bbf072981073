"""PatchMergerProjector against the Hugging Face modules it replaces (transformers' own code, tiny
random-init configs): Qwen2-VL PatchMerger, Qwen2.5-VL's, Qwen3-VL's (pre and post-shuffle norm)
and InternVL's pixel_shuffle + multi_modal_projector; forward, backward, state_dicts, memory, and the
merge size from_hf reads from the module, the HF config or model, or merge_size=."""

import pytest
import torch

import deco_ops
from harness import DTYPES, assert_close, guarded, saved_bytes

qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
qwen2_5_vl = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
qwen3_omni = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
from transformers import (  # noqa: E402
    InternVLConfig, Qwen2_5_VLConfig, Qwen3OmniMoeConfig, Qwen3OmniMoeVisionEncoderConfig, Qwen3VLVisionConfig)

C, D = 16, 24


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (norm weights away from 1, biases away from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5) + (1.0 if p.dim() == 1 else 0.0))
    return module


def qwen3_config(c: int = C, d: int = D, merge: int = 2):
    return Qwen3VLVisionConfig(hidden_size=c, spatial_merge_size=merge, out_hidden_size=d, depth=1, num_heads=2,
                               intermediate_size=32, deepstack_visual_indexes=[0])


def qwen3_merger(post: bool, c: int = C, d: int = D, merge: int = 2):
    return qwen3_vl.Qwen3VLVisionPatchMerger(qwen3_config(c, d, merge), use_postshuffle_norm=post)


def qwen3_omni_config(c: int = C, d: int = D, merge: int = 2):
    return Qwen3OmniMoeVisionEncoderConfig(hidden_size=c, spatial_merge_size=merge, out_hidden_size=d, depth=1, num_heads=2,
                                           intermediate_size=32)


def internvl_config(c: int = C, d: int = D, ratio: float = 0.5):
    return InternVLConfig(
        vision_config={"hidden_size": c, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
        text_config={"model_type": "qwen2", "hidden_size": d, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 32, "vocab_size": 64},
        downsample_ratio=ratio, projector_hidden_act="gelu")


def internvl_projector(c: int = C, d: int = D, ratio: float = 0.5):
    return internvl.InternVLMultiModalProjector(internvl_config(c, d, ratio))


def internvl_stage(projector, x, grid, ratio=0.5):
    """What InternVL runs on (B, N, C) vision tokens: reshape to the grid, pixel_shuffle, project."""
    B = x.shape[0]
    feats = internvl.InternVLModel.pixel_shuffle(None, x.reshape(B, *grid, x.shape[-1]), scale_factor=ratio)
    return projector(feats.reshape(B, -1, feats.shape[-1]))


def _hf_class(model: str, name: str):
    """A class of transformers' ``models.<model>``, the test skipped where this version has none."""
    return getattr(pytest.importorskip(f"transformers.models.{model}.modeling_{model}"), name)


MODULES = {
    "qwen2_vl": lambda: qwen2_vl.PatchMerger(D, C),
    "qwen2_5_vl": lambda: qwen2_5_vl.Qwen2_5_VLPatchMerger(D, C),
    # Qwen2-VL's module names with an RMSNorm of their own class each
    "qwen2_5_omni": lambda: _hf_class("qwen2_5_omni", "Qwen2_5OmniPatchMerger")(D, C),
    "exaone4_5": lambda: _hf_class("exaone4_5", "Exaone4_5_PatchMerger")(D, C),
    "qwen3_vl": lambda: qwen3_merger(False),
    "qwen3_vl_postshuffle": lambda: qwen3_merger(True),
    # Qwen3-Omni's mergers: Qwen2-VL's module names, Qwen3-VL's use_postshuffle_norm
    "qwen3_omni": lambda: qwen3_omni.Qwen3OmniMoeVisionPatchMerger(qwen3_omni_config(), use_postshuffle_norm=False),
    "qwen3_omni_postshuffle": lambda: qwen3_omni.Qwen3OmniMoeVisionPatchMerger(qwen3_omni_config(), use_postshuffle_norm=True),
    "internvl": internvl_projector,
}
# the HF config from_hf needs where the module's weights hold only merge_size**2 * C
CONFIGS = {"qwen3_vl_postshuffle": qwen3_config, "qwen3_omni_postshuffle": qwen3_omni_config, "internvl": internvl_config}


def from_hf(hf, name):
    return deco_ops.PatchMergerProjector.from_hf(hf, config=CONFIGS[name]() if name in CONFIGS else None)


def _tokens(name, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 24, C) if name == "internvl" else (48, C)  # InternVL: a 4x6 grid; Qwen: 12 merge blocks
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.5).to(dtype)


def _run(module, name, x):
    return internvl_stage(module, x, (4, 6)) if name == "internvl" else module(x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODULES))
def test_matches_hf_forward_and_backward(name, dtype):
    hf = _init(MODULES[name](), seed=len(name))
    hf64 = _init(MODULES[name](), seed=len(name)).double()
    ours = from_hf(hf.to(dtype), name)
    x = _tokens(name, dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    with deco_ops.use_backend("triton"):
        y = ours(xs[0], grid=(4, 6)) if name == "internvl" else ours(xs[0])
        dy = torch.randn_like(y)
        y.backward(dy)
    ref = _run(hf64, name, xs[1].double())
    ref.backward(dy.double())
    eager = _run(hf, name, xs[2])
    eager.backward(dy)
    assert_close(y, ref, dtype, "y", eager=eager)
    assert_close(xs[0].grad, xs[1].grad, dtype, "grad x", eager=xs[2].grad)
    theirs, theirs64 = dict(hf.named_parameters()), dict(hf64.named_parameters())
    for key, p in ours.named_parameters():
        assert_close(p.grad, theirs64[key].grad, dtype, f"grad {key}", eager=theirs[key].grad)


def test_state_dicts_load_unchanged_both_ways():
    for name, make in MODULES.items():
        hf = _init(make(), seed=3)
        ours = from_hf(hf, name)
        assert list(ours.state_dict()) == list(hf.state_dict()), name
        fresh = _init(make(), seed=4)
        fresh.load_state_dict(ours.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), hf.state_dict().values())), name


@pytest.mark.parametrize("keys", list(deco_ops.merge_modules.KEY_LAYOUTS))
def test_forward_runs_the_submodules_registered_now(keys):
    """forward finds its norm and Linears through the registered modules (not get_submodule, which
    costs Python calls per level): a submodule replaced after construction is the one that runs."""
    torch.manual_seed(0)
    ours = deco_ops.PatchMergerProjector(C, D, keys=keys)
    paths = deco_ops.merge_modules.KEY_LAYOUTS[keys]
    assert [ours.norm_layer, ours.fc1, ours.fc2] == [ours.get_submodule(path) for path in paths]
    ours.set_submodule(paths[2], _init(torch.nn.Linear(4 * C, D), seed=7))
    x = torch.randn(8, C)
    norm, fc1, fc2 = (ours.get_submodule(path) for path in paths)
    want = deco_ops.merge_mlp(x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    assert torch.equal(ours(x), want)
    batched = x.view(2, 4, C)  # block order takes a batch too: no grid, whatever the token count
    assert torch.equal(ours(batched), deco_ops.merge_mlp(batched, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias))


class _InternVLChat(torch.nn.Module):
    """The original InternVL chat model's projector: ``mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)``."""

    def __init__(self):
        super().__init__()
        self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(4 * C), torch.nn.Linear(4 * C, D), torch.nn.GELU(), torch.nn.Linear(D, D))


def test_loads_other_layouts_and_original_internvl_mlp1_keys():
    """An InternVL-configured projector loads the original checkpoints' mlp1 keys where the
    projector replaces mlp1 in the model (``model.mlp1.{0,1,3}.*``), from the Sequential itself
    (``{0,1,3}.*``) and the model's keys into the projector (``mlp1.{0,1,3}.*``), and HF's
    layer_norm/linear_1/linear_2; a Qwen2-VL one loads Qwen3-VL's norm/linear_fc1/linear_fc2."""
    original = _init(_InternVLChat(), seed=5)
    x = _tokens("internvl", torch.float32)
    feats = internvl.InternVLModel.pixel_shuffle(None, x.reshape(2, 4, 6, C), scale_factor=0.5)
    want = original.mlp1(feats.reshape(2, -1, 4 * C))

    def projector():
        return deco_ops.PatchMergerProjector(C, D, hidden_features=D, order="grid", norm_position="post", eps=1e-5, keys="internvl")

    model = _InternVLChat()
    model.mlp1 = projector()
    model.load_state_dict(original.state_dict())
    loaded = [model.mlp1]
    for state in (original.mlp1.state_dict(), original.state_dict()):
        loaded.append(projector())
        loaded[-1].load_state_dict(state)
    with deco_ops.use_backend("torch"):
        for ours in loaded:
            assert_close(ours(x, grid=(4, 6)), want, torch.float32)
    hf = _init(internvl_projector(), seed=5)
    ours = projector()
    ours.load_state_dict(hf.state_dict())
    with deco_ops.use_backend("torch"):
        assert_close(ours(x, grid=(4, 6)), internvl_stage(hf, x, (4, 6)), torch.float32)
    qwen3 = _init(qwen3_merger(False), seed=6)
    ours = deco_ops.PatchMergerProjector(C, D)
    ours.load_state_dict(qwen3.state_dict())
    assert torch.equal(ours.fc1.weight, qwen3.linear_fc1.weight) and torch.equal(ours.norm_layer.bias, qwen3.norm.bias)
    parent = torch.nn.Module()  # inside a model: the keys carry the parent's prefix
    parent.merger = deco_ops.PatchMergerProjector(C, D)
    parent.load_state_dict({f"merger.{k}": v for k, v in qwen3.state_dict().items()})
    assert torch.equal(parent.merger.fc2.weight, qwen3.linear_fc2.weight) and torch.equal(parent.merger.norm_layer.weight, qwen3.norm.weight)


@pytest.mark.parametrize("make", [lambda: deco_ops.PatchMergerProjector(C, D, keys="internvl"),
                                  lambda: deco_ops.DeCoProjector(C, D, grid=(2, 2), out_grid=(1, 1))],
                         ids=["PatchMergerProjector", "DeCoProjector"])
def test_load_without_matching_keys_follows_strict_as_nn_module(make):
    """Both projectors treat a load with no key of theirs as nn.Module does: strict=False returns
    every parameter as missing and every key as unexpected, raising nothing and changing nothing;
    strict=True raises."""
    ours = make()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    unrelated = {"vision_tower.0.weight": torch.randn(3, 3), "lm_head.weight": torch.randn(5, 3)}
    result = ours.load_state_dict(unrelated, strict=False)
    assert sorted(result.missing_keys) == sorted(before) and sorted(result.unexpected_keys) == sorted(unrelated)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match=r"Error\(s\) in loading state_dict"):
        ours.load_state_dict(unrelated)


def test_internvl_square_grid_by_default():
    hf = _init(internvl_projector(), seed=7)
    ours = from_hf(hf, "internvl")
    x = torch.randn(2, 36, C)
    with deco_ops.use_backend("torch"):
        assert_close(ours(x), internvl_stage(hf, x, (6, 6)), torch.float32)
        with pytest.raises(ValueError, match="not a square grid; pass grid"):
            ours(torch.randn(2, 24, C))


def test_internvl_square_grid_compiles_for_any_token_count():
    """``torch.compile(dynamic=True)``: the square side from a symbolic token count, and the
    norm's eps a symbolic float; one graph for two image sizes."""
    hf = _init(internvl_projector(), seed=7)
    ours = from_hf(hf, "internvl")
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    with deco_ops.use_backend("torch"):
        for side in (6, 8):
            x = torch.randn(2, side * side, C)
            assert_close(compiled(x), internvl_stage(hf, x, (side, side)), torch.float32)


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="from_hf does not know Linear"):
        deco_ops.PatchMergerProjector.from_hf(torch.nn.Linear(4, 4))


def _without(attribute: str, module: torch.nn.Module) -> torch.nn.Module:
    """``module`` (an HF merger) with one of its parameters removed, as the variant modules
    (``elementwise_affine=False``, ``bias=False``) build it."""
    owner, name = attribute.rsplit(".", 1)
    setattr(module.get_submodule(owner), name, None)
    return module


@pytest.mark.parametrize("attribute,match", [
    ("ln_q.weight", "norm has no weight"), ("ln_q.bias", "LayerNorm has no bias"),
    ("mlp.0.bias", r"Linears differ in bias \(first: False, second: True\)"),
    ("mlp.2.bias", r"Linears differ in bias \(first: True, second: False\)")])
def test_from_hf_refuses_what_the_projector_cannot_hold(attribute, match):
    """A norm without weight or bias, or Linears of which only one has a bias: refused by name
    (``ValueError``), not an AttributeError or a state_dict error from inside."""
    with pytest.raises(ValueError, match=match):
        deco_ops.PatchMergerProjector.from_hf(_without(attribute, qwen2_vl.PatchMerger(D, C)))


# merge size S of each HF module, and what from_hf is given to know it: nothing where the module's
# weights determine S, else the HF config, the HF model holding the module, or merge_size=
MERGES = {
    "internvl_ratio_0.25_config": ("internvl", 4, lambda: {"config": internvl_config(ratio=0.25)}),
    "internvl_ratio_0.25_model": ("internvl", 4, lambda: {"config": internvl.InternVLModel(internvl_config(ratio=0.25))}),
    "internvl_ratio_0.5_config": ("internvl", 2, lambda: {"config": internvl_config(ratio=0.5)}),
    "internvl_ratio_0.25_merge_size": ("internvl", 4, lambda: {"merge_size": 4}),
    "qwen3_vl_postshuffle_merge3_config": ("qwen3_vl_postshuffle", 3, lambda: {"config": qwen3_config(merge=3)}),
    "qwen3_vl_postshuffle_merge3_model": ("qwen3_vl_postshuffle", 3, lambda: {"config": qwen3_vl.Qwen3VLVisionModel(qwen3_config(merge=3))}),
    "qwen3_vl_merge3": ("qwen3_vl", 3, dict),
    "qwen2_vl_merge3": ("qwen2_vl", 3, dict),
    "qwen2_5_vl_merge3": ("qwen2_5_vl", 3, dict),
    "qwen2_5_vl_merge3_config": ("qwen2_5_vl", 3, lambda: {"config": Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 3})}),
    # Qwen3-Omni keeps its vision config under thinker_config
    "qwen3_omni_postshuffle_merge3_config": ("qwen3_omni_postshuffle", 3, lambda: {"config": Qwen3OmniMoeConfig(
        thinker_config={"vision_config": qwen3_omni_config(merge=3).to_dict()})}),
}


def _hf_module(name, merge):
    if name == "internvl":
        return internvl_projector(ratio=1 / merge)
    if name.startswith("qwen3_vl"):
        return qwen3_merger(name.endswith("postshuffle"), merge=merge)
    if name.startswith("qwen3_omni"):
        return qwen3_omni.Qwen3OmniMoeVisionPatchMerger(qwen3_omni_config(merge=merge), use_postshuffle_norm=name.endswith("postshuffle"))
    return (qwen2_vl.PatchMerger if name == "qwen2_vl" else qwen2_5_vl.Qwen2_5_VLPatchMerger)(D, C, spatial_merge_size=merge)


@pytest.mark.parametrize("case", list(MERGES))
def test_from_hf_merge_size_from_module_config_or_model(case, backend):
    """InternVL with downsample_ratio 0.25 and 0.5, Qwen3-VL's post-shuffle merger with S = 3 (the
    config or the model given), the Qwen mergers with S = 3 from their weights: the HF module's
    forward in float64, fp32 within 1e-5, tokens inside a NaN-filled buffer."""
    name, merge, given = MERGES[case]
    hf = _init(_hf_module(name, merge), seed=merge)
    ours = deco_ops.PatchMergerProjector.from_hf(hf, **given())
    assert ours.merge_size == merge
    g = torch.Generator().manual_seed(merge)
    if name == "internvl":
        grid = (2 * merge, 3 * merge)
        x = torch.randn(2, grid[0] * grid[1], C, generator=g) * 1.5 + 0.5
        ref = internvl_stage(hf.double(), x.double(), grid, ratio=1 / merge)
        y = ours(guarded(x), grid=grid)
    else:
        x = torch.randn(6 * merge * merge, C, generator=g) * 1.5 + 0.5
        ref = hf.double()(x.double())
        y = ours(guarded(x))
    assert_close(y, ref, torch.float32, tol=1e-5)


@pytest.mark.parametrize("name", ["internvl", "qwen3_vl_postshuffle"])
def test_from_hf_raises_naming_merge_size_where_the_module_is_ambiguous(name):
    """InternVL's projector and Qwen3-VL's post-shuffle merger hold only S²·C: without a config or
    merge_size, from_hf raises instead of guessing S = 2 (here S = 4, C = 16 and S = 2, C = 64
    give the same module)."""
    hf = _hf_module(name, 4)
    with pytest.raises(ValueError, match=r"do not determine merge_size .*pass config= .* or merge_size="):
        deco_ops.PatchMergerProjector.from_hf(hf)


def test_from_hf_rejects_merge_sizes_that_disagree_or_do_not_fit():
    with pytest.raises(ValueError, match="merge_size sources disagree: merge_size gives 2, config gives 4"):
        deco_ops.PatchMergerProjector.from_hf(internvl_projector(ratio=0.25), merge_size=2, config=internvl_config(ratio=0.25))
    with pytest.raises(ValueError, match="merge_size sources disagree: .*PatchMerger's weights gives 3"):
        deco_ops.PatchMergerProjector.from_hf(_hf_module("qwen2_vl", 3), merge_size=2)
    with pytest.raises(ValueError, match=r"in_features 256 is not merge_size\*\*2 = 9 times a channel count"):
        deco_ops.PatchMergerProjector.from_hf(internvl_projector(ratio=0.25), merge_size=3)
    with pytest.raises(ValueError, match="downsample_ratio 0.3 is not 1 / merge_size"):
        deco_ops.PatchMergerProjector.from_hf(internvl_projector(), config=internvl_config(ratio=0.3))
    with pytest.raises(ValueError, match="no downsample_ratio .* or spatial_merge_size .*; pass merge_size="):
        deco_ops.PatchMergerProjector.from_hf(internvl_projector(), config=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="merge_size must be a positive int"):
        deco_ops.PatchMergerProjector.from_hf(internvl_projector(), merge_size=0)


@pytest.mark.parametrize("name,c,d", [("qwen2_vl", 1280, 3584), ("qwen2_5_vl", 1280, 8192), ("internvl", 1024, 4096)])
def test_saved_for_backward_bytes(name, c, d, capsys):
    """Fused: the tokens (an input) and the pre-activation (the norm statistics are recomputed in
    backward). Eager HF: the tokens, the norm output (LayerNorm; RMSNorm's fp32 sequence keeps two
    more token-sized tensors), the pre-activation and the activation: with hidden = 4C exactly
    half for LayerNorm. Qwen2-VL-7B / Qwen2.5-VL-72B / InternVL2.5-8B widths, 256 tokens (64
    merged rows), fp32."""
    hf = {"qwen2_vl": lambda: qwen2_vl.PatchMerger(d, c), "qwen2_5_vl": lambda: qwen2_5_vl.Qwen2_5_VLPatchMerger(d, c),
          "internvl": lambda: internvl_projector(c, d)}[name]()
    ours = deco_ops.PatchMergerProjector.from_hf(hf, merge_size=2)
    x = torch.randn((1, 256, c) if name == "internvl" else (256, c), requires_grad=True)
    params = list(hf.parameters()) + list(ours.parameters())
    with deco_ops.use_backend("torch"):  # the residuals are the op's outputs on every backend
        fused = saved_bytes(lambda: ours(x), params)
    eager = saved_bytes(lambda: _run(hf, name, x) if name != "internvl" else internvl_stage(hf, x, (16, 16)), params)
    ratio = fused / eager
    bound = 0.41 if name == "qwen2_5_vl" else 0.5
    with capsys.disabled():
        print(f"\nsaved-for-backward bytes, PatchMergerProjector / eager HF {name}: {ratio:.4f} ({fused} / {eager}), target <= {bound}")
    assert ratio <= bound


@pytest.mark.parametrize("eps,error", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("a", ValueError),
                                       (None, ValueError), (True, ValueError)])
def test_bad_eps_raises_when_the_module_is_built(eps, error):
    """The norm's eps is checked where the module is built, with the op's message naming it, not
    at its first forward (or by ``float()``'s message)."""
    with pytest.raises(error, match="eps must be a finite float >= 0"):
        deco_ops.PatchMergerProjector(8, 16, eps=eps)


@pytest.mark.parametrize("switch,value", [("order", "rows"), ("norm", "batchnorm"), ("norm_position", "middle"), ("keys", "llava")])
def test_bad_switch_raises_when_built(switch, value):
    """Each string switch is checked by name where the module is built: not built to fail at its
    first forward, nor a KeyError from the layouts."""
    with pytest.raises(ValueError, match=f"{switch} must be one of .*, got '{value}'"):
        deco_ops.PatchMergerProjector(8, 16, **{switch: value})


def test_grid_that_merge_size_does_not_divide_raises_when_built():
    """A fixed grid whose H or W is no multiple of merge_size is refused where the module is built,
    with the op's message, not at its first forward; sizes may be numpy integers, as nn's take them."""
    import numpy as np

    with pytest.raises(ValueError, match=r"grid \(3, 3\): H and W must be multiples of merge_size = 2"):
        deco_ops.PatchMergerProjector(8, 16, order="grid", grid=(3, 3))
    module = deco_ops.PatchMergerProjector(np.int64(8), np.int64(16), merge_size=np.int64(2), order="grid", grid=(4, 6),
                                           eps=np.float32(1e-5))
    assert module(torch.randn(1, 24, 8)).shape == (1, 6, 16)


def test_grid_order_takes_batched_tokens_and_a_grid_only_with_it():
    """A grid at construction is for order='grid' only, refused when built; grid order takes
    (B, N, C) tokens, not a flat (N, C) sequence whose channels would be read as its tokens."""
    with pytest.raises(ValueError, match="grid is only used with order='grid'"):
        deco_ops.PatchMergerProjector(C, D, grid=(4, 4))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(16, 16\)"):
        deco_ops.PatchMergerProjector(C, D, order="grid")(torch.randn(16, C))


def test_grid_given_to_forward_overrides_the_built_one():
    """The grid given at construction is forward's default: a call's own grid replaces it."""
    hf = _init(internvl_projector(), seed=14)
    ours = deco_ops.PatchMergerProjector.from_hf(hf, config=internvl_config(), grid=(6, 4))
    x = torch.randn(2, 24, C, generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 1.5 + 0.5
    with deco_ops.use_backend("torch"):
        for grid in ((4, 6), None):
            assert_close(ours(x.float(), grid=grid), internvl_stage(hf.double(), x, grid or (6, 4)), torch.float32, f"grid {grid}")


class _GemmaRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: the same parameters as Qwen2.5-VL's, scaled by 1 + weight."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class _LayerNormSubclass(torch.nn.LayerNorm):
    """A subclass may compute anything under nn.LayerNorm's parameters."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("norm", [_GemmaRMSNorm(C), torch.nn.GroupNorm(1, C), torch.nn.BatchNorm1d(C), _LayerNormSubclass(C),
                                  type("Qwen2RMSNorm", (_GemmaRMSNorm,), {})(C)],
                         ids=lambda norm: type(norm).__name__)
def test_from_hf_refuses_norms_it_cannot_reproduce(norm):
    """Only nn.LayerNorm, nn.RMSNorm and HF's RMSNorms of the supported mergers convert: any other norm raises
    TypeError naming its class, not a silent conversion (Gemma's 1 + weight) or a state_dict error; a
    class outside transformers named as HF's (Qwen2RMSNorm) is not HF's."""
    hf = qwen2_vl.PatchMerger(D, C)
    hf.ln_q = norm
    with pytest.raises(TypeError, match=f"PatchMerger's norm is a .*{type(norm).__name__}, which PatchMergerProjector cannot reproduce"):
        deco_ops.PatchMergerProjector.from_hf(hf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_from_hf_takes_nn_rmsnorm_and_its_default_eps(eps, dtype):
    """nn.RMSNorm(C) with eps=None uses the machine epsilon of the dtype it computes in at each
    call (float32's for 16-bit inputs); tiny tokens make a wrong eps visible."""
    hf = qwen2_vl.PatchMerger(D, C)
    hf.ln_q = torch.nn.RMSNorm(C, eps=eps)
    hf = _init(hf, seed=9).to(dtype)
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    assert ours.norm_type == "rmsnorm" and ours.eps == eps
    x = (torch.randn(16, C, generator=torch.Generator().manual_seed(9)) * 1e-3).to(dtype)
    with deco_ops.use_backend("torch"):
        assert_close(ours(x), hf.double()(x.double()), dtype, "y", eager=hf.to(dtype)(x))



@pytest.mark.parametrize("change", ["set", "replaced", "module_eps"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_the_norm_childs_eps_changed_after_a_call_is_read(norm, change):
    """The norm's eps is its child's alone: changed on the child (or the child replaced by a norm of
    another eps, or set as ``module.eps``) after a call, the next call normalises with the new one,
    as calling the children does (hooked). A copy kept beside the child stayed at the old eps on the
    fused op's path: silently off by 0.4 here, where tiny tokens make eps visible."""
    torch.manual_seed(0)
    ours = _init(deco_ops.PatchMergerProjector(C, D, norm=norm, eps=1e-6), seed=3)
    x = torch.randn(2, 16, C) * 1e-3
    ours(x)  # a call before the change
    if change == "set":
        ours.norm_layer.eps = 1e-2
    elif change == "module_eps":
        ours.eps = 1e-2
    else:
        new = (torch.nn.LayerNorm if norm == "layernorm" else torch.nn.RMSNorm)(C, eps=1e-2)
        new.load_state_dict(ours.ln_q.state_dict())
        ours.ln_q = new
    assert ours.eps == ours.norm_layer.eps == 1e-2
    with torch.no_grad():
        expected = ours.fc2(torch.nn.functional.gelu(ours.fc1(ours.norm_layer(x).reshape(2, 4, 4 * C))))
        hooked = ours.fc1.register_forward_pre_hook(lambda *args: None)  # calls the children
        by_children = ours(x)
        hooked.remove()
    torch.testing.assert_close(by_children, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-5)


def _activations():
    from transformers import activations

    return {"nn.GELU": torch.nn.GELU(), "nn.GELU-tanh": torch.nn.GELU(approximate="tanh"), "nn.SiLU": torch.nn.SiLU(),
            "NewGELUActivation": activations.NewGELUActivation(), "GELUActivation": activations.GELUActivation(),
            "QuickGELUActivation": activations.QuickGELUActivation(),
            # ACT2FN's "gelu_pytorch_tanh" and "silu" (InternVL's projector_hidden_act)
            "GELUTanh": activations.GELUTanh(), "SiLUActivation": activations.SiLUActivation()}


@pytest.mark.parametrize("activation", list(_activations()))
def test_from_hf_takes_the_mergers_activation(activation):
    """Whatever activation module the merger's MLP holds (nn's, transformers' tanh and erf GELUs,
    QuickGELU), the projector computes it: tokens of scale 3, where the tanh and erf GELUs differ
    by ~1e-4."""
    hf = _init(qwen2_vl.PatchMerger(D, C), seed=11)
    hf.mlp[1] = _activations()[activation]
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    x = torch.randn(16, C, generator=torch.Generator().manual_seed(11)) * 3
    with deco_ops.use_backend("torch"):
        y = ours(x).double()
    want = hf.double()(x.double())
    eager = hf.float()(x).double()
    error, eager_error = ((t - want).abs().max() / want.abs().max() for t in (y, eager))
    assert error <= max(10 * eager_error, 1e-6), (error, eager_error)  # the other GELU: ~1e-4


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_5_omni", "exaone4_5"])
def test_from_hf_takes_hf_rmsnorms_eps(name):
    """Hugging Face's RMSNorms keep their eps as ``variance_epsilon``: a merger built with another
    eps than the default 1e-6 converts with it (tokens of 1e-2, where eps 1e-3 and 1e-6 differ)."""
    hf = MODULES[name]()
    hf.ln_q = type(hf.ln_q)(C, eps=1e-3)
    hf = _init(hf, seed=15)
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    assert ours.eps == 1e-3
    x = torch.randn(16, C, generator=torch.Generator().manual_seed(15), dtype=torch.float64) * 1e-2
    with deco_ops.use_backend("torch"):
        assert_close(ours(x.float()), hf.double()(x), torch.float32, "y", eager=hf.float()(x.float()))


def test_from_hf_takes_nn_rmsnorm_default_eps_in_float64():
    """nn.RMSNorm(eps=None) in float64 uses float64's machine epsilon (float32's for every other
    dtype): tokens of 1e-5 make the difference visible."""
    hf = qwen2_vl.PatchMerger(D, C)
    hf.ln_q = torch.nn.RMSNorm(C, eps=None)
    hf = _init(hf, seed=12).double()
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    x = torch.randn(16, C, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 1e-5
    with deco_ops.use_backend("torch"):
        torch.testing.assert_close(ours(x), hf(x))


def test_from_hf_takes_linears_without_bias():
    """A merger whose Linears have no bias converts to a projector without them (its state_dict
    loads: no bias keys expected) and computes the same."""
    hf = qwen2_vl.PatchMerger(D, C)
    hf.mlp[0] = torch.nn.Linear(hf.mlp[0].in_features, hf.mlp[0].out_features, bias=False)
    hf.mlp[2] = torch.nn.Linear(hf.mlp[2].in_features, hf.mlp[2].out_features, bias=False)
    hf = _init(hf, seed=13)
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    x = torch.randn(16, C, generator=torch.Generator().manual_seed(13))
    with deco_ops.use_backend("torch"):
        assert_close(ours(x), hf.double()(x.double()), torch.float32, "y")


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_from_hf_keeps_a_norm_kept_in_float32(name):
    """A bf16 merger whose norm is kept in float32 (Hugging Face's ``keep_in_fp32_modules``, a
    mixed-precision recipe): the projector keeps the norm's float32 parameters (they were rounded to
    bf16 before, then trained with bf16 gradients) and gives the merger's output and gradients."""
    hf = _init(MODULES[name](), seed=3).to(torch.bfloat16)
    norm = hf.ln_q if name == "qwen2_vl" else hf.norm
    norm.float()
    with torch.no_grad():
        norm.weight.add_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(4)) * 1e-3)
    ours = from_hf(hf, name)
    theirs = dict(hf.named_parameters())
    for key, p in ours.named_parameters():
        assert p.dtype == theirs[key].dtype and torch.equal(p, theirs[key]), key
    x = _tokens(name, torch.bfloat16)
    y, eager = ours(x), hf(x)
    assert y.dtype == eager.dtype == torch.bfloat16
    y.float().sum().backward()
    eager.float().sum().backward()
    for key, p in ours.named_parameters():
        assert p.grad.dtype == theirs[key].grad.dtype, key
        assert_close(p.grad, theirs[key].grad, torch.bfloat16, f"grad {key}")
    assert_close(y, eager, torch.bfloat16, "y")


def test_from_hf_keeps_requires_grad_and_mode():
    hf = _init(qwen2_vl.PatchMerger(D, C), seed=10).eval()
    hf.ln_q.requires_grad_(False)
    ours = deco_ops.PatchMergerProjector.from_hf(hf)
    assert {name: p.requires_grad for name, p in ours.named_parameters()} == {
        name: p.requires_grad for name, p in hf.named_parameters()}
    assert not any(m.training for m in ours.modules())
    assert all(m.training for m in deco_ops.PatchMergerProjector.from_hf(hf.train()).modules())


@pytest.mark.parametrize("order,x", [("block", torch.randn(8, C - 1)), ("block", torch.randn(2, 8, C + 1)), ("grid", torch.randn(2, 16, C - 1))])
def test_wrong_input_width_names_x_and_in_features(order, x):
    """Not the op's w1 or norm_weight, which the caller never passed."""
    with pytest.raises(ValueError, match=fr"x has {x.shape[-1]} channels \(x.shape\[-1\]\) but this PatchMergerProjector takes in_features = {C}"):
        deco_ops.PatchMergerProjector(C, D, order=order)(x)


def test_grid_order_without_tokens_says_so():
    with pytest.raises(ValueError, match="x has no tokens: order='grid' merges each image's"):
        deco_ops.PatchMergerProjector(C, D, order="grid")(torch.randn(2, 0, C))
