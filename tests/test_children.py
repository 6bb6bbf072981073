"""The drop-in projectors call their norm and Linears wherever the module they replace would run
more than those children's parameters: a LoRA layer (peft's, or any Linear subclass with its own
forward), forward / pre-forward / full backward hooks, ``torch.nn.utils.prune``'s mask, a forward
set on the instance (accelerate's offloading), a process-wide module hook (``deco_ops._children``).
Each case wraps the same child of our module and of the module it replaces (LLaVA's mm_projector
after DeCo's pooling; Hugging Face's Qwen2-VL, Qwen3-VL and InternVL mergers) and compares output
and every gradient with the replaced module in float64. Before, the projectors read the children's
parameters into the fused op: the adapter and the hooks were silently skipped."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import deco_ops
from deco_ops import merge_modules, modules, reference
from harness import assert_close
from test_merge_modules import MODULES, _init, _run, _tokens, from_hf

C, HIDDEN, OUT = 16, 24, 20


class LoRALinear(nn.Linear):
    """peft's LoRA layer in miniature: a Linear class of its own whose forward adds a low-rank product."""

    def forward(self, x):
        return super().forward(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


def _lora(module, name):
    base = module.get_submodule(name)
    new = LoRALinear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)
    new.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(base.in_features)
    new.lora_a = nn.Parameter((torch.randn(4, base.in_features, generator=g) * base.in_features**-0.5).to(base.weight.dtype))
    new.lora_b = nn.Parameter((torch.randn(base.out_features, 4, generator=g) * 0.5).to(base.weight.dtype))
    _replace(module, name, new)


def _pre_hook(module, name):
    module.get_submodule(name).register_forward_pre_hook(lambda _, args: (args[0] * 1.5 - 0.25,))


def _forward_hook(module, name):
    module.get_submodule(name).register_forward_hook(lambda _, args, out: out * 0.75 + 0.25)


def _full_backward_hook(module, name):
    module.get_submodule(name).register_full_backward_hook(lambda _, grad_in, grad_out: (grad_in[0] * -2.0,))


def _pruned(module, name):
    """Pruned, then a training step on the unpruned weights: prune's pre-forward hook recomputes
    ``weight``; the attribute read without it is the mask's product at pruning time."""
    child = module.get_submodule(name)
    mask = torch.rand(child.weight.shape, generator=torch.Generator().manual_seed(3)) < 0.6
    prune.custom_from_mask(child, "weight", mask)
    with torch.no_grad():
        child.weight_orig.mul_(-1.5)


def _instance_forward(module, name):
    """As accelerate's hooks do: a ``forward`` set on the instance, wrapping the class's."""
    child = module.get_submodule(name)
    child.forward = functools.partial(lambda m, x: type(m).forward(m, x) * 2.0 - 0.5, child)


WRAPS = {"lora": _lora, "pre_hook": _pre_hook, "forward_hook": _forward_hook, "full_backward_hook": _full_backward_hook,
         "pruned": _pruned, "instance_forward": _instance_forward}


def _linear_only_hook(module, args, out):
    return out * 0.5 + 1.0 if isinstance(module, nn.Linear) else None


