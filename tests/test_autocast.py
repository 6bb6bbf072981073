"""Every public op and module inside ``torch.autocast(<the suite's device>, dtype=bf16/fp16)`` with fp32 inputs
and parameters, on the Triton kernels (interpreter) and the default backend, against the same
computation written with eager PyTorch ops (``F.linear``, ``F.adaptive_avg_pool2d``, SDPA,
``nn.MultiheadAttention``):

* the output has the dtype eager PyTorch gives under the same autocast (bf16/fp16 for the GEMM
  and attention ops, the input's dtype for pooling alone);
* values and gradients match a float64 reference computed from the inputs rounded as autocast
  rounds them, within the autocast dtype's tolerance (or twice eager autocast's own error);
* every gradient has its leaf's dtype: fp32 parameters get fp32 gradients;
* ``torch.compile`` under autocast gives eager's dtypes and values.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deco_ops
from deco_ops import _autocast, _direct, _plan
from harness import DEVICE, assert_close, randn
from test_attention_modules import PlainResampler

GRID, OUT_GRID = (4, 6), (3, 4)
GRIDS, OUT_GRIDS = [(4, 6), (3, 3)], [(2, 3), (2, 2)]
C, HIDDEN, OUT = 16, 24, 8


def _gelu_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _pool(x, grid, out_grid, mode="average"):
    """(B, N, C) tokens -> (B, P, C) with F.adaptive_avg_pool2d / F.interpolate (eager PyTorch)."""
    img = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)
    if mode == "average":
        out = F.adaptive_avg_pool2d(img, out_grid)
    else:
        out = F.interpolate(img, size=out_grid, mode="bilinear", align_corners=False)
    return out.flatten(2).transpose(1, 2)


def _pool_packed(x, mode="average"):
    sizes = [math.prod(g) for g in GRIDS]
    return torch.cat([_pool(xi[None], g, o, mode)[0] for xi, g, o in zip(x.split(sizes), GRIDS, OUT_GRIDS)])


def _lens_mask(kv_lens, N):
    return (torch.arange(N, device=kv_lens.device)[None, :] < kv_lens[:, None])[:, None, None, :]


def _sdpa(q, k, v, kv_lens):
    """(B, M, H, D) layout through F.scaled_dot_product_attention with a key mask."""
    q, k, v = (t.transpose(1, 2) for t in (q.expand(k.shape[0], -1, -1, -1), k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_lens_mask(kv_lens, k.shape[2])).transpose(1, 2)


def _packed_keys(kv):
    """(B, N, H, D) right-padded keys with lengths KV_LENS -> packed (total_N, H, D)."""
    return torch.cat([kv[b, :n] for b, n in enumerate(KV_LENS.tolist())])


KV_LENS = torch.tensor([9, 4])
CU_SEQLENS = torch.tensor([0, 9, 13], dtype=torch.int32)


def _ops(device="cpu"):
    """name -> (deco_ops callable, eager PyTorch callable, input shapes); both take the same tensors."""
    kv_lens, cu_seqlens = KV_LENS.to(device), CU_SEQLENS.to(device)
    mlp = [(HIDDEN, C), (HIDDEN,), (OUT, HIDDEN), (OUT,)]
    tokens, packed = (2, math.prod(GRID), C), (sum(math.prod(g) for g in GRIDS), C)
    grids, out_grids = torch.tensor(GRIDS), torch.tensor(OUT_GRIDS)
    qkv = [(1, 3, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8)]
    return {
        "adaptive_avg_pool_tokens": (
            lambda x: deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID),
            lambda x: _pool(x, GRID, OUT_GRID),
            [tokens],
        ),
        "bilinear_pool_tokens": (
            lambda x: deco_ops.bilinear_pool_tokens(x, GRID, OUT_GRID),
            lambda x: _pool(x, GRID, OUT_GRID, "bilinear"),
            [tokens],
        ),
        "adaptive_avg_pool_tokens_packed": (
            lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)[0],
            _pool_packed,
            [packed],
        ),
        "pool_linear": (
            lambda x, w, b: deco_ops.pool_linear(x, w, b, grid=GRID, out_grid=OUT_GRID),
            lambda x, w, b: F.linear(_pool(x, GRID, OUT_GRID), w, b),
            [tokens, (OUT, C), (OUT,)],
        ),
        "pool_mlp": (
            lambda x, *p: deco_ops.pool_mlp(x, *p, grid=GRID, out_grid=OUT_GRID),
            lambda x, *p: _gelu_mlp(_pool(x, GRID, OUT_GRID), *p),
            [tokens, *mlp],
        ),
        "mlp_pool": (
            lambda x, *p: deco_ops.mlp_pool(x, *p, grid=GRID, out_grid=OUT_GRID),
            lambda x, *p: _pool(_gelu_mlp(x, *p), GRID, OUT_GRID),
            [tokens, *mlp],
        ),
        "pool_mlp_packed": (
            lambda x, *p: deco_ops.pool_mlp_packed(x, grids, *p, out_grids=out_grids)[0],
            lambda x, *p: _gelu_mlp(_pool_packed(x), *p),
            [packed, *mlp],
        ),
        "mlp_pool_packed": (
            lambda x, *p: deco_ops.mlp_pool_packed(x, grids, *p, out_grids=out_grids, mode="bilinear")[0],
            lambda x, *p: _pool_packed(_gelu_mlp(x, *p), "bilinear"),
            [packed, *mlp],
        ),
        "cross_attention": (
            lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=kv_lens),
            lambda q, k, v: _sdpa(q, k, v, kv_lens),
            qkv,
        ),
        "cross_attention_packed": (
            lambda q, k, v: deco_ops.cross_attention(q, _packed_keys(k), _packed_keys(v), cu_seqlens_k=cu_seqlens),
            lambda q, k, v: _sdpa(q, k, v, kv_lens),
            qkv,
        ),
    }


class Call(nn.Module):
    """``fn(inner, *inputs)`` as a module whose parameters are ``inner``'s, under ``inner.``."""

    def __init__(self, inner: nn.Module, fn):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, *inputs):
        return self.fn(self.inner, *inputs)


