"""Hardening of the pooling ops and the DeCo projector: fuzzed parity and strides (on the Triton
kernels, through the interpreter on a CPU, and on the default backend), determinism, NaN
propagation and 64-bit offsets (on the Triton kernels)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deco_ops
from deco_ops import reference
from fuzz import BACKENDS, dtypes, examples, grid_pairs, lay_out, layouts
from harness import assert_close, guarded, poisoned_empty, randn

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture
def triton_backend():
    with deco_ops.use_backend("triton"):
        yield


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(6)  # up to ~20 s each through the interpreter (1600 tokens x 300 channels); --runslow runs 60
@given(grids=grid_pairs(), B=st.integers(0, 5), C=st.integers(1, 300), dtype=dtypes, layout=layouts, seed=st.integers(0, 2**16))
def test_fuzz_pool(backend_name, grids, B, C, dtype, layout, seed):
    grid, out_grid = grids
    g = torch.Generator().manual_seed(seed)
    x = lay_out(randn(B, math.prod(grid), C, dtype=dtype, generator=g), layout).requires_grad_(True)
    dy = randn(B, math.prod(out_grid), C, dtype=dtype, generator=g)
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y = deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid)
        (dx,) = torch.autograd.grad(y, x, guarded(dy)) if B else (torch.zeros_like(x),)
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.adaptive_avg_pool_tokens(x64, grid, out_grid)
    assert_close(y, y64, dtype, "pooled")
    if B:
        (dx64,) = torch.autograd.grad(y64, x64, dy.double())
        assert_close(dx, dx64, dtype, "grad x")


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(8)
@given(
    grids=grid_pairs(max_side=16, max_tokens=300),
    B=st.integers(0, 5),
    C=st.integers(1, 80),
    hidden=st.integers(1, 96),
    out=st.integers(1, 80),
    bias=st.booleans(),
    activation=st.sampled_from(["gelu", "gelu_tanh", "silu"]),
    dtype=dtypes,
    layout=layouts,
    seed=st.integers(0, 2**16),
)
def test_fuzz_pool_mlp(backend_name, grids, B, C, hidden, out, bias, activation, dtype, layout, seed):
    grid, out_grid = grids
    g = torch.Generator().manual_seed(seed)
    x = lay_out(randn(B, math.prod(grid), C, dtype=dtype, generator=g), layout)
    params = [
        randn(hidden, C, dtype=dtype, scale=C**-0.5, generator=g),
        randn(hidden, dtype=dtype, generator=g) if bias else None,
        randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=g),
        randn(out, dtype=dtype, generator=g) if bias else None,
    ]
    leaves = [t.requires_grad_(True) if t is not None else None for t in [x, *params]]
    dy = randn(B, math.prod(out_grid), out, dtype=dtype, generator=g)
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y = deco_ops.pool_mlp(*leaves, grid=grid, out_grid=out_grid, activation=activation)
        y.backward(guarded(dy))
    ref = [t.detach().double().requires_grad_(True) if t is not None else None for t in leaves]
    y64 = reference.pool_mlp(*ref, grid, out_grid, activation)
    y64.backward(dy.double())
    eager = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    y_eager = reference.pool_mlp(*eager, grid, out_grid, activation)
    y_eager.backward(dy)
    assert_close(y, y64, dtype, "y", eager=y_eager)
    if B == 0:
        return
    for name, got, want, base in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref, eager):
        if got is not None:
            assert_close(got.grad, want.grad, dtype, f"grad {name}", eager=base.grad)


def _projector_step(x, params):
    leaves = [x.detach().requires_grad_(True)] + [p.detach().requires_grad_(True) for p in params]
    y = deco_ops.pool_mlp(*leaves, grid=(13, 13), out_grid=(6, 6))  # overlapping windows of 2-3 tokens
    y.backward(torch.ones_like(y) / y.numel() ** 0.5)
    return [y] + [t.grad for t in leaves]


@pytest.mark.parametrize("op", ["pool_linear", "pool_mlp", "mlp_pool"])
@pytest.mark.parametrize("C,hidden", [(0, 5), (4, 0)], ids=["no-channels", "no-hidden"])
def test_zero_width_layers_differentiate(backend, op, C, hidden):
    """A layer of 0 features (no channels, or a hidden width of 0) gives eager PyTorch's output and
    gradients (the biases' are not empty: the output is the biases' MLP), not a reshape error."""
    g = torch.Generator().manual_seed(7)
    params = [randn(2, 16, C, generator=g), randn(hidden, C, generator=g), randn(hidden, generator=g),
              randn(3, hidden, generator=g), randn(3, generator=g)]
    if op == "pool_linear":
        params = params[:3]
    ours, eager = ([p.clone().requires_grad_() for p in params] for _ in range(2))
    y = getattr(deco_ops, op)(*ours, grid=(4, 4), out_grid=(2, 2))

    def pool(t):  # the 2x2 windows as a mean (ATen's pooling backward refuses 0 channels)
        return t.reshape(2, 2, 2, 2, 2, t.shape[-1]).mean((2, 4)).reshape(2, 4, t.shape[-1])

    mlp = (lambda t, w1, b1: torch.nn.functional.linear(t, w1, b1)) if op == "pool_linear" else (
        lambda t, w1, b1, w2, b2: torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(t, w1, b1)), w2, b2))
    want = pool(mlp(*eager)) if op == "mlp_pool" else mlp(pool(eager[0]), *eager[1:])
    assert_close(y, want, torch.float32)
    dy = randn(*y.shape, generator=g)
    y.backward(dy), want.backward(dy)
    for i, (a, b) in enumerate(zip(ours, eager)):
        assert a.grad.shape == b.grad.shape, i
        assert_close(a.grad, b.grad, torch.float32, f"grad {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(dtype):
    g = torch.Generator().manual_seed(0)
    x = randn(1, 169, 24, dtype=dtype, generator=g)
    params = [randn(40, 24, dtype=dtype, generator=g), randn(40, dtype=dtype, generator=g), randn(16, 40, dtype=dtype, generator=g), randn(16, dtype=dtype, generator=g)]
    first, second = _projector_step(x, params), _projector_step(x, params)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_nan_propagates_like_the_reference():
    """A NaN token poisons exactly the windows that contain it, forward and backward."""
    x = randn(1, 27 * 27, 8)
    x[0, 5 * 27 + 13, 3] = float("nan")
    x.requires_grad_(True)
    y = deco_ops.adaptive_avg_pool_tokens(x, (27, 27), (12, 12))
    ref = reference.adaptive_avg_pool_tokens(x.detach().double(), (27, 27), (12, 12))
    # token (5, 13) lies in window row 2 and window columns 5 and 6 of the 12x12 output
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(ref).cpu()) and torch.isnan(y).sum() == 2  # ref on x's device
    dy = torch.zeros_like(y)
    dy[0, 0, 0] = float("inf")
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.isinf(dx[0, :3 * 27, 0]).sum() == 9 and torch.isfinite(dx[0, :, 1:]).all()


def _interpolate_tokens(x, grid, out_grid):
    """PyTorch's own ``F.interpolate`` on (B, N, C) tokens, on the CPU: the rule the kernels copy
    (docs/deco-projector.md: CUDA's kernel also reads the next input, with weight 0, on an axis
    that is not resampled)."""
    x = x.cpu()
    B, _, C = x.shape
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    frames = x.transpose(1, 2).reshape(B, C, *grid)
    y = torch.nn.functional.interpolate(frames, size=out_grid, mode=mode, align_corners=False)
    return y.reshape(B, C, -1).transpose(1, 2)


@pytest.mark.parametrize("grid,out_grid", [
    ((9, 9), (3, 3)),  # 3x down-sample (as SigLIP's 27x27 -> 9x9): every output's second tap has weight exactly 0
    ((6, 10), (6, 4)),  # rows not resampled: PyTorch copies them, reading no neighbour row
    ((4, 6, 6), (4, 3, 3)),  # per-frame bilinear of a video (T == OT)
    ((2, 3), (6, 9)),  # up-sampling: zero-weight taps and the clamped last input
    ((2, 3), (10, 15)),  # 5x: the first two outputs' source clamped to 0, input 1 read with weight 0
    ((3, 3), (30, 3)),  # 10x along one axis only
    ((1, 7), (1, 23)),  # 23/7: output 11 reads input 2 with a weight of one float ulp
])
def test_bilinear_nan_reaches_what_pytorch_reads(grid, out_grid):
    """Channel c holds one NaN, at token c (forward) or output row c (backward), so one launch
    checks a NaN at every position: the NaN pattern of the output and of the input gradient is
    PyTorch's (its CPU kernel's), including taps read with weight exactly 0."""
    N, R = math.prod(grid), math.prod(out_grid)
    x = randn(1, N, max(N, R))
    x[0, torch.arange(N), torch.arange(N)] = float("nan")
    x.requires_grad_(True)
    y = deco_ops.bilinear_pool_tokens(x, grid, out_grid)
    ref = _interpolate_tokens(x.detach(), grid, out_grid)
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(ref))
    dy = randn(1, R, max(N, R))
    dy[0, torch.arange(R), torch.arange(R)] = float("nan")
    (dx,) = torch.autograd.grad(y, x, dy)
    x_ref = x.detach().cpu().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(_interpolate_tokens(x_ref, grid, out_grid), x_ref, dy.cpu())
    dx = dx.cpu()
    assert torch.equal(torch.isnan(dx), torch.isnan(dx_ref))
    finite = ~torch.isnan(dx_ref)
    assert_close(dx[finite], dx_ref[finite], torch.float32, "dx")


def test_bilinear_inf_reaches_what_pytorch_reads():
    """Up-sampling (3, 4) -> (5, 7), channel c holding +inf at token c: the outputs that read it are
    +inf or NaN as PyTorch's (NaN where it is read with weight 0). The last input's outputs read it
    once (their second tap is none): a second read with weight 0 would make them NaN (0 * inf)."""
    grid, out_grid = (3, 4), (5, 7)
    N = math.prod(grid)
    x = randn(1, N, N, generator=torch.Generator().manual_seed(23))
    x[0, torch.arange(N), torch.arange(N)] = float("inf")
    y = deco_ops.bilinear_pool_tokens(x, grid, out_grid).cpu()
    ref = _interpolate_tokens(x, grid, out_grid)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert_close(y[finite], ref[finite], torch.float32)


def _far_strided(shape, stride, dtype=torch.float16):
    """A view whose last elements lie past 2**31 elements into a lazily allocated buffer: only the
    touched pages are ever committed, so a 4-9 GB buffer costs a few MB of RAM."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.empty(size, dtype=dtype).as_strided(shape, stride)