class LLaVAProjector(nn.Module):
    """LLaVA's mm_projector (``nn.Sequential(Linear, GELU, Linear)``, children "0", "1", "2") after
    DeCo's pooling or before PLLaVA's, in plain PyTorch."""

    def __init__(self, order, mode, dtype):
        super().__init__()
        self.order, self.mode = order, mode
        self.mlp = nn.Sequential(nn.Linear(C, HIDDEN, dtype=dtype), nn.GELU(), nn.Linear(HIDDEN, OUT, dtype=dtype))

    def pool(self, x):
        if self.mode == "average":
            return reference.adaptive_avg_pool_tokens(x, (4, 4), (2, 3))
        img = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 4, 4)
        return F.interpolate(img, size=(2, 3), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def forward(self, x):
        x = x[:, 1:]  # the CLS token
        return self.pool(self.mlp(x)) if self.order == "mlp_pool" else self.mlp(self.pool(x))


PROJECTORS = {"pool_mlp": ("pool_mlp", "average"), "mlp_pool": ("mlp_pool", "average"), "bilinear": ("pool_mlp", "bilinear")}
MERGERS = ("qwen2_vl", "qwen3_vl_postshuffle", "internvl")  # pre-merge LayerNorm; post-merge; grid order


class Pair:
    """Ours and the module it replaces, wrapped alike: ``replaced`` runs the computation,
    ``named`` holds its children under our names (LLaVA's Sequential "0"/"2", HF's paths)."""

    def __init__(self, kind):
        if kind in PROJECTORS:
            order, mode = PROJECTORS[kind]
            self.replaced = _init(LLaVAProjector(order, mode, torch.float64), seed=11)
            self.named = self.replaced.mlp
            self.ours = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=(4, 4), out_grid=(2, 3), order=order,
                                               mode=mode, num_prefix_tokens=1)
            self.ours.load_state_dict(self.named.state_dict())
            self.x = torch.randn(2, 17, C, generator=torch.Generator().manual_seed(5))
            self.paths = ("0", "2")
            self.run = lambda m, t: m(t)
        else:
            self.replaced = self.named = _init(MODULES[kind](), seed=len(kind)).double()
            self.ours = from_hf(_init(MODULES[kind](), seed=len(kind)), kind)
            self.x = _tokens(kind, torch.float32)
            self.paths = tuple(".".join(p) for p in merge_modules._PATHS[self.ours.keys])
            self.run = lambda m, t: m(t, grid=(4, 6)) if m is self.ours and kind == "internvl" else _run(m, kind, t)

    def wrap(self, how, path):
        """``how`` on the child at ``path`` of both modules."""
        for module in (self.ours, self.named):
            how(module, path)

    def check(self):
        """Output and every gradient of ours (float32) against the replaced module's (float64)."""
        xs = [self.x.clone().requires_grad_(True), self.x.double().requires_grad_(True)]
        y, ref = self.run(self.ours, xs[0]), self.run(self.replaced, xs[1])
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        assert_close(y, ref, torch.float32, "y")
        assert_close(xs[0].grad, xs[1].grad, torch.float32, "grad x")
        theirs = dict(self.named.named_parameters())
        assert sorted(theirs) == sorted(n for n, _ in self.ours.named_parameters())
        for key, p in self.ours.named_parameters():
            assert p.requires_grad == theirs[key].requires_grad, key
            if p.requires_grad:
                assert_close(p.grad, theirs[key].grad, torch.float32, f"grad {key}")


def _fused_calls(monkeypatch):
    """The fused ops the projectors called (as a list that grows)."""
    calls = []
    for owner, name in ((modules, "pool_mlp"), (modules, "mlp_pool"), (modules, "pool_mlp_resampled"), (merge_modules, "merge_mlp")):
        fused = getattr(owner, name)
        monkeypatch.setattr(owner, name, functools.partial(lambda f, *a, **k: calls.append(f) or f(*a, **k), fused))
    return calls


def _check_calling_children(pair, monkeypatch):
    """``pair.check()``, with ours calling its children: no fused op ran."""
    calls = _fused_calls(monkeypatch)
    pair.check()
    assert not calls


# which children each wrap goes on: both Linears, the first (the default), the second (a backward
# hook on the last Linear changes every gradient below it), or the merger's norm (a forward hook)
_TARGETS = {"lora": (-2, -1), "pruned": (-2, -1), "full_backward_hook": (-1,), "norm_hook": (0,)}


# every wrap on every module; a hook on the mergers' norm too (the paths' first entry)
CASES = [(kind, wrap) for kind in (*PROJECTORS, *MERGERS) for wrap in WRAPS] + [(kind, "norm_hook") for kind in MERGERS]


@pytest.mark.parametrize("kind,wrap", CASES)
def test_wrapped_children_run_as_in_the_replaced_module(kind, wrap, backend, monkeypatch):
    pair = Pair(kind)
    for i in _TARGETS.get(wrap, (-2,)):
        pair.wrap(WRAPS.get(wrap, _forward_hook), pair.paths[i])
    _check_calling_children(pair, monkeypatch)


@pytest.mark.parametrize("kind", [*PROJECTORS, *MERGERS])
def test_a_process_wide_module_hook_runs(kind, backend, monkeypatch):
    handle = nn.modules.module.register_module_forward_hook(_linear_only_hook)
    try:
        _check_calling_children(Pair(kind), monkeypatch)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", [*PROJECTORS, *MERGERS])
def test_plain_and_parametrized_children_take_the_fused_op(kind, backend, monkeypatch):
    """A parametrized Linear computes ``weight`` on access: its parameters still stand for it."""
    pair = Pair(kind)
    calls = _fused_calls(monkeypatch)
    pair.check()
    assert len(calls) == 1
    pair.wrap(lambda m, path: parametrizations.weight_norm(m.get_submodule(path)), pair.paths[-2])
    pair.check()
    assert len(calls) == 2