def _attend(m, q, kv):
    return m(q, kv, kv, need_weights=False)[0]


def _modules():
    """name -> (deco_ops module, its eager PyTorch twin with the same parameter names and values, input shapes)."""
    torch.manual_seed(0)
    projector = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=GRID, out_grid=OUT_GRID)
    llava = nn.Sequential(nn.Linear(C, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))
    llava.load_state_dict(projector.state_dict())
    attention = deco_ops.CrossAttention(16, 2, batch_first=True, add_bias_kv=True)
    mha = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
    mha.load_state_dict(attention.state_dict())
    resampler = deco_ops.QueryResampler(3, 16, 12, 2)
    return {
        "DeCoProjector": (
            Call(projector, lambda m, x: m(x)),
            Call(llava, lambda m, x: m(_pool(x, GRID, OUT_GRID))),
            [(2, math.prod(GRID), C)],
        ),
        "CrossAttention": (Call(attention, _attend), Call(mha, _attend), [(2, 3, 16), (2, 9, 16)]),
        "QueryResampler": (
            Call(resampler, lambda m, x: m(x)),
            Call(copy.deepcopy(resampler), lambda m, x: PlainResampler(m)(x)),
            [(2, 9, 12)],
        ),
    }


def _rounded64(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).double().requires_grad_(True)


def _run(fn, leaves, dout_seed=5):
    out = fn(*leaves)
    g = torch.Generator().manual_seed(dout_seed)
    out.backward(randn(*out.shape, generator=g).to(out.device, out.dtype))
    return out.detach(), [t.grad for t in leaves]


# bf16 for every op; fp16 (the region's dtype, not one fixed at registration) for a GEMM and attention
OP_CASES = [(name, torch.bfloat16) for name in _ops()] + [("pool_mlp", torch.float16), ("cross_attention", torch.float16)]


@pytest.mark.parametrize("name,dtype", OP_CASES, ids=str)
def test_op_under_autocast(backend, name, dtype):
    _check_op(name, dtype, DEVICE.type)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.autocast('cuda') over the compiled kernels")
def test_every_op_under_cuda_autocast():
    for name in _ops():
        for dtype in (torch.bfloat16, torch.float16):
            _check_op(name, dtype, "cuda")


POOL_ONLY = ("adaptive_avg_pool_tokens", "bilinear_pool_tokens", "adaptive_avg_pool_tokens_packed")