@pytest.mark.parametrize("case", ["batch_stride", "token_stride"])
def test_offsets_past_2_31_elements(case):
    """Products of program ids and strides exceed int32 here; 32-bit offset math would read the
    wrong tokens (or fault) and the comparison with the contiguous copy would fail."""
    C = 8
    if case == "batch_stride":
        x = _far_strided((3, 16, C), (2**30 + 64, C, 1))  # batch 2 starts at 2**31 + 128
        grid, out_grid = (4, 4), (2, 2)
    else:
        x = _far_strided((1, 36, C), (36 * (2**27 + 1), 2**27 + 1, 1))  # token 35 at ~4.4e9
        grid, out_grid = (6, 6), (3, 3)
    x.copy_(randn(*x.shape, dtype=x.dtype))
    dense = x.contiguous()
    assert x.storage_offset() + max((n - 1) * s for n, s in zip(x.shape, x.stride())) > 2**31

    y = deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid)
    assert torch.equal(y, deco_ops.adaptive_avg_pool_tokens(dense, grid, out_grid))

    w1, w2 = randn(16, C, dtype=x.dtype), randn(8, 16, dtype=x.dtype)
    y = deco_ops.pool_mlp(x, w1, None, w2, None, grid=grid, out_grid=out_grid)
    assert torch.equal(y, deco_ops.pool_mlp(dense, w1, None, w2, None, grid=grid, out_grid=out_grid))

    g = _far_strided(x.shape[:1] + (math.prod(out_grid), C), (x.stride(0), x.stride(1), 1))
    g.copy_(randn(*g.shape, dtype=g.dtype))
    dx = torch.ops.deco.unpool_tokens(g, list(grid), list(out_grid))
    assert torch.equal(dx, torch.ops.deco.unpool_tokens(g.contiguous(), list(grid), list(out_grid)))