class _Counted(nn.Module):
    """A parametrization that counts how often the weight is computed (a spectral norm steps its
    power iteration that often, a stochastic one draws that often)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, weight):
        self.calls += 1
        return weight * 1.0


@pytest.mark.parametrize("kind", [*PROJECTORS, *MERGERS])
def test_a_parametrized_weight_is_computed_once_per_forward(kind, backend):
    """Each parametrized Linear weight is computed as often per forward as in the module replaced
    (once): the projectors read ``fc1.weight`` once for its width and once for the op (two power
    iterations of a spectral norm per step, its state drifting from the replaced module's)."""
    pair = Pair(kind)
    counters = {}
    for module in (pair.ours, pair.named):
        for path in pair.paths[-2:]:
            counters[module, path] = _Counted()
            torch.nn.utils.parametrize.register_parametrization(module.get_submodule(path), "weight", counters[module, path])
            counters[module, path].calls = 0  # registering computes it once, to check it
    pair.check()
    for path in pair.paths[-2:]:
        assert counters[pair.ours, path].calls == counters[pair.named, path].calls == 1, path


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_computes_a_parametrized_out_proj_weight_once(batch_first, auto_backend):
    """``CrossAttention`` computes a parametrized ``out_proj.weight`` once per forward, as
    ``nn.MultiheadAttention`` does (its input check read the weight for its dtype and device)."""
    counts = []
    for cls in (deco_ops.CrossAttention, nn.MultiheadAttention):
        module = cls(16, 2, batch_first=batch_first)
        counted = _Counted()
        torch.nn.utils.parametrize.register_parametrization(module.out_proj, "weight", counted)
        counted.calls = 0  # registering computes it once, to check it
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
        module(x, x, x)
        counts.append(counted.calls)
    assert counts == [1, 1]


@pytest.mark.parametrize("kind", ["pool_mlp", "qwen2_vl"])
def test_peft_lora_adapters_apply_and_train(kind, monkeypatch):
    """peft's own LoRA layers on both Linears (``target_modules`` as a user names them); the base
    weights frozen, the adapters' gradients as the replaced module's."""
    peft = pytest.importorskip("peft")
    pair = Pair(kind)
    wrapped = []
    for module in (pair.ours, pair.named):
        torch.manual_seed(0)  # the same adapter weights on both
        wrapped.append(peft.get_peft_model(module, peft.LoraConfig(r=4, target_modules=list(pair.paths[-2:]), init_lora_weights=False)))
    assert sum("lora_" in name for name, _ in pair.ours.named_parameters()) == 4
    _check_calling_children(pair, monkeypatch)
    for model in wrapped:  # the adapters merged into the weights: plain Linears again, the fused op again
        model.merge_and_unload()
    calls = _fused_calls(monkeypatch)
    pair.check()
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["pool_mlp", "qwen2_vl"])
def test_dynamically_quantized_linears_run(kind, backend, monkeypatch):
    """``torch.ao.quantization.quantize_dynamic`` (CPU inference) swaps the Linears for int8 ones
    whose ``weight`` is a method: ours runs them as the replaced module does (float32 both: the
    quantized Linear takes nothing else). Before, reading ``weight`` raised."""
    pair = Pair(kind)
    pair.replaced.float()
    for module in (pair.ours, pair.named):
        torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        assert_close(pair.run(pair.ours, pair.x), pair.run(pair.replaced, pair.x), torch.float32)
    assert not calls


@pytest.mark.parametrize("kind", ["pool_mlp", "qwen2_vl", "internvl"])
def test_a_wrapped_linear_still_names_a_wrong_input_width(kind):
    """The calling path checks x's width against the first Linear's ``in_features`` (a LoRA or
    int8 Linear has no plain ``weight`` to read), by name, as the fused path does
    (tests/test_error_paths.py: ``module-width``)."""
    pair = Pair(kind)
    pair.wrap(_lora, pair.paths[-2])
    x = pair.x[..., :-1]
    what = "features" if kind == "pool_mlp" else "channels"
    with pytest.raises(ValueError, match=fr"x has {C - 1} {what} \(x.shape\[-1\]\) but this \w+ takes in_features = {C}"):
        pair.run(pair.ours, x)
