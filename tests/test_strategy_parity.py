"""Every op, forced to each strategy on the Triton backend (the interpreter here, compiled kernels
on a GPU), agrees with float64 PyTorch, forward and every gradient; each forced strategy runs the
implementation it names (fused kernel or composed pieces), and ``auto`` under the interpreter runs
the fused kernels."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import deco_ops
from deco_ops import composed, composed_attention, reference, reference_attention
from deco_ops.kernels import activation_backward, adaptive_pool, cross_attention_fwd, gemm_act_grad, pool_gemm
from deco_ops.kernels import mlp_pool as mlp_pool_kernel
from harness import assert_close, guarded, leaf, poisoned_empty, randn
from test_cross_attention import _case as _attention_case
from test_cross_attention import _check as _check_attention
from test_cross_attention import _reference as _attention_reference
from test_cross_attention import _run as _run_attention
from test_packed import _mlp_params, loop64

# the fused kernels in every dtype are the other test files' subject; here each strategy once in
# fp32 and the composed pieces in the half types too
STRATEGY_DTYPES = [
    ("fused", torch.float32),
    ("composed", torch.float32),
    ("composed", torch.float16),
    ("composed", torch.bfloat16),
]
C, HIDDEN, OUT = 24, 40, 19
GRID, OUT_GRID = (4, 5), (2, 3)
GRIDS, OUT_GRIDS = [(4, 6), (3, 3)], [(2, 3), (2, 2)]


@pytest.fixture(autouse=True)
def triton_backend():
    with deco_ops.use_backend("triton"):
        yield


def _mlp64(x, w1, b1, w2, b2):
    return F.linear(reference.ACTIVATIONS["gelu"](F.linear(x, w1, b1)), w2, b2)


def _pool64(x, grid, out_grid):
    return reference.adaptive_avg_pool_tokens(x, grid, out_grid)


# op -> (deco_ops call on (x, w1, b1, w2, b2), float64 reference, x shape, dy rows)
OPS = {
    "adaptive_avg_pool_tokens": (
        lambda x, *w: deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID),
        lambda x, *w: _pool64(x, GRID, OUT_GRID),
        (2, math.prod(GRID), C), (2, math.prod(OUT_GRID), C),
    ),
    "pool_linear": (
        lambda x, w1, b1, w2, b2: deco_ops.pool_linear(x, w1, b1, grid=GRID, out_grid=OUT_GRID),
        lambda x, w1, b1, w2, b2: F.linear(_pool64(x, GRID, OUT_GRID), w1, b1),
        (1, math.prod(GRID), C), (1, math.prod(OUT_GRID), HIDDEN),
    ),
    "pool_mlp": (
        lambda *p: deco_ops.pool_mlp(*p, grid=GRID, out_grid=OUT_GRID),
        lambda x, *w: _mlp64(_pool64(x, GRID, OUT_GRID), *w),
        (1, math.prod(GRID), C), (1, math.prod(OUT_GRID), OUT),
    ),
    "mlp_pool": (
        lambda *p: deco_ops.mlp_pool(*p, grid=GRID, out_grid=OUT_GRID),
        lambda x, *w: _pool64(_mlp64(x, *w), GRID, OUT_GRID),
        (1, math.prod(GRID), C), (1, math.prod(OUT_GRID), OUT),
    ),
    "pool_mlp_packed": (
        lambda x, *w: deco_ops.pool_mlp_packed(x, torch.tensor(GRIDS), *w, out_grids=torch.tensor(OUT_GRIDS))[0],
        lambda x, *w: _mlp64(loop64(x, GRIDS, OUT_GRIDS, "average"), *w),
        (sum(map(math.prod, GRIDS)), C), (sum(map(math.prod, OUT_GRIDS)), OUT),
    ),
    "mlp_pool_packed": (
        lambda x, *w: deco_ops.mlp_pool_packed(x, torch.tensor(GRIDS), *w, out_grids=torch.tensor(OUT_GRIDS), mode="bilinear")[0],
        lambda x, *w: loop64(_mlp64(x, *w), GRIDS, OUT_GRIDS, "bilinear"),
        (sum(map(math.prod, GRIDS)), C), (sum(map(math.prod, OUT_GRIDS)), OUT),
    ),
}

# op -> (function the fused path launches, function only the composed path calls)
MARKERS = {
    "adaptive_avg_pool_tokens": ((adaptive_pool, "pool_tokens"), (reference, "adaptive_avg_pool_tokens")),
    "pool_linear": ((pool_gemm, "pool_gemm"), (composed, "pool_linear")),
    "pool_mlp": ((pool_gemm, "pool_gemm"), (composed, "pool_mlp")),
    "mlp_pool": ((pool_gemm, "pool_gemm_packed"), (composed, "mlp_pool")),
    "pool_mlp_packed": ((pool_gemm, "pool_gemm_packed"), (composed, "pool_mlp")),
    "mlp_pool_packed": ((pool_gemm, "pool_gemm_packed"), (composed, "mlp_pool")),
}
# backward: (fused kernel launcher, composed function)
BACKWARD_MARKERS = {
    "adaptive_avg_pool_tokens": ((adaptive_pool, "unpool_tokens"), (reference, "unpool_tokens")),
    "pool_mlp": ((gemm_act_grad, "gemm_act_grad"), (activation_backward, "activation_backward")),
    "pool_mlp_packed": ((gemm_act_grad, "gemm_act_grad"), (activation_backward, "activation_backward")),
    "mlp_pool": ((mlp_pool_kernel, "gemm_unpool_act_grad"), (composed, "mlp_pool_act_backward")),
    "mlp_pool_packed": ((mlp_pool_kernel, "gemm_unpool_act_grad"), (composed, "mlp_pool_act_backward")),
}


def _spies(op):
    """Mocks wrapping each path's marker function, by (direction, strategy)."""
    paths = {("fwd", "fused"): MARKERS[op][0], ("fwd", "composed"): MARKERS[op][1]}
    if op in BACKWARD_MARKERS:
        paths[("bwd", "fused")], paths[("bwd", "composed")] = BACKWARD_MARKERS[op]
    return {k: mock.patch.object(module, fn, wraps=getattr(module, fn)) for k, (module, fn) in paths.items()}