def test_aten_is_asked_only_for_what_its_cuda_kernels_can_index():
    """ATen's CUDA adaptive pooling indexes in 32 bits: the composed candidate gives it tensors whose
    last element lies within 2**31 elements of the storage's start and outputs under 2**31
    elements; on the CPU (64-bit kernels) anything."""
    from types import SimpleNamespace

    from deco_ops.pooling import _aten_reaches

    def tensor(shape, stride, offset=0, cuda=True):
        return SimpleNamespace(is_cuda=cuda, shape=shape, stride=lambda: stride, storage_offset=lambda: offset,
                               numel=lambda: math.prod(shape))

    assert _aten_reaches(tensor((3, 16, 8), (128, 8, 1)), 96)
    assert not _aten_reaches(tensor((3, 16, 8), (2**30 + 64, 8, 1)), 96)  # batch 2 starts past 2**31
    assert _aten_reaches(tensor((2, 16, 8), (2**30 - 64, 8, 1)), 64)  # its last element just inside
    assert not _aten_reaches(tensor((1, 16, 8), (128, 8, 1), offset=2**31), 32)  # the view starts past it
    assert not _aten_reaches(tensor((1, 16, 8), (128, 8, 1)), 2**31)  # the output is too large
    assert not _aten_reaches(tensor((2**21, 1024, 1), (1024, 1, 1)), 8)  # 2**31 elements
    assert _aten_reaches(tensor((3, 16, 8), (2**30 + 64, 8, 1), cuda=False), 96)
    assert _aten_reaches(tensor((0, 16, 8), (128, 8, 1)), 0)  # empty