def _check_op(name, dtype, device):
    """The GEMM/attention ops take tokens (or queries) in the autocast dtype, as from a vision
    tower run under autocast, with fp32 weights, biases, keys and values, and give the autocast
    dtype. Pooling alone takes fp32 tokens and keeps fp32, as F.adaptive_avg_pool2d does."""
    deco_fn, eager_fn, shapes = _ops(device)[name]
    expected = torch.float32 if name in POOL_ONLY else dtype
    g = torch.Generator().manual_seed(0)
    inputs = [
        randn(*s, generator=g, scale=0.5, dtype=expected if i == 0 else torch.float32).to(device) for i, s in enumerate(shapes)
    ]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    eager_leaves = [t.clone().requires_grad_(True) for t in inputs]
    with torch.autocast(device, dtype=dtype):
        out, grads = _run(deco_fn, leaves)
        eager, eager_grads = _run(eager_fn, eager_leaves)
    # float64 reference on the inputs as autocast rounds them
    ref, ref_grads = _run(eager_fn, [_rounded64(t, expected) for t in inputs])

    assert out.dtype == expected, f"{name}: {out.dtype} under autocast, expected {expected}"
    if device == "cpu":  # on CUDA eager F.interpolate runs in fp32 under autocast, so mlp_pool's twin does
        assert eager.dtype == expected, f"{name}: eager PyTorch gives {eager.dtype} under autocast"
    assert_close(out, ref, expected, f"{name} output", eager=eager)
    for i, (got, want, eager_grad) in enumerate(zip(grads, ref_grads, eager_grads)):
        assert got.dtype == inputs[i].dtype == eager_grad.dtype, f"{name}: grad of input {i} is {got.dtype}"
        assert_close(got, want, expected, f"{name} grad of input {i}", eager=eager_grad)


@pytest.mark.parametrize("name", list(_modules()))
def test_module_under_autocast(backend, name, dtype=torch.bfloat16):
    """fp32 modules and inputs (a model trained with autocast): fp32 parameter gradients."""
    ours, eager, shapes = _modules()[name]
    twin64 = copy.deepcopy(eager).double()
    with torch.no_grad():
        for p in twin64.parameters():
            p.copy_(p.to(dtype))
    g = torch.Generator().manual_seed(0)
    inputs = [randn(*s, generator=g) for s in shapes]
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, _ = _run(ours, [t.clone().requires_grad_(True) for t in inputs])
        eager_out, _ = _run(eager, [t.clone().requires_grad_(True) for t in inputs])
    ref, _ = _run(twin64, [_rounded64(t, dtype) for t in inputs])

    assert out.dtype == eager_out.dtype == dtype
    assert_close(out, ref, dtype, f"{name} output", eager=eager_out)
    params, eager_params, ref_params = (dict(m.named_parameters()) for m in (ours, eager, twin64))
    assert set(params) == set(eager_params) == set(ref_params)
    for key, p in params.items():
        assert p.grad.dtype == torch.float32, f"{name}.{key}: gradient in {p.grad.dtype}"
        if key == "inner.k_proj.bias":  # softmax ignores a shift shared by all keys: exactly 0, rounding noise here
            continue
        assert_close(p.grad, ref_params[key].grad, dtype, f"{name}.{key} grad", eager=eager_params[key].grad)


def _masked_attention(device="cpu"):
    """Attention with the masks whose dtype the public function sets (a bool mask becomes an fp32
    bias there, a float one is cast) and with the weights: name -> (callable, input shapes)."""
    keep = torch.tensor([[True] * 6 + [False] * 3, [False, True] * 4 + [True]], device=device)[:, None, None, :]
    bias = randn(2, 2, 3, 9, generator=torch.Generator().manual_seed(3)).to(device)
    qkv = [(2, 3, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8)]
    return {
        "cross_attention_bool_mask": (lambda q, k, v: deco_ops.cross_attention(q, k, v, attn_mask=keep), qkv),
        "cross_attention_float_mask": (lambda q, k, v: deco_ops.cross_attention(q, k, v, attn_mask=bias), qkv),
        "cross_attention_weights": (
            lambda q, k, v: torch.cat([t.flatten() for t in deco_ops.cross_attention(q, k, v, attn_mask=keep, need_weights=True)]),
            qkv,
        ),
    }


def _merges(device="cpu"):
    """The patch-merge projectors, whose norm weights autocast casts too: name -> (callable, input shapes)."""
    grids = torch.tensor([[4, 4], [2, 4]])
    mlp = [(HIDDEN, 4 * C), (HIDDEN,), (OUT, HIDDEN), (OUT,)]
    return {
        "merge_mlp": (lambda x, nw, nb, *p: deco_ops.merge_mlp(x, nw, nb, *p), [(2, 16, C), (C,), (C,), *mlp]),
        "merge_mlp_grid_rmsnorm_post": (
            lambda x, nw, *p: deco_ops.merge_mlp(x, nw, None, *p, grid=(4, 4), order="grid", norm="rmsnorm", norm_position="post"),
            [(2, 16, C), (4 * C,), *mlp],
        ),
        "merge_mlp_packed": (lambda x, nw, nb, *p: deco_ops.merge_mlp_packed(x, grids, nw, nb, *p)[0], [(24, C), (C,), (C,), *mlp]),
    }