@pytest.mark.parametrize("strategy,dtype", STRATEGY_DTYPES, ids=[f"{s}-{str(d)[6:]}" for s, d in STRATEGY_DTYPES])
@pytest.mark.parametrize("op", list(OPS))
def test_projector_strategies_agree(op, strategy, dtype, device):
    call, ref_fn, x_shape, dy_shape = OPS[op]
    gen = torch.Generator().manual_seed(1)
    x = randn(*x_shape, dtype=dtype, generator=gen)
    weights = _mlp_params(C, HIDDEN, OUT, dtype, seed=2)
    dy = randn(*dy_shape, dtype=dtype, generator=gen)
    params = [p.to(device) for p in (x, *weights)]
    leaves = [leaf(guarded(p)) for p in params]
    spies = _spies(op)
    mocks = {k: p.start() for k, p in spies.items()}
    try:
        with deco_ops.use_strategy(strategy), poisoned_empty():
            y = call(*leaves)
            y.backward(guarded(dy.to(device)))
    finally:
        for p in spies.values():
            p.stop()
    other = "composed" if strategy == "fused" else "fused"
    for direction in ("fwd", "bwd"):
        if (direction, strategy) in mocks:
            assert mocks[(direction, strategy)].called, f"{direction}: the {strategy} path did not run"
            assert not mocks[(direction, other)].called, f"{direction}: the {other} path ran under {strategy}"
    ref = [leaf(p, torch.float64) for p in (x, *weights)]
    y64 = ref_fn(*ref)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        if want.grad is not None:
            assert_close(got.grad, want.grad, dtype, f"grad {name}")