def test_composed_candidate_hands_unreachable_tensors_to_the_kernels(monkeypatch):
    """Where ATen's kernels cannot index the tokens (``_aten_reaches`` False: a far-strided CUDA
    view here stood in for by the CPU interpreter), the composed candidate pools and un-pools with
    the kernels, forward and backward, and the results match ATen's."""
    from unittest import mock

    from deco_ops import pooling
    from deco_ops.kernels import adaptive_pool

    x = randn(2, 20, 6).requires_grad_()
    dy = randn(2, 6, 6)
    with deco_ops.use_strategy("composed"):
        want = deco_ops.adaptive_avg_pool_tokens(x, (4, 5), (2, 3))
        (want_dx,) = torch.autograd.grad(want, x, dy)
        asked = []  # (input's numel, output's numel) of each question: pooling, then un-pooling

        def unreachable(t, out_numel):
            asked.append((t.numel(), out_numel))
            return False

        monkeypatch.setattr(pooling, "_aten_reaches", unreachable)
        with mock.patch.object(adaptive_pool, "pool_tokens", wraps=adaptive_pool.pool_tokens) as pool, \
                mock.patch.object(adaptive_pool, "unpool_tokens", wraps=adaptive_pool.unpool_tokens) as unpool, \
                mock.patch.object(reference, "adaptive_avg_pool_tokens") as aten_pool, \
                mock.patch.object(reference, "unpool_tokens") as aten_unpool:
            got = deco_ops.adaptive_avg_pool_tokens(x, (4, 5), (2, 3))
            (dx,) = torch.autograd.grad(got, x, dy)
    assert pool.called and unpool.called and not aten_pool.called and not aten_unpool.called
    assert asked == [(2 * 20 * 6, 2 * 6 * 6), (2 * 6 * 6, 2 * 20 * 6)]  # each asked of the tensor it writes
    assert_close(got, want, torch.float32, "y")
    assert_close(dx, want_dx, torch.float32, "dx")