def _plain_call_cases(device="cpu"):
    ops = {name: (fn, shapes) for name, (fn, _, shapes) in _ops(device).items()}
    return {**ops, **_masked_attention(device), **_merges(device)}


@pytest.mark.parametrize("name", list(_plain_call_cases()))
def test_autocast_calls_run_as_plain_calls(backend, name, monkeypatch):
    """A call that would be plain eager but for its autocast region runs as the plain call of its
    cast arguments: the public function's plan (``_autocast.plain_call``), or where that declines,
    the op's own ``under_autocast`` (``deco_ops._direct``); neither crosses the dispatcher, forward
    or backward. Both give, bit for bit, what the dispatcher's autocast kernels give: the same
    casts of the same tensors, then the same implementation."""
    deco_fn, shapes = _plain_call_cases(DEVICE.type)[name]
    g = torch.Generator().manual_seed(0)
    inputs = [randn(*s, generator=g, scale=0.5).to(DEVICE) for s in shapes]

    def run():
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return _run(deco_fn, leaves)

    answers = []

    def plain_call(*args, real=_autocast.plain_call, **kwargs):
        answers.append(real(*args, **kwargs))
        return answers[-1]

    dispatched = property(lambda op: pytest.fail(f"{name}: deco::{op.name} went through the dispatcher"))
    with monkeypatch.context() as patch:
        patch.setattr(_direct.Op, "overload", dispatched)
        patch.setattr(_autocast, "plain_call", plain_call)
        planned = run()
        # the outer call's answer comes last (a call inside it without a plan, packed keys, asks too: NOT_PLAIN)
        assert answers and answers[-1] is not _autocast.NOT_PLAIN, f"{name}: not run as a plain call"
        patch.setattr(_autocast, "plain_call", lambda *args, **kwargs: _autocast.NOT_PLAIN)
        op_level = run()
    monkeypatch.setattr(_plan, "plain_but_autocast", lambda args: False)
    out, grads = run()
    for path, (got, got_grads) in (("plan", planned), ("deco op", op_level)):
        assert got.dtype == out.dtype and torch.equal(got, out), f"{name}: {path} output"
        for i, (a, b) in enumerate(zip(got_grads, grads)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {path} grad of input {i}"


def test_autocast_refusals_name_the_arguments_as_given():
    """A call refused after its casts (a float64 x meets weights autocast casts to bf16) takes the
    full path, whose checks name the dtypes the caller passed, not the cast ones. A float8 input,
    which autocast's rule would cast, is refused as outside autocast (and as under torch.compile)."""
    x, w = torch.randn(1, 24, C, dtype=torch.float64), torch.randn(OUT, C)
    with deco_ops.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):  # the backend that takes float64
        with pytest.raises(TypeError, match="w has dtype torch.float32 but x has torch.float64"):
            deco_ops.pool_linear(x, w, grid=GRID, out_grid=OUT_GRID)
        with pytest.raises(TypeError, match="x has dtype torch.float8_e4m3fn"):
            deco_ops.pool_linear(x.to(torch.float8_e4m3fn), w, grid=GRID, out_grid=OUT_GRID)
        # the arguments autocast casts to float32 for merge_mlp's norm: float8 stays float8 there too
        tokens, nw, w1, w2 = torch.randn(1, 16, C), torch.randn(C), torch.randn(HIDDEN, 4 * C), torch.randn(OUT, HIDDEN)
        for name, args in (("x", (tokens.to(torch.float8_e4m3fn), nw)), ("norm_weight", (tokens, nw.to(torch.float8_e4m3fn)))):
            with pytest.raises(TypeError, match=f"{name} has dtype torch.float8_e4m3fn"):
                deco_ops.merge_mlp(*args, None, w1, None, w2, None)
        # merge_mlp's norm runs in float32 in a region, but float64 tokens stay float64 (as in F.layer_norm): a
        # float32 norm weight beside them is refused by name, the MLP float64 too
        w1, w2 = torch.randn(8, 4 * C, dtype=torch.float64), torch.randn(OUT, 8, dtype=torch.float64)
        with pytest.raises(TypeError, match="norm_weight has dtype torch.float32 but x has torch.float64"):
            deco_ops.merge_mlp(x, torch.randn(C), None, w1, None, w2, None)