def test_composed_pool_mlp_packed_resamples_by_its_mode(device):
    """The composed twin of ``pool_mlp_packed`` pools by the call's mode (the parity test above
    pools by average): bilinear, forward and every gradient, against float64."""
    gen = torch.Generator().manual_seed(7)
    x = randn(sum(map(math.prod, GRIDS)), C, generator=gen)
    dy = randn(sum(map(math.prod, OUT_GRIDS)), OUT, generator=gen)
    params = [x, *_mlp_params(C, HIDDEN, OUT, torch.float32, seed=8)]
    leaves = [leaf(guarded(p.to(device))) for p in params]
    with mock.patch.object(composed, "pool_mlp", wraps=composed.pool_mlp) as twin, deco_ops.use_strategy("composed"), poisoned_empty():
        y, _ = deco_ops.pool_mlp_packed(leaves[0], torch.tensor(GRIDS), *leaves[1:], out_grids=torch.tensor(OUT_GRIDS), mode="bilinear")
        y.backward(guarded(dy.to(device)))
    assert twin.called
    ref = [leaf(p, torch.float64) for p in params]
    y64 = _mlp64(loop64(ref[0], GRIDS, OUT_GRIDS, "bilinear"), *ref[1:])
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op", ["pool_mlp", "pool_mlp_packed"])
def test_aten_activation_backward_candidate(op, dtype, device):
    """``composed_aten``: the MLP backward's activation step in ATen's kernels after cuBLAS, where
    ``composed`` runs our elementwise pass and ``fused`` the act' GEMM; forward and every gradient
    against float64. The op's other steps take their composed twins (it names no other kernel)."""
    call, ref_fn, x_shape, dy_shape = OPS[op]
    gen = torch.Generator().manual_seed(5)
    x, dy = randn(*x_shape, dtype=dtype, generator=gen), randn(*dy_shape, dtype=dtype, generator=gen)
    params = [x, *_mlp_params(C, HIDDEN, OUT, dtype, seed=6)]
    leaves = [leaf(guarded(p.to(device))) for p in params]
    with mock.patch.object(reference, "mlp_activation_backward", wraps=reference.mlp_activation_backward) as aten, \
            mock.patch.object(activation_backward, "activation_backward") as ours, \
            mock.patch.object(gemm_act_grad, "gemm_act_grad") as act_grad_gemm, \
            deco_ops.use_strategy("composed_aten"), poisoned_empty():
        y = call(*leaves)
        y.backward(guarded(dy.to(device)))
    assert aten.call_count == 1 and not ours.called and not act_grad_gemm.called
    ref = [leaf(p, torch.float64) for p in params]
    ref_fn(*ref).backward(dy.double())
    assert_close(y, ref_fn(*[r.detach() for r in ref]), dtype, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, dtype, f"grad {name}")


ATTENTION_CASES = [
    pytest.param(2, 1, 17, 37, 2, 64, [37, 0], id="shared-q-lens-with-empty-batch"),
    pytest.param(2, 2, 5, 9, 1, 32, None, id="per-batch-q-no-mask"),
]


@pytest.mark.parametrize("strategy,dtype", STRATEGY_DTYPES, ids=[f"{s}-{str(d)[6:]}" for s, d in STRATEGY_DTYPES])
@pytest.mark.parametrize("B,Bq,M,N,H,D,lens", ATTENTION_CASES)
def test_attention_strategies_agree(strategy, dtype, B, Bq, M, N, H, D, lens, device):
    q, k, v, dout, kv_lens = (t if t is None else t.to(device) for t in _attention_case(B, Bq, M, N, H, D, lens, dtype))
    with deco_ops.use_strategy(strategy), \
            mock.patch.object(composed_attention, "forward", wraps=composed_attention.forward) as sdpa_fwd, \
            mock.patch.object(composed_attention, "backward", wraps=composed_attention.backward) as sdpa_bwd, \
            mock.patch.object(composed_attention, "cpu_kernel", wraps=composed_attention.cpu_kernel) as cpu_kernel, \
            mock.patch.object(cross_attention_fwd, "cross_attention_fwd", wraps=cross_attention_fwd.cross_attention_fwd) as kernel:
        got = _run_attention(q, k, v, dout, kv_lens)
    # composed, dense, on CPU: SDPA's CPU op whole, its own node's backward (tests/test_host_path.py)
    whole = strategy != "fused" and device.type == "cpu" and kv_lens is None
    assert (sdpa_fwd.called, sdpa_bwd.called, kernel.called) == ((False, False, True) if strategy == "fused" else (not whole, not whole, False))
    assert cpu_kernel.called == (strategy != "fused" and device.type == "cpu")
    _check_attention(got, _attention_reference(q, k, v, dout, kv_lens), dtype, kv_lens, N)


