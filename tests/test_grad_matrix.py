"""Gradient matrices: every public op and module, every subset of its differentiable inputs
requiring grad, every optional argument present or absent (each bias, ``kv_lens``,
``cu_seqlens_k``, ``out_grids``/``stride``, prefix tokens). Each gradient that should exist is
compared with a float64 plain-PyTorch reference; every other one must be None.

A gradient formula's ``needs_input_grad`` flags and optional-bias branches are where one-line bugs
hide (issue 14: ``has_b2`` tested where ``has_b1`` was meant, ``pool_linear``'s flags swapped), and
the other suites pass every bias or none and make every input require grad.

Tiny shapes with overlapping windows (3x3 -> 2x2, two images). On the Triton kernels (the
interpreter on a CPU): every subset with all optional inputs present, and the "diagonal" (nothing,
each input alone, everything) for each way of leaving them out. The default backend runs the
diagonal, enough for the autograd formulas both backends share, and (``FLOAT64``) everything
requiring grad on float64 tensors, which it takes as they are: every gradient to float64's
precision, where a step computed in fp32 (an upcast meant for 16-bit inputs) shows as 1e-8.
"""

import copy
import functools
import itertools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deco_ops
from deco_ops import reference, reference_attention
from deco_ops.kernels import cross_attention_bwd
from harness import assert_close, guarded, poisoned_empty, randn
from test_attention_modules import PlainResampler
from test_packed import _t, loop64

GRID, OUT_GRID = (3, 3), (2, 2)
B, C, HIDDEN, OUT = 2, 5, 6, 4
IMAGES, IMAGE_OUTS = [(3, 3), (2, 4)], [(2, 2), (1, 3)]
BACKENDS = ("triton", "auto")
FLOAT64 = "float64"  # the PyTorch backend (the default on CPU tensors) on float64 tensors


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == FLOAT64 else torch.float32


def _backend(backend: str) -> str:
    return "torch" if backend == FLOAT64 else backend


