"""adaptive_avg_pool_tokens and its adjoint against F.adaptive_avg_pool2d/3d in float64."""

import math
from unittest import mock

import pytest
import torch

import deco_ops
from deco_ops import reference
from deco_ops.kernels import adaptive_pool
from harness import DEVICE, DTYPES, assert_close, guarded, head_strided, poisoned_empty, randn, rel_err

GRIDS = [
    ((24, 24), (12, 12)),  # CLIP ViT-L/14-336 -> DeCo 144
    ((27, 27), (12, 12)),  # SigLIP, overlapping windows
    ((24, 24), (7, 7)),
    ((5, 9), (3, 4)),  # non-square
    ((6, 6), (6, 6)),  # out == in
    ((3, 4), (5, 7)),  # out larger than in
    ((1, 1), (1, 1)),
    ((4, 6, 6), (2, 3, 3)),  # video (T, H, W)
    ((3, 5, 7), (2, 2, 3)),
]


def _pool_case(grid, out_grid, dtype, B=2, C=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn(B, math.prod(grid), C, dtype=dtype, generator=g)
    dy = randn(B, math.prod(out_grid), C, dtype=dtype, generator=g)
    return x, dy


@pytest.mark.parametrize("grid,out_grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_forward_backward(backend, grid, out_grid, dtype):
    _check_pool(*_pool_case(grid, out_grid, dtype, B=1 if math.prod(grid) > 200 else 2), grid, out_grid, dtype)


def test_channels_span_several_blocks():
    """More channels than one program takes (pooling's block: 4096 elements over the window's taps,
    at most 1024; un-pooling's: 1024): each channel block of grid axis 1 pools and un-pools its
    own slice of the channels, forward and backward."""
    grid, out_grid, C = (2, 2), (1, 1), adaptive_pool.UNPOOL_BLOCK_C + 16
    assert adaptive_pool.pool_tile(C, *grid, *out_grid)[0] < C
    with deco_ops.use_backend("triton"):
        _check_pool(*_pool_case(grid, out_grid, torch.float32, B=1, C=C), grid, out_grid, torch.float32)


def _check_pool(x, dy, grid, out_grid, dtype):
    """Pooling of (guarded) ``x`` and its gradient for ``dy`` against float64 PyTorch."""
    xg = guarded(x).requires_grad_(True)
    with poisoned_empty():
        y = deco_ops.adaptive_avg_pool_tokens(xg, grid, out_grid)
        (dx,) = torch.autograd.grad(y, xg, guarded(dy))
    x64 = x.double().requires_grad_(True)
    y64 = reference.adaptive_avg_pool_tokens(x64, grid, out_grid)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert y.dtype == dtype and y.shape == (x.shape[0], math.prod(out_grid), x.shape[2])
    assert_close(y, y64, dtype, "pooled")
    assert_close(dx, dx64, dtype, "grad x")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_16_bit_video_pools_in_float32_on_the_pytorch_path(dtype, packed):
    """16-bit 3D pooling on the CPU's PyTorch path: ATen's 3D kernel sums 16-bit windows in 16 bits
    (5.5x the error below in bf16); ours sums in fp32 and rounds once, forward and backward, dense
    and packed (the path ``mlp_pool``'s residual takes): within 1.5x one rounding of the float64 result."""
    grid, out_grid = (16, 24, 24), (5, 7, 9)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, math.prod(grid), 8, generator=gen).to(dtype).requires_grad_(True)
    dy = torch.randn(1, math.prod(out_grid), 8, generator=gen).to(dtype)
    with deco_ops.use_backend("torch"):
        if packed:
            y = deco_ops.adaptive_avg_pool_tokens_packed(x[0], torch.tensor([grid]), out_grids=torch.tensor([out_grid]))[0][None]
        else:
            y = deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid)
        (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = reference.adaptive_avg_pool_tokens(x64, grid, out_grid)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    for name, out, ref in (("pooled", y, y64), ("grad x", dx, dx64)):
        rounded = rel_err(ref.to(dtype), ref)
        assert out.dtype == dtype and rel_err(out, ref) <= 1.5 * rounded, (name, rel_err(out, ref), rounded)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("grid,out_grid", [((27, 27), (12, 12)), ((5, 7), (3, 4)), ((3, 4), (7, 9)), ((3, 5, 7), (2, 3, 4))])
def test_unpooling_sums_a_token_s_windows_before_rounding(backend, grid, out_grid, packed):
    """fp16 gradients that nearly cancel across the overlapping windows of a token (neighbouring
    outputs get opposite gradients plus 1% noise): the un-pooling sums every window's share in fp32
    and rounds once, within 1.5x one fp16 rounding of the float64 gradient (a share rounded to
    16 bits before the sum: 2x). The kernels only: the PyTorch path's 2D backward is ATen's own, which
    rounds each share to fp16 (2-3x one rounding here; its 3D backward sums in fp32, ``adaptive_avg_pool3d``)."""
    if backend != "triton":
        pytest.skip("the PyTorch path's un-pooling is ATen's own backward")
    P = math.prod(out_grid)
    gen = torch.Generator().manual_seed(P)
    x = randn(1, math.prod(grid), 6, dtype=torch.float16, generator=gen).requires_grad_(True)
    sign = torch.tensor([(-1.0) ** (i + i // out_grid[-1]) for i in range(P)], dtype=torch.float64)
    dy = sign[:, None] * torch.randn(1, 6, dtype=torch.float64, generator=gen) + 0.01 * torch.randn(P, 6, dtype=torch.float64, generator=gen)
    dy = dy[None].to(torch.float16)
    if packed:
        y = deco_ops.adaptive_avg_pool_tokens_packed(x[0], torch.tensor([grid]), out_grids=torch.tensor([out_grid]))[0][None]
    else:
        y = deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid)
    (dx,) = torch.autograd.grad(y, x, dy.to(y.device))
    x64 = x.detach().double().requires_grad_(True)
    (dx64,) = torch.autograd.grad(reference.adaptive_avg_pool_tokens(x64, grid, out_grid), x64, dy.double().to(x.device))
    rounded = rel_err(dx64.half(), dx64)
    assert rel_err(dx, dx64) <= 1.5 * rounded, (rel_err(dx, dx64), rounded)


def test_numpy_ints_are_sizes_as_the_modules_take_them():
    """Grids, output grids and a packed stride given as numpy integers (read from a config array)
    run as Python ints do, as the modules' size arguments accept them."""
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 16, 3)
    assert torch.equal(deco_ops.adaptive_avg_pool_tokens(x, (np.int64(4), np.int32(4)), (np.int64(2), 2)),
                       deco_ops.adaptive_avg_pool_tokens(x, (4, 4), (2, 2)))
    packed = deco_ops.adaptive_avg_pool_tokens_packed(x[0], torch.tensor([[4, 4]]), stride=np.int64(2))[0]
    assert torch.equal(packed, deco_ops.adaptive_avg_pool_tokens(x[:1], (4, 4), (2, 2))[0])


def test_float64_tokens_on_the_pytorch_backend():
    """The PyTorch backend pools float64 tokens (the kernels take 16- and 32-bit ones): as
    ``F.adaptive_avg_pool2d``, forward and backward."""
    x, dy = _pool_case((5, 7), (3, 2), torch.float64, B=2, C=3, seed=4)
    x.requires_grad_(True)
    with deco_ops.use_backend("torch"):
        y = deco_ops.adaptive_avg_pool_tokens(x, (5, 7), (3, 2))
        (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().requires_grad_(True)
    y64 = reference.adaptive_avg_pool_tokens(x64, (5, 7), (3, 2))
    (dx64,) = torch.autograd.grad(y64, x64, dy)
    assert y.dtype == dx.dtype == torch.float64
    assert_close(y, y64, torch.float64, "pooled")
    assert_close(dx, dx64, torch.float64, "grad x")


def test_reference_is_pytorch_pooling():
    """The float64 reference really is F.adaptive_avg_pool2d on the (B, C, H, W) image."""
    x = torch.randn(2, 27 * 27, 5, dtype=torch.float64)
    img = x.transpose(1, 2).reshape(2, 5, 27, 27)
    expected = torch.nn.functional.adaptive_avg_pool2d(img, (12, 12)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(reference.adaptive_avg_pool_tokens(x, (27, 27), (12, 12)), expected)


@pytest.mark.parametrize("B", [1, 3])
def test_reference_unpooling_writes_token_rows(B):
    """The PyTorch backend's un-pooling views the gradient as a channels-last image with the
    tokens' batch stride, one image included (at B = 1 a batch stride of C reads as NCHW): ATen's
    kernel then reads the gradient rows and writes the (B, N, C) rows itself, no copy in or out;
    and the gradient is eager autograd's through F.adaptive_avg_pool2d, bit for bit."""
    for grid, out_grid in (((4, 4), (2, 2)), ((5, 7), (3, 2)), ((3, 5), (5, 7))):
        x, dy = _pool_case(grid, out_grid, torch.float32, B=B, C=8)
        x.requires_grad_(True)
        eager = torch.nn.functional.adaptive_avg_pool2d(x.view(B, *grid, 8).permute(0, 3, 1, 2), out_grid)
        (want,) = torch.autograd.grad(eager.flatten(2).transpose(1, 2), x, dy)
        assert torch.equal(reference.unpool_tokens(guarded(dy), grid, out_grid), want), (grid, out_grid)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = reference.unpool_tokens(dy, grid, out_grid)
        copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_")]
        assert got.is_contiguous() and not copies, (grid, out_grid, copies)


def test_unpool_is_deterministic_gather():
    _, dy = _pool_case((11, 11), (4, 4), torch.float32, B=1, C=300)
    with deco_ops.use_backend("triton"):
        runs = [torch.ops.deco.unpool_tokens(dy, [11, 11], [4, 4]) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_kernels_read_channel_strided_tokens_and_gradients(backend):
    """Tokens and gradients whose channels are strided (a (B, C, N) map's transposed view, inside
    NaN padding) are read by their strides: by the pooling, by the pooling GEMM (pool_linear) and
    by the raw un-pooling op (the public ops hand it a contiguous gradient)."""
    x, dy = _pool_case((5, 7), (3, 2), torch.float32, C=8)
    w = randn(6, 8, generator=torch.Generator().manual_seed(2))
    with poisoned_empty():
        pooled = deco_ops.adaptive_avg_pool_tokens(head_strided(x), (5, 7), (3, 2))
        y = deco_ops.pool_linear(head_strided(x), w, None, grid=(5, 7), out_grid=(3, 2))
        dx = torch.ops.deco.unpool_tokens(head_strided(dy), [5, 7], [3, 2])
    pooled64 = reference.adaptive_avg_pool_tokens(x.double(), (5, 7), (3, 2))
    assert_close(pooled, pooled64, torch.float32, "pooled")
    assert_close(y, torch.nn.functional.linear(pooled64, w.double()), torch.float32, "pool_linear")
    assert_close(dx, reference.unpool_tokens(dy.double(), (5, 7), (3, 2)), torch.float32, "unpooled")


def test_unpool_gradient_is_pool(backend):
    """unpool's registered autograd formula is pool (the adjoint), so gradients of any order flow."""
    _, g = _pool_case((5, 7), (3, 2), torch.float32)
    w, _ = _pool_case((5, 7), (3, 2), torch.float32, seed=1)
    g = g.requires_grad_(True)
    (dg,) = torch.autograd.grad((torch.ops.deco.unpool_tokens(g, [5, 7], [3, 2]) * w).sum(), g)
    assert_close(dg, reference.adaptive_avg_pool_tokens(w.double(), (5, 7), (3, 2)), torch.float32)


def test_triton_kernels_launch():
    x, dy = _pool_case((6, 6), (3, 3), torch.float32)
    x.requires_grad_(True)
    with deco_ops.use_backend("triton"), \
            mock.patch.object(adaptive_pool.pool_tokens_kernel, "run", wraps=adaptive_pool.pool_tokens_kernel.run) as fwd, \
            mock.patch.object(adaptive_pool.unpool_tokens_kernel, "run", wraps=adaptive_pool.unpool_tokens_kernel.run) as bwd:
        deco_ops.adaptive_avg_pool_tokens(x, (6, 6), (3, 3)).backward(dy)
    assert fwd.call_count == 1 and bwd.call_count == 1


@pytest.mark.parametrize("strategy", ["fused", "composed"])
@pytest.mark.parametrize("grid,out_grid", [((6, 6), (2, 2)), ((2, 3, 6), (1, 2, 4))], ids=["2d", "3d"])
@pytest.mark.parametrize("B,C", [(0, 8), (2, 0)], ids=["no-batch", "no-channel"])
def test_empty_tokens(backend, strategy, grid, out_grid, B, C):
    """An empty batch or zero channels: empty results of the right shapes, forward and backward, on
    every path (ATen's 3D pooling and its backward reject 0 channels: the PyTorch path answers
    without calling them)."""
    x = torch.randn(B, math.prod(grid), C, device=DEVICE, requires_grad=True)
    with deco_ops.use_strategy(strategy):
        y = deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid)
        y.sum().backward()
    assert y.shape == (B, math.prod(out_grid), C) and x.grad.shape == x.shape


@pytest.mark.parametrize("op", ["adaptive_avg_pool_tokens", "pool_linear"])
def test_tokens_are_not_kept_for_backward(backend, op):
    """Un-pooling needs the grids alone (and ``pool_linear``'s weight gradient the pooled rows): no
    token-sized tensor is saved for backward, where ``F.adaptive_avg_pool2d``'s autograd keeps its
    input, the whole vision-tower output when that is not a leaf (4.7 MB at B=2, 24x24x1024)."""
    g = torch.Generator().manual_seed(3)
    x = randn(2, 64, 16, generator=g).to(DEVICE).requires_grad_() * 1.0  # a tower's output: nothing else keeps it
    w, b = (randn(*shape, generator=g).to(DEVICE).requires_grad_() for shape in ((12, 16), (12,)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        if op == "pool_linear":
            y = deco_ops.pool_linear(x, w, b, grid=(8, 8), out_grid=(4, 4))
        else:
            y = deco_ops.adaptive_avg_pool_tokens(x, (8, 8), (4, 4))
    assert all(n < x.numel() for n in saved), saved
    y.sum().backward()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(2, 36)}, ValueError, "x must have 3 dimensions"),
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randn(2, 35, 4)}, ValueError, "needs 36"),
        ({"grid": (6,)}, ValueError, "grid must have 2"),
        ({"grid": (6, 6, 1, 1)}, ValueError, "grid must have 2"),
        ({"out_grid": (0, 3)}, ValueError, "out_grid entries must be >= 1"),
        ({"out_grid": (3, 3, 1)}, ValueError, "as many entries"),
        ({"grid": (6.0, 6)}, TypeError, "grid entries must be ints"),
        ({"grid": "6x6"}, TypeError, "grid must be a tuple of 2 or 3 ints, got '6x6'"),
        ({"x": torch.randint(0, 3, (2, 36, 4))}, TypeError, "x has dtype"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(2, 36, 4), "grid": (6, 6), "out_grid": (3, 3)} | kwargs
    with deco_ops.use_backend("triton"), mock.patch.object(adaptive_pool.pool_tokens_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.adaptive_avg_pool_tokens(args["x"], args["grid"], args["out_grid"])
    launch.assert_not_called()