def test_attention_composed_packed_keys(device):
    """Packed keys (cu_seqlens_k) through SDPA: unpacked to a padded batch and gradients packed back."""
    lens = [7, 0, 4]
    H, D, M = 2, 16, 3
    g = torch.Generator().manual_seed(3)
    q = randn(1, M, H, D, generator=g).to(device)
    k, v = (randn(sum(lens) + 2, H, D, generator=g).to(device) for _ in range(2))  # 2 rows no batch owns
    dout = randn(len(lens), M, H, D, generator=g).to(device)
    cu = torch.tensor([0, 7, 7, 11], dtype=torch.int32, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with deco_ops.use_strategy("composed"), \
            mock.patch.object(composed_attention, "forward", wraps=composed_attention.forward) as sdpa:
        deco_ops.cross_attention(*leaves, cu_seqlens_k=cu).backward(dout)
    assert sdpa.called
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kp, kv_lens, _ = reference_attention.unpack_keys(ref[1], cu, max(lens))
    vp, _, _ = reference_attention.unpack_keys(ref[2], cu, max(lens))
    reference_attention.attention_dense(ref[0], kp, vp, kv_lens).backward(dout.double())
    for got, want in zip(leaves, ref):
        assert_close(got.grad, want.grad, torch.float32)
    assert torch.equal(leaves[1].grad[11:], torch.zeros_like(leaves[1].grad[11:]))


def test_dropout_keeps_the_fused_path(device):
    """SDPA cannot reproduce the Philox mask: forcing composed with dropout still runs the kernels."""
    q, k, v = (t.to(device) for t in _attention_case(2, 1, 4, 8, 1, 16, None, torch.float32)[:3])
    with deco_ops.use_strategy("composed"), \
            mock.patch.object(composed_attention, "forward", wraps=composed_attention.forward) as sdpa, \
            mock.patch.object(cross_attention_fwd, "cross_attention_fwd", wraps=cross_attention_fwd.cross_attention_fwd) as kernel:
        deco_ops.cross_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(0))
    assert kernel.called and not sdpa.called


@pytest.mark.skipif(not deco_ops._backend.interpreting(), reason="the interpreter's auto rule")
def test_auto_under_the_interpreter_runs_the_kernels(monkeypatch):
    monkeypatch.delenv(deco_ops.strategy.ENV_VAR, raising=False)
    x = randn(1, 4, 8)
    w = randn(5, 8)
    with mock.patch.object(pool_gemm, "pool_gemm", wraps=pool_gemm.pool_gemm) as kernel:
        deco_ops.pool_linear(x, w, grid=(2, 2), out_grid=(1, 1))
    assert kernel.called


def test_torch_backend_auto_is_sdpa_and_fused_is_the_chunked_reference():
    """On the PyTorch backend ``auto`` runs SDPA's kernels; forcing ``fused`` runs the chunked
    online-softmax reference (the tests' oracle), and both agree."""
    q, k, v, dout, kv_lens = _attention_case(2, 1, 3, 20, 2, 8, [20, 5], torch.float32)
    results = {}
    for strategy in ("auto", "fused"):
        with deco_ops.use_backend("torch"), deco_ops.use_strategy(strategy), \
                mock.patch.object(composed_attention, "forward", wraps=composed_attention.forward) as sdpa, \
                mock.patch.object(reference_attention, "attention_fwd", wraps=reference_attention.attention_fwd) as chunked:
            results[strategy] = _run_attention(q, k, v, dout, kv_lens)
        assert (sdpa.called, chunked.called) == ((True, False) if strategy == "auto" else (False, True))
    _check_attention(results["auto"], results["fused"], torch.float32, kv_lens, 20)


def test_composed_attention_copies_only_what_sdpa_cannot_read():
    """The memory-efficient CUDA kernel needs 16-byte aligned starts and strides (the first GPU run:
    "p.query_ptr is not correctly aligned" for inputs that start mid-buffer, as the suite's
    NaN-padded inputs do); aligned tensors pass through untouched."""
    buffer = torch.randn(4 * 9 * 2 * 32 + 1, dtype=torch.bfloat16)
    aligned = buffer[:-1].view(4, 9, 2, 32)
    assert composed_attention._aligned(aligned) is aligned
    shifted = buffer[1:].view(4, 9, 2, 32)  # starts 2 bytes into the buffer
    fixed = composed_attention._aligned(shifted)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, shifted)
    odd_rows = torch.randn(4, 9, 2, 36, dtype=torch.bfloat16)[..., :32]  # rows 72 bytes apart
    fixed = composed_attention._aligned(odd_rows)
    assert fixed.is_contiguous() and torch.equal(fixed, odd_rows)
    expanded = aligned[:1].expand(4, -1, -1, -1)  # shared queries: a stride-0 batch is fine
    assert composed_attention._aligned(expanded) is expanded