def subsets(names):
    return [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


def diagonal(trainable, present) -> bool:
    """Nothing, each input alone, or everything requiring grad."""
    return len(trainable) in (0, 1, len(present))


def matrix(inputs: tuple[str, ...], optional: tuple[str, ...]):
    """pytest params (backend, absent optional inputs, trainable inputs). On the Triton backend:
    every subset with every optional input present, and the diagonal for each way of leaving
    optional inputs out. On the default backend (the same autograd formulas): each input alone and
    everything, for each way of leaving them out; in float64, everything."""
    params = []
    for backend in (*BACKENDS, FLOAT64):
        for absent in subsets(optional):
            present = [n for n in inputs if n not in absent]
            for trainable in subsets(present):
                full = backend == "triton" and not absent
                if not full and not diagonal(trainable, present):
                    continue
                if backend != "triton" and not trainable:
                    continue
                if backend == FLOAT64 and len(trainable) < len(present):
                    continue
                name = ",".join(n for n in inputs if n in trainable) or "frozen"
                if absent:
                    name += "-no_" + ",".join(n for n in optional if n in absent)
                params.append(pytest.param(backend, absent, trainable, id=f"{backend}-{name}"))
    return params


def reference_grads(fn64, values: dict, dy: torch.Tensor) -> dict:
    """float64 gradients of every present input (they do not depend on which others need one)."""
    leaves = {n: None if t is None else t.detach().double().requires_grad_(True) for n, t in values.items()}
    fn64(**leaves).backward(dy.double())
    return {n: t.grad for n, t in leaves.items() if t is not None}


def check(call, values: dict, trainable, dy, want: dict, backend: str):
    """Runs ``call(**inputs)`` (inputs NaN-guarded, outputs NaN-poisoned) with exactly ``trainable``
    requiring grad; compares their gradients with ``want`` and asserts the others are None."""
    dtype = _dtype(backend)
    leaves = {n: None if t is None else guarded(t.to(dtype)).detach().requires_grad_(n in trainable) for n, t in values.items()}
    with deco_ops.use_backend(_backend(backend)), poisoned_empty():
        y = call(**leaves)
        assert y.dtype == dtype
        assert y.requires_grad == bool(trainable)
        if trainable:
            y.backward(guarded(dy.to(dtype)))
    for name, t in leaves.items():
        if t is None:
            continue
        if name in trainable:
            assert t.grad is not None, f"{name} requires grad but got none"
            assert_close(t.grad, want[name], dtype, f"grad {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


# ----------------------------------------------------------------------------------------------
# the MLP projector ops: x, w1, b1, w2, b2; each bias optional


MLP_INPUTS, MLP_BIASES = ("x", "w1", "b1", "w2", "b2"), ("b1", "b2")


def mlp_values(absent, tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    values = {
        "x": randn(tokens, C, generator=g),
        "w1": randn(HIDDEN, C, scale=C**-0.5, generator=g),
        "b1": randn(HIDDEN, generator=g),
        "w2": randn(OUT, HIDDEN, scale=HIDDEN**-0.5, generator=g),
        "b2": randn(OUT, generator=g),
    }
    return {n: None if n in absent else t for n, t in values.items()}


def _dense_x(values):
    return values | {"x": values["x"].view(B, math.prod(GRID), C)}


@functools.lru_cache(maxsize=None)
def _dense_case(op: str, absent: frozenset):
    values = _dense_x(mlp_values(absent, B * math.prod(GRID)))
    dy = randn(B, math.prod(OUT_GRID), OUT, generator=torch.Generator().manual_seed(1))

    def pool_mlp64(x, w1, b1, w2, b2):
        return reference.pool_mlp(x, w1, b1, w2, b2, GRID, OUT_GRID)

    def mlp_pool64(x, w1, b1, w2, b2):
        h = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        return reference.adaptive_avg_pool_tokens(h, GRID, OUT_GRID)

    return values, dy, reference_grads(pool_mlp64 if op == "pool_mlp" else mlp_pool64, values, dy)


@pytest.mark.parametrize("backend,absent,trainable", matrix(MLP_INPUTS, MLP_BIASES))
def test_pool_mlp(backend, absent, trainable):
    values, dy, want = _dense_case("pool_mlp", absent)
    check(functools.partial(deco_ops.pool_mlp, grid=GRID, out_grid=OUT_GRID), values, trainable, dy, want, backend)


@pytest.mark.parametrize("backend,absent,trainable", matrix(MLP_INPUTS, MLP_BIASES))
def test_mlp_pool(backend, absent, trainable):
    values, dy, want = _dense_case("mlp_pool", absent)
    check(functools.partial(deco_ops.mlp_pool, grid=GRID, out_grid=OUT_GRID), values, trainable, dy, want, backend)


@functools.lru_cache(maxsize=None)
def _packed_case(op: str, absent: frozenset):
    values = mlp_values(absent, sum(map(math.prod, IMAGES)))
    dy = randn(sum(map(math.prod, IMAGE_OUTS)), OUT, generator=torch.Generator().manual_seed(1))

    def pool_mlp64(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(loop64(x, IMAGES, IMAGE_OUTS, "average"), w1, b1)), w2, b2)

    def mlp_pool64(x, w1, b1, w2, b2):
        return loop64(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), IMAGES, IMAGE_OUTS, "average")

    return values, dy, reference_grads(pool_mlp64 if op == "pool_mlp" else mlp_pool64, values, dy)


def _packed_call(op):
    def call(x, w1, b1, w2, b2):
        return op(x, _t(IMAGES), w1, b1, w2, b2, out_grids=_t(IMAGE_OUTS))[0]
    return call


@pytest.mark.parametrize("backend,absent,trainable", matrix(MLP_INPUTS, MLP_BIASES))
def test_pool_mlp_packed(backend, absent, trainable):
    values, dy, want = _packed_case("pool_mlp", absent)
    check(_packed_call(deco_ops.pool_mlp_packed), values, trainable, dy, want, backend)


# mlp_pool_packed is the op behind mlp_pool (deco::mlp_pool_packed): nothing or everything is enough.
@pytest.mark.parametrize("backend,absent,trainable", [
    p for p in matrix(MLP_INPUTS, MLP_BIASES)
    if p.values[0] == "triton" and len(p.values[2]) in ((0, len(MLP_INPUTS)) if not p.values[1] else (len(MLP_INPUTS) - len(p.values[1]),))
])
def test_mlp_pool_packed(backend, absent, trainable):
    values, dy, want = _packed_case("mlp_pool", absent)
    check(_packed_call(deco_ops.mlp_pool_packed), values, trainable, dy, want, backend)


# ----------------------------------------------------------------------------------------------
# pool_linear: x, w, b (optional)


@pytest.mark.parametrize("backend,absent,trainable", matrix(("x", "w", "b"), ("b",)))
def test_pool_linear(backend, absent, trainable):
    values = mlp_values(absent | {"w2", "b2"}, B * math.prod(GRID))
    values = {"x": values["x"].view(B, -1, C), "w": values["w1"], "b": None if "b" in absent else values["b1"]}
    dy = randn(B, math.prod(OUT_GRID), HIDDEN, generator=torch.Generator().manual_seed(1))
    want = reference_grads(lambda x, w, b: reference.pool_linear(x, w, b, GRID, OUT_GRID), values, dy)
    check(functools.partial(deco_ops.pool_linear, grid=GRID, out_grid=OUT_GRID), values, trainable, dy, want, backend)


# ----------------------------------------------------------------------------------------------
# pooling alone: x; the packed ops' out_grids or stride


def _dense_pool64(mode):
    if mode == "average":
        return lambda x: reference.adaptive_avg_pool_tokens(x, GRID, OUT_GRID)
    return lambda x: torch.stack([loop64(xi, [GRID], [OUT_GRID], "bilinear") for xi in x])


@pytest.mark.parametrize("trainable", [frozenset(), frozenset({"x"})], ids=["frozen", "x"])
@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("backend", (*BACKENDS, FLOAT64))
def test_pool_tokens(backend, mode, trainable):
    values = {"x": randn(B, math.prod(GRID), C)}
    dy = randn(B, math.prod(OUT_GRID), C)
    op = deco_ops.adaptive_avg_pool_tokens if mode == "average" else deco_ops.bilinear_pool_tokens
    want = reference_grads(_dense_pool64(mode), values, dy)
    check(lambda x: op(x, GRID, OUT_GRID), values, trainable, dy, want, backend)


@pytest.mark.parametrize("trainable", [frozenset(), frozenset({"x"})], ids=["frozen", "x"])
@pytest.mark.parametrize("by", ["out_grids", "stride"])
@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("backend", (*BACKENDS, FLOAT64))
def test_pool_tokens_packed(backend, mode, by, trainable):
    outs = IMAGE_OUTS if by == "out_grids" else [tuple(-(-s // 2) for s in g) for g in IMAGES]
    kwargs = {"out_grids": _t(outs)} if by == "out_grids" else {"stride": 2}
    op = deco_ops.adaptive_avg_pool_tokens_packed if mode == "average" else deco_ops.bilinear_pool_tokens_packed
    values = {"x": randn(sum(map(math.prod, IMAGES)), C)}
    dy = randn(sum(map(math.prod, outs)), C)
    want = reference_grads(lambda x: loop64(x, IMAGES, outs, mode), values, dy)
    check(lambda x: op(x, _t(IMAGES), **kwargs)[0], values, trainable, dy, want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,out_grid", [(GRID, OUT_GRID), ((3, 2, 3), (2, 2, 2))])
def test_pool_tokens_double_backward(backend, grid, out_grid):
    """Each pooling op's autograd formula is the other: the gradient of the input gradient with
    respect to the output gradient is pooling again (grid and out_grid in their places)."""
    x = randn(B, math.prod(grid), C).requires_grad_(True)
    dy = randn(B, math.prod(out_grid), C).requires_grad_(True)
    r = randn(B, math.prod(grid), C)
    with deco_ops.use_backend(backend):
        (dx,) = torch.autograd.grad(deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid), x, dy, create_graph=True)
        (ddy,) = torch.autograd.grad(dx, dy, r)
    assert_close(ddy, reference.adaptive_avg_pool_tokens(r.double(), grid, out_grid), torch.float32, "grad of grad")


# ----------------------------------------------------------------------------------------------
# cross_attention: q, k, v; kv_lens, cu_seqlens_k or attn_mask; shared or per-sample queries; both schedules


M, N, H, D = 3, 7, 2, 16
LENS = [7, 3]


@functools.lru_cache(maxsize=None)
def _attention_case(keys: str, shared: bool):
    g = torch.Generator().manual_seed(3)
    q = randn(1 if shared else B, M, H, D, generator=g)
    dout = randn(B, M, H, D, generator=g)
    extra = {}
    if keys == "cu_seqlens_k":
        total = sum(LENS) + 2  # two rows no batch owns: zero gradient
        k, v = randn(total, H, D, generator=g), randn(total, H, D, generator=g)
        cu = [0, *itertools.accumulate(LENS)]
        extra["cu_seqlens_k"] = torch.tensor(cu, dtype=torch.int32)

        def attention64(q, k, v):
            qs = q.expand(B, -1, -1, -1)
            return torch.cat([reference_attention.attention_dense(qs[b: b + 1], k[None, cu[b]: cu[b + 1]], v[None, cu[b]: cu[b + 1]])
                              for b in range(B)])
    elif keys == "attn_mask":  # per head x query x key (each kernel's head offset), with holes; key 0 always kept
        k, v = randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
        keep = torch.rand(B, H, M, N, generator=g) > 0.4
        keep[..., 0] = True
        extra["attn_mask"] = keep
        bias = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))

        def attention64(q, k, v):
            return reference_attention.attention_dense(q, k, v, bias=bias)
    else:
        k, v = randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
        lens = torch.tensor(LENS) if keys == "kv_lens" else None
        if lens is not None:
            extra["kv_lens"] = lens.to(torch.int32)

        def attention64(q, k, v):
            return reference_attention.attention_dense(q, k, v, lens)
    values = {"q": q, "k": k, "v": v}
    return values, extra, dout, reference_grads(attention64, values, dout)


def attention_matrix():
    """Both Triton schedules: every subset with dense keys, the diagonal with kv_lens, packed keys or
    attn_mask; the default backend: each input alone with dense keys, everything with the others,
    and in float64 everything."""
    params = []
    for backend, schedule in (("triton", "single_pass"), ("triton", "fa2"), ("auto", "reference"), (FLOAT64, "reference")):
        for keys in ("dense", "kv_lens", "cu_seqlens_k", "attn_mask"):
            for trainable in subsets(("q", "k", "v")):
                if backend == "auto" and (not trainable or (keys != "dense" and len(trainable) < 3)):
                    continue
                if backend == FLOAT64 and len(trainable) < 3:
                    continue
                if keys != "dense" and not diagonal(trainable, "qkv"):
                    continue
                name = ",".join(n for n in "qkv" if n in trainable) or "frozen"
                schedule_id = FLOAT64 if backend == FLOAT64 else schedule
                params.append(pytest.param(backend, schedule, keys, trainable, id=f"{schedule_id}-{keys}-{name}"))
    return params


@pytest.mark.parametrize("backend,schedule,keys,trainable", attention_matrix())
def test_cross_attention(backend, schedule, keys, trainable):
    # The single pass runs with queries shared by the batch (its dQ reduction), FA2 without.
    values, extra, dout, want = _attention_case(keys, shared=schedule != "fa2")
    with mock.patch.object(cross_attention_bwd, "use_single_pass", return_value=schedule == "single_pass"):
        check(lambda q, k, v: deco_ops.cross_attention(q, k, v, **extra), values, trainable, dout, want, backend)


# ----------------------------------------------------------------------------------------------
# modules: inputs and parameters, layer by layer


def _module_check(module, module64, inputs: dict, trainable_inputs, frozen_params: set, extra: dict, dy, backend):
    """Runs ``module(**inputs, **extra)`` with the named parameter groups frozen; every gradient
    against ``module64`` (a float64 twin holding the same weights) or None."""
    for name, p in module.named_parameters():
        p.requires_grad_(name.split(".")[0] not in frozen_params)
    leaves = {n: t.detach().clone().requires_grad_(n in trainable_inputs) for n, t in inputs.items()}
    refs = {n: t.detach().double().requires_grad_(True) for n, t in inputs.items()}
    with deco_ops.use_backend(backend):
        y = module(**leaves, **extra)
    y = y[0] if isinstance(y, tuple) else y
    y64 = module64(**refs, **extra)
    y64 = y64[0] if isinstance(y64, tuple) else y64
    assert_close(y, y64, torch.float32, "output")
    assert y.requires_grad == (bool(trainable_inputs) or any(p.requires_grad for p in module.parameters()))
    if not y.requires_grad:
        return
    with deco_ops.use_backend(backend):
        y.backward(dy)
    y64.backward(dy.double())
    for name, t in leaves.items():
        if name in trainable_inputs:
            assert_close(t.grad, refs[name].grad, torch.float32, f"grad {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"
    for (name, got), want in zip(module.named_parameters(), module64.parameters()):
        if not got.requires_grad:
            assert got.grad is None, f"{name} is frozen but got a gradient"
        elif name.endswith("k_proj.bias") and want.grad.abs().max() < 1e-12:
            assert got.grad.abs().max() < 1e-5  # softmax ignores a shift shared by all keys
        else:
            assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


DECO_CONFIGS = [
    dict(order="pool_mlp", mode="average", bias=True, num_prefix_tokens=1),
    dict(order="mlp_pool", mode="average", bias=False, num_prefix_tokens=0),
    dict(order="pool_mlp", mode="bilinear", bias=True, num_prefix_tokens=0),
]


class _DeCo64(nn.Module):
    """DeCoProjector's computation in plain PyTorch on a float64 copy of its layers."""

    def __init__(self, proj: deco_ops.DeCoProjector):
        super().__init__()
        self.fc1, self.fc2 = copy.deepcopy(proj.fc1).double(), copy.deepcopy(proj.fc2).double()
        self.proj = [proj]  # its geometry; a list, so it is not registered as a child

    def forward(self, x):
        proj = self.proj[0]
        x = x[:, proj.num_prefix_tokens:]

        def pool(t):
            return torch.stack([loop64(ti, [proj.grid], [proj.out_grid], proj.mode) for ti in t])

        if proj.order == "mlp_pool":
            return pool(self.fc2(F.gelu(self.fc1(x))))
        return self.fc2(F.gelu(self.fc1(pool(x))))


def _deco_cases():
    """Layer-by-layer freezing (x, Linear "0", Linear "2"): every subset for the first config on
    the Triton backend, nothing / x / everything frozen for the others, all trainable on the default."""
    cases = []
    for i, config in enumerate(DECO_CONFIGS):
        name = f"{config['order']}-{config['mode']}-bias{config['bias']:d}-prefix{config['num_prefix_tokens']}"
        for frozen in subsets(("x", "0", "2")):
            if i == 0 or len(frozen) in (0, 3) or frozen == {"x"}:
                cases.append(pytest.param("triton", config, frozen, id=f"triton-{name}-frozen=" + (",".join(sorted(frozen)) or "none")))
        cases.append(pytest.param("auto", config, frozenset(), id=f"auto-{name}"))
    return cases


@pytest.mark.parametrize("backend,config,frozen", _deco_cases())
def test_deco_projector(backend, config, frozen):
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=GRID, out_grid=OUT_GRID, **config)
    prefix = config["num_prefix_tokens"]
    x = randn(B, prefix + math.prod(GRID), C)
    dy = randn(B, math.prod(OUT_GRID), OUT)
    trainable = set() if "x" in frozen else {"x"}
    _module_check(proj, _DeCo64(proj), {"x": x}, trainable, set(frozen) - {"x"}, {}, dy, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deco_projector_prefix_tokens_get_zero_gradient(backend):
    proj = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=GRID, out_grid=OUT_GRID, num_prefix_tokens=2)
    x = randn(B, 2 + math.prod(GRID), C).requires_grad_(True)
    with deco_ops.use_backend(backend):
        proj(x).backward(randn(B, math.prod(OUT_GRID), OUT))
    assert torch.equal(x.grad[:, :2], torch.zeros_like(x.grad[:, :2])) and x.grad[:, 2:].abs().min() > 0


E, HEADS = 32, 2


class _MHA64(nn.Module):
    """nn.MultiheadAttention in float64 holding a CrossAttention's weights."""

    def __init__(self, ours: deco_ops.CrossAttention):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=True, dtype=torch.float64)
        self.mha.load_state_dict(ours.state_dict())

    def forward(self, query, key, value, key_padding_mask, need_weights):
        return self.mha(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights)[0]


def _cross_attention_module_cases():
    """Every subset of (query, key, value) with a key_padding_mask on the Triton backend, plus
    everything without a mask and frozen parameters; everything, with and without, on the default."""
    cases = [pytest.param("triton", t, True, "trainable", id="triton-" + (",".join(sorted(t)) or "frozen") + "-mask")
             for t in subsets(("query", "key", "value"))]
    everything = frozenset(("query", "key", "value"))
    cases += [
        pytest.param("triton", everything, False, "trainable", id="triton-all-no_mask"),
        pytest.param("triton", everything, True, "frozen", id="triton-all-mask-params_frozen"),
        pytest.param("triton", frozenset(), False, "frozen", id="triton-nothing"),
        pytest.param("auto", everything, True, "trainable", id="auto-all-mask"),
        pytest.param("auto", everything, False, "trainable", id="auto-all-no_mask"),
    ]
    return cases


@pytest.mark.parametrize("backend,trainable,masked,params", _cross_attention_module_cases())
def test_cross_attention_module(backend, trainable, masked, params):
    torch.manual_seed(0)
    ours = deco_ops.CrossAttention(E, HEADS, batch_first=True)
    mha = _MHA64(ours)
    g = torch.Generator().manual_seed(1)
    inputs = {"query": randn(B, M, E, generator=g), "key": randn(B, N, E, generator=g), "value": randn(B, N, E, generator=g)}
    mask = (torch.arange(N)[None, :] % 3 == torch.tensor([1, 0])[:, None]) if masked else None  # holes, first key masked
    frozen = {"in_proj_weight", "in_proj_bias", "out_proj"} if params == "frozen" else set()
    extra = {"key_padding_mask": mask, "need_weights": False}
    _module_check(ours, mha, inputs, trainable, frozen, extra, randn(B, M, E, generator=g), backend)


@pytest.mark.parametrize("backend,x_grad,with_lens,params", [
    pytest.param("triton", True, True, "trainable", id="triton-x-kv_lens"),
    pytest.param("triton", False, True, "trainable", id="triton-x_frozen-kv_lens"),
    pytest.param("triton", True, False, "trainable", id="triton-x-no_kv_lens"),
    pytest.param("triton", True, True, "frozen", id="triton-x-kv_lens-params_frozen"),
    pytest.param("triton", False, False, "frozen", id="triton-nothing"),
    pytest.param("auto", True, True, "trainable", id="auto-x-kv_lens"),
])
def test_query_resampler(backend, x_grad, with_lens, params):
    torch.manual_seed(0)
    ours = deco_ops.QueryResampler(M, E, 24, HEADS)
    plain = PlainResampler(deco_ops.QueryResampler(M, E, 24, HEADS).double())
    plain.ours.load_state_dict(ours.state_dict())
    x = randn(B, N, 24)
    extra = {"kv_lens": torch.tensor(LENS) if with_lens else None}
    frozen = {name for name, _ in ours.named_children()} | {"queries"} if params == "frozen" else set()
    _module_check(ours, plain, {"x": x}, {"x"} if x_grad else set(), frozen, extra, randn(B, M, E), backend)