def test_autocast_errors_of_the_run_propagate_once(monkeypatch):
    """Only the checks' refusals fall back to the full path: an error raised while a planned call
    runs (after its checks, maybe after launches and a dropout seed drawn) propagates at once, the
    call not run a second time."""
    from deco_ops import composed_attention

    q, k = torch.randn(2, 3, 2, 8), torch.randn(2, 9, 2, 8)
    runs = []

    def failing(*args, **kwargs):
        runs.append(args)
        raise ValueError("the run failed")

    with deco_ops.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        deco_ops.cross_attention(q, k, k.clone())  # the plan, built (SDPA's CPU kernel)
        monkeypatch.setattr(composed_attention, "cpu_kernel", failing)
        with pytest.raises(ValueError, match="the run failed"):
            deco_ops.cross_attention(q, k, k.clone())
    assert len(runs) == 1


def test_every_op_declares_its_autocast_rule():
    """A new ``torch.ops.deco`` op must be classified in ``deco_ops._autocast`` (GEMM/attention ops
    run in the autocast dtype, the rest in their inputs' dtype), on CPU and CUDA."""
    ops = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("deco::")}
    assert ops == set(_autocast.LOWER_PRECISION) | set(_autocast.OWN_DTYPE)
    for op in ops:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deco::{op}", key), (op, key)


def test_mixed_dtypes_refused_outside_autocast():
    x, w = torch.randn(1, 24, C, dtype=torch.bfloat16), torch.randn(OUT, C)
    with pytest.raises(TypeError, match="w has dtype torch.float32 but x has torch.bfloat16"):
        deco_ops.pool_linear(x, w, grid=GRID, out_grid=OUT_GRID)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert deco_ops.pool_linear(x, w, grid=GRID, out_grid=OUT_GRID).dtype == torch.bfloat16
        with pytest.raises(TypeError, match="w has dtype torch.float64"):  # autocast leaves float64 alone
            deco_ops.pool_linear(x, w.double(), grid=GRID, out_grid=OUT_GRID)


def test_autocast_leaves_float64_alone():
    """As for nn.Linear: float64 inputs stay float64 inside an autocast region (PyTorch backend on
    CPU tensors; the Triton kernels take no float64 outside the interpreter's gradchecks)."""
    with torch.device("cpu"), deco_ops.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        x, w = torch.randn(1, 24, C, dtype=torch.float64), torch.randn(OUT, C, dtype=torch.float64)
        assert deco_ops.pool_linear(x, w, grid=GRID, out_grid=OUT_GRID).dtype == torch.float64


def _dense_model(projector, attention, x, q, kv):
    """A compiled region using every dense op and both modules."""
    tokens = projector(x)
    pooled = deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID) + deco_ops.bilinear_pool_tokens(x, GRID, OUT_GRID)
    w1, b1, w2, b2 = projector.fc1.weight, projector.fc1.bias, projector.fc2.weight, projector.fc2.bias
    lin = deco_ops.pool_linear(x, w1, b1, grid=GRID, out_grid=OUT_GRID)
    mlp = deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID)
    heads = q.view(2, 3, 2, 8)
    att = deco_ops.cross_attention(heads, kv.view(2, 9, 2, 8), kv.view(2, 9, 2, 8), kv_lens=KV_LENS)
    return tokens, pooled, lin, mlp, att, attention(q, kv, kv, need_weights=False)[0]


def test_torch_compile_under_autocast_matches_eager():
    """Inside ``torch.compile`` the ops give eager's dtypes under autocast, and the same values
    and fp32 parameter gradients. ``aot_eager`` traces exactly what Inductor receives (Dynamo's
    graph, the fake implementations, the autocast casts) at a fraction of the compile time. On
    the default backend, whose reference path inside the ops would follow autocast on its own:
    the Triton kernels' dtypes under autocast are checked eagerly above."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    projector = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=GRID, out_grid=OUT_GRID)
    attention = deco_ops.CrossAttention(16, 2, batch_first=True)
    g = torch.Generator().manual_seed(0)
    inputs = [randn(2, math.prod(GRID), C, generator=g), randn(2, 3, 16, generator=g), randn(2, 9, 16, generator=g)]
    compiled = torch.compile(_dense_model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_dense_model, compiled):
        projector.zero_grad()
        attention.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16), deco_ops.use_backend("auto"):
            outs = fn(projector, attention, *inputs)
        sum(o.float().square().sum() for o in outs).backward()
        grads = [p.grad.clone() for p in (*projector.parameters(), *attention.parameters())]
        results.append(([o.detach() for o in outs], grads))
    (eager_outs, eager_grads), (comp_outs, comp_grads) = results
    assert [o.dtype for o in comp_outs] == [o.dtype for o in eager_outs]
    assert [o.dtype for o in eager_outs] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16]
    for got, want in zip(comp_outs + comp_grads, eager_outs + eager_grads):
        assert got.dtype == want.dtype
        assert_close(got, want, torch.bfloat16)
