"""Packed ragged batches (adaptive_avg_pool_tokens_packed, bilinear_pool_tokens[_packed],
pool_mlp_packed) against float64 PyTorch per image and against a loop of the single-image ops."""

import math
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import deco_ops
from deco_ops import packed
from deco_ops.kernels import packed_pool, pool_gemm
from harness import DEVICE, DTYPES, assert_close, guarded, leaf, poisoned_empty, randn

MODES = ("average", "bilinear")


def resample64(x: torch.Tensor, grid, out_grid, mode: str) -> torch.Tensor:
    """float64 reference for one image: (N, C) tokens -> (prod(out_grid), C), autograd-able."""
    img = x.t().reshape(1, x.shape[1], *grid)
    if mode == "average":
        pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
        out = pool(img, tuple(out_grid))
    else:
        out = F.interpolate(img, size=tuple(out_grid), mode="bilinear" if len(grid) == 2 else "trilinear", align_corners=False)
    return out.reshape(x.shape[1], -1).t()


def loop64(x: torch.Tensor, grids, out_grids, mode: str) -> torch.Tensor:
    outs, start = [], 0
    for g, o in zip(grids, out_grids):
        n = math.prod(g)
        outs.append(resample64(x[start: start + n], g, o, mode))
        start += n
    return torch.cat(outs)


def random_mix(seed: int, num: int, ndim: int, max_side: int = 40, max_tokens: int = 600):
    """Random grids 1..max_side per axis (non-square; 3D with short time axes) and output grids
    from 1 up to a bit beyond the input (exercises up-sampling too), total tokens bounded."""
    rng = random.Random(seed)
    grids, outs = [], []
    budget = max_tokens // num
    while len(grids) < num:
        if ndim == 2:
            h = rng.randint(1, max_side)
            g = (h, rng.randint(1, max(1, min(max_side, budget // h))))
            g = g if rng.random() < 0.5 else g[::-1]
        else:
            g = (rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 8))
        # output at least ~1/4 of the input per axis (bounded windows), sometimes larger than it
        o = tuple(rng.randint(max(1, -(-s // 4)), s + 2) for s in g)
        grids.append(g)
        outs.append(o)
    return grids, outs


def _case(grids, out_grids, dtype, C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = sum(map(math.prod, grids))
    P = sum(map(math.prod, out_grids))
    return randn(N, C, dtype=dtype, generator=gen), randn(P, C, dtype=dtype, generator=gen)


def _t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def _pool_fn(mode):
    return deco_ops.adaptive_avg_pool_tokens_packed if mode == "average" else deco_ops.bilinear_pool_tokens_packed


MIXES = [
    pytest.param(2, 0, 5, id="2d-5imgs"),
    pytest.param(2, 1, 3, id="2d-3imgs"),
    pytest.param(3, 2, 4, id="3d-4vids"),
]


@pytest.mark.parametrize("ndim,seed,num", MIXES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_packed_forward_backward(backend, ndim, seed, num, mode, dtype):
    grids, outs = random_mix(seed, num, ndim)
    _check_pool_packed(grids, outs, mode, dtype, seed)


def _check_pool_packed(grids, outs, mode, dtype, seed, C=11):
    """The packed op's output, cu_seqlens and input gradient against a float64 loop over the images;
    returns cu_seqlens."""
    x, dy = _case(grids, outs, dtype, C=C, seed=seed)
    xg = guarded(x).requires_grad_(True)
    with poisoned_empty():
        y, cu = _pool_fn(mode)(xg, _t(grids), out_grids=_t(outs))
        (dx,) = torch.autograd.grad(y, xg, guarded(dy))
    x64 = x.double().requires_grad_(True)
    y64 = loop64(x64, grids, outs, mode)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert y.dtype == dtype and cu.dtype == torch.int32
    assert cu.tolist() == [0, *torch.tensor([math.prod(o) for o in outs]).cumsum(0).tolist()]
    assert_close(y, y64, dtype, "pooled")
    assert_close(dx, dx64, dtype, "grad x")
    return cu


@pytest.mark.parametrize("mode", MODES)
def test_pool_packed_first_and_last_images_alike(backend, mode):
    """A batch whose first and last images share a layout and a middle one differs is not one
    dense batch of the first image's layout (the PyTorch path pools such a batch in one call):
    each image pooled as its own, forward and backward."""
    cu = _check_pool_packed([(2, 2), (4, 4), (2, 2)], [(1, 1), (2, 2), (1, 1)], mode, torch.float32, seed=4)
    assert cu.tolist() == [0, 1, 5, 6]


@pytest.mark.parametrize("mode", MODES)
def test_pool_packed_videos_to_one_frame(backend, mode):
    """Videos pooled to a single frame (T > 1, OT = 1), which the random mixes may never draw: a
    3D grid, not a 2D one, forward and backward."""
    cu = _check_pool_packed([(3, 4, 5), (2, 3, 3)], [(1, 2, 3), (1, 3, 2)], mode, torch.float32, seed=6)
    assert cu.tolist() == [0, 6, 12]


@pytest.mark.parametrize("mode", MODES)
def test_pool_packed_wider_than_one_channel_block(mode):
    """More channels than one program takes (BLOCK_C, grid axis 1; the other cases' 11 fit in
    one): each channel block pools and un-pools its own slice of the channels, forward and backward."""
    C = packed_pool.cuda_configs()[0].kwargs["BLOCK_C"] + 6
    assert packed_pool._launch_config(C, 4)["BLOCK_C"] < C
    with deco_ops.use_backend("triton"):
        _check_pool_packed([(5, 7), (3, 3)], [(3, 2), (2, 2)], mode, torch.float32, seed=7, C=C)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_packed_equals_single_image_loop(backend, dtype):
    """Bit-for-bit the per-image single-image op on fp32 accumulations rounded once: compare with
    a Python loop of adaptive_avg_pool_tokens (same backend) at the dtype's tolerance."""
    grids = [(12, 12), (11, 11), (5, 9), (1, 1), (7, 3), (40, 2)]
    outs = [(6, 6), (4, 4), (3, 4), (1, 1), (7, 3), (14, 1)]
    x, dy = _case(grids, outs, dtype, C=6)
    x = x.requires_grad_(True)
    y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, _t(grids), out_grids=_t(outs))
    (dx,) = torch.autograd.grad(y, x, dy)
    xs = [t.detach().requires_grad_(True) for t in x.detach().split([math.prod(g) for g in grids])]
    ys = [deco_ops.adaptive_avg_pool_tokens(xi[None], g, o)[0] for xi, g, o in zip(xs, grids, outs)]
    dxs = torch.autograd.grad(ys, xs, list(dy.split([math.prod(o) for o in outs])))
    assert_close(y, torch.cat(ys), dtype, "pooled vs loop")
    assert_close(dx, torch.cat(dxs), dtype, "grad vs loop")


@pytest.mark.parametrize("stride,ndim", [(2, 2), ((2, 3), 2), ([3, 2], 2), (2, 3), ((1, 2, 2), 3)])
@pytest.mark.parametrize("mode", MODES)
def test_stride(backend, stride, ndim, mode):
    grids = [(7, 5), (4, 4), (1, 3)] if ndim == 2 else [(3, 5, 4), (2, 2, 2)]
    s = (stride,) * ndim if isinstance(stride, int) else stride
    outs = [tuple(-(-a // b) for a, b in zip(g, s)) for g in grids]
    x, _ = _case(grids, outs, torch.float32, C=5)
    y, cu = _pool_fn(mode)(x, _t(grids), stride=stride)
    assert cu.tolist()[-1] == sum(map(math.prod, outs))
    assert_close(y, loop64(x.double(), grids, outs, mode), torch.float32)


@pytest.mark.parametrize("grid,out_grid", [((24, 24), (12, 12)), ((27, 27), (14, 14)), ((5, 9), (3, 4)),
                                           ((3, 4), (5, 7)), ((1, 1), (1, 1)), ((4, 6, 6), (2, 3, 3))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bilinear_pool_tokens(backend, grid, out_grid, dtype):
    gen = torch.Generator().manual_seed(1)
    B = 2
    x = randn(B, math.prod(grid), 9, dtype=dtype, generator=gen)
    dy = randn(B, math.prod(out_grid), 9, dtype=dtype, generator=gen)
    xg = guarded(x).requires_grad_(True)
    with poisoned_empty():
        y = deco_ops.bilinear_pool_tokens(xg, grid, out_grid)
        (dx,) = torch.autograd.grad(y, xg, guarded(dy))
    x64 = x.double().requires_grad_(True)
    y64 = torch.stack([resample64(x64[b], grid, out_grid, "bilinear") for b in range(B)])
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close(y, y64, dtype, "bilinear")
    assert_close(dx, dx64, dtype, "grad x")


@pytest.mark.parametrize("grid,out_grid", [((27, 27), (14, 14)), ((1, 1), (3, 3)), ((4, 6, 6), (2, 3, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pytorch_backend_bilinear_is_f_interpolate_bitwise(grid, out_grid, dtype):
    """The PyTorch backend is ``F.interpolate``'s own: bilinear's kernel for a 2D grid (trilinear's
    on a 2D grid reads its one frame twice, once with weight 0, so an inf became NaN, and rounds
    16-bit outputs differently), trilinear's for 3D; the same bits forward and backward, an inf
    token included."""
    gen = torch.Generator().manual_seed(2)
    x = randn(2, math.prod(grid), 3, dtype=dtype, generator=gen)
    x[0, -1, 2] = float("inf")
    dy = randn(2, math.prod(out_grid), 3, dtype=dtype, generator=gen)
    mode = "bilinear" if len(grid) == 2 else "trilinear"

    def eager(t):
        image = t.transpose(1, 2).reshape(2, 3, *grid)
        return F.interpolate(image, size=out_grid, mode=mode, align_corners=False).reshape(2, 3, -1).transpose(1, 2)

    with deco_ops.use_backend("torch"):
        for op in (lambda t: deco_ops.bilinear_pool_tokens(t, grid, out_grid),
                   lambda t: deco_ops.bilinear_pool_tokens_packed(t.reshape(-1, 3), _t([grid, grid]), out_grids=_t([out_grid, out_grid]))[0].reshape(2, -1, 3)):
            xs = [x.clone().requires_grad_(True) for _ in range(2)]
            ys = [op(xs[0]), eager(xs[1])]
            for got, want in (ys, [torch.autograd.grad(y, t, dy)[0] for y, t in zip(ys, xs)]):
                assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def _mlp_params(C, hidden, out, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = randn(hidden, C, dtype=dtype, scale=C**-0.5, generator=gen)
    b1 = randn(hidden, dtype=dtype, generator=gen) if bias else None
    w2 = randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=gen)
    b2 = randn(out, dtype=dtype, generator=gen) if bias else None
    return [w1, b1, w2, b2]


@pytest.mark.parametrize("ndim,seed,num", [MIXES[0], MIXES[2]])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_mlp_packed(backend, ndim, seed, num, mode, dtype):
    grids, outs = random_mix(seed, num, ndim, max_tokens=400)
    C, hidden, out = 21, 40, 19
    x, _ = _case(grids, outs, dtype, C=C, seed=seed)
    weights = _mlp_params(C, hidden, out, dtype, seed=seed)
    dy = randn(sum(map(math.prod, outs)), out, dtype=dtype, generator=torch.Generator().manual_seed(5))
    leaves = [leaf(guarded(p)) for p in [x, *weights]]
    with poisoned_empty():
        y, cu = deco_ops.pool_mlp_packed(leaves[0], _t(grids), *leaves[1:], out_grids=_t(outs), mode=mode)
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in [x, *weights]]
    pooled = loop64(ref[0], grids, outs, mode)
    y64 = F.linear(F.gelu(F.linear(pooled, ref[1], ref[2])), ref[3], ref[4])
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_mlp_packed_equals_single_image_loop(backend, dtype):
    grids = [(6, 6), (5, 9)]
    outs = [(3, 3), (3, 4)]
    C, hidden, out = 16, 32, 24
    x, _ = _case(grids, outs, dtype, C=C)
    w = _mlp_params(C, hidden, out, dtype, bias=False)
    y, _ = deco_ops.pool_mlp_packed(x, _t(grids), *w, out_grids=_t(outs), activation="silu")
    ys = [deco_ops.pool_mlp(xi[None], *w, grid=g, out_grid=o, activation="silu")[0]
          for xi, g, o in zip(x.split([math.prod(g) for g in grids]), grids, outs)]
    assert_close(y, torch.cat(ys), dtype, "vs loop")


def test_one_launch_per_stage():
    grids, outs = random_mix(3, 6, 2, max_tokens=800)
    x, dy = _case(grids, outs, torch.float32, C=8)
    x.requires_grad_(True)
    fwd_k, bwd_k = packed_pool.pool_packed_kernel, packed_pool.unpool_packed_kernel
    with deco_ops.use_backend("triton"), \
            mock.patch.object(fwd_k, "run", wraps=fwd_k.run) as fwd, \
            mock.patch.object(bwd_k, "run", wraps=bwd_k.run) as bwd:
        y, _ = deco_ops.adaptive_avg_pool_tokens_packed(x, _t(grids), out_grids=_t(outs))
        y.backward(dy)
    assert fwd.call_count == 1 and bwd.call_count == 1
    w = _mlp_params(8, 16, 8, torch.float32)
    gemm = pool_gemm.pool_gemm_kernel
    with deco_ops.use_backend("triton"), mock.patch.object(gemm, "run", wraps=gemm.run) as launch, \
            mock.patch.object(bwd_k, "run", wraps=bwd_k.run) as bwd:
        y, _ = deco_ops.pool_mlp_packed(x, _t(grids), *w, out_grids=_t(outs))
        y.backward(torch.randn_like(y))
    assert launch.call_count == 1 and bwd.call_count == 1


def test_unpool_packed_is_deterministic_gather():
    grids, outs = [(11, 11), (9, 13)], [(4, 4), (5, 3)]
    _, dy = _case(grids, outs, torch.float32, C=70)
    for mode in MODES:
        packing = deco_ops.packed.Packing(grids, outs)
        with deco_ops.use_backend("triton"):
            runs = [torch.ops.deco.unpool_tokens_packed(dy, packing.geometry, packing.num_tokens, mode) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])


def test_geometry_written_in_place_is_read_again():
    """The kernels' image index is cached per geometry tensor; one written in place since (a reused
    buffer holding the next batch's layout: the same output rows, other images') gets a new index."""
    grids, first, second = [(4, 4), (3, 3)], [(2, 2), (1, 1)], [(1, 1), (2, 2)]
    x, _ = _case(grids, first, torch.float32, C=6, seed=10)
    geometry = packed.Packing(grids, first).geometry.to(DEVICE)
    with deco_ops.use_backend("triton"):
        assert_close(torch.ops.deco.pool_tokens_packed(x, geometry, 5, "average"), loop64(x.double(), grids, first, "average"), torch.float32)
        geometry.copy_(packed.Packing(grids, second).geometry)
        y = torch.ops.deco.pool_tokens_packed(x, geometry, 5, "average")
    assert_close(y, loop64(x.double(), grids, second, "average"), torch.float32)


def test_unpool_gradient_is_pool(backend):
    """unpool's autograd formula is pool (its adjoint): gradients of any order flow."""
    grids, outs = [(5, 7), (3, 3)], [(3, 2), (2, 2)]
    packing = deco_ops.packed.Packing(grids, outs)
    g, _ = _case(outs, grids, torch.float32, C=4)  # (num_out, C)
    w, _ = _case(grids, outs, torch.float32, C=4, seed=1)
    g.requires_grad_(True)
    for mode in MODES:
        dx = torch.ops.deco.unpool_tokens_packed(g, packing.geometry, packing.num_tokens, mode)
        (dg,) = torch.autograd.grad((dx * w).sum(), g)
        assert_close(dg, loop64(w.double(), grids, outs, mode), torch.float32)


def _dense_resamplers(device=DEVICE):
    """The ops that run a dense batch through the packed machinery (``packed.dense_geometry``)."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 8).to(device), torch.randn(5, 6).to(device)
    return {
        "bilinear_pool_tokens": lambda x, grid=(4, 4), out=(3, 3): deco_ops.bilinear_pool_tokens(x, grid, out),
        "mlp_pool": lambda x, grid=(4, 4), out=(3, 3): deco_ops.mlp_pool(x, w1, None, w2, None, grid=grid, out_grid=out),
    }


@pytest.mark.parametrize("op", ["bilinear_pool_tokens", "mlp_pool"])
def test_a_call_under_a_mode_leaves_later_calls_as_they_were(op, auto_backend):
    """The dense geometry table is cached across calls: built under ``torch.inference_mode`` (an
    evaluation pass) it must not be an inference tensor (the next training call saves it for
    backward), and a call under FakeTensorMode or on the meta device must not cache a fake or meta
    table (later real calls read it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn = _dense_resamplers()[op]
    x = randn(2, 16, 8)

    def train():
        leaf_x = x.clone().requires_grad_(True)
        y = fn(leaf_x)
        y.backward(torch.ones_like(y))
        assert torch.isfinite(leaf_x.grad).all() and not y.is_inference()
        return y.detach()

    with torch.inference_mode():
        fn(x)
    want = train()
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:  # the weights stay real
        assert fn(fake.from_tensor(x)).shape == want.shape
        assert fn(fake.from_tensor(x), (4, 4), (2, 2)).shape == (2, 4, want.shape[-1])  # a grid nothing cached yet
    assert_close(train(), want, torch.float32)
    assert_close(fn(x, (4, 4), (2, 2)), fn(x.clone(), (4, 4), (2, 2)), torch.float32)  # a real table for that grid
    # what the kernels read (the PyTorch path reads the table's shape only: a dense view knows it)
    assert type(packed.dense_geometry((4, 4), (2, 2), x)) is torch.Tensor
    assert _dense_resamplers("meta")[op](x.to("meta")).shape == want.shape
    assert_close(train(), want, torch.float32)


@pytest.mark.parametrize("op", ["bilinear_pool_tokens", "mlp_pool"])
def test_dense_resampling_compiles_once_for_every_batch_and_grid(op, auto_backend):
    """``torch.compile(dynamic=True)``: one graph for every batch size and grid (the table is built
    in the graph from the symbolic sizes), the eager values."""
    from torch._dynamo.testing import CompileCounterWithBackend

    fn = _dense_resamplers()[op]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for batch, grid, out in ((3, (4, 4), (3, 3)), (5, (4, 4), (3, 3)), (2, (6, 4), (2, 3))):
        x = randn(batch, math.prod(grid), 8)
        assert_close(compiled(x, grid, out), fn(x, grid, out), torch.float32)
    assert counter.frame_count == 1


def test_fullgraph_refuses_packed_calls_by_name_and_plain_compile_runs_them(auto_backend):
    """The packed ops read their grids (``cross_attention`` its ``cu_seqlens_k``) on the host: under
    ``torch.compile(fullgraph=True)`` the refusal names the argument (it was PyTorch's
    data-dependent guard error on ``min(r) < 1`` inside deco_ops, suggesting ``torch._check``);
    without fullgraph the graph breaks there and two numbers of images give the eager values."""
    from torch._dynamo.exc import Unsupported

    w1, b1, w2, b2 = _mlp_params(4, 8, 3, torch.float32)

    def project(x, grids):
        return deco_ops.pool_mlp_packed(x, grids, w1, b1, w2, b2, stride=2)[0]

    def merge(x, grids):
        return deco_ops.merge_mlp_packed(x, grids, None, None, randn(8, 16), None, randn(3, 8), None, norm="rmsnorm")[0]

    def attend(q, k, cu):
        return deco_ops.cross_attention(q, k, k, cu_seqlens_k=cu)

    q, k = randn(2, 3, 2, 8), randn(9, 2, 8)
    calls = ((project, (randn(25, 4), torch.tensor([[4, 4], [3, 3]])), "grids"),
             (merge, (randn(24, 4), torch.tensor([[4, 4], [2, 4]])), "grids"),
             (attend, (q, k, torch.tensor([0, 4, 9], dtype=torch.int32)), "cu_seqlens_k"))
    for fn, args, name in calls:
        torch._dynamo.reset()
        with pytest.raises(Unsupported, match=f"deco_ops reads the values of {name} on the host"):
            torch.compile(fn, fullgraph=True, backend="eager")(*args)
    torch._dynamo.reset()
    compiled = torch.compile(project, backend="aot_eager")
    for grids in ([[4, 4], [3, 5]], [[4, 4], [3, 5], [7, 2], [1, 1]]):
        x = randn(sum(h * w for h, w in grids), 4)
        assert_close(compiled(x, torch.tensor(grids)), project(x, torch.tensor(grids)), torch.float32)


def test_dense_upsampling_past_the_cached_geometry_table(auto_backend):
    """A dense batch's geometry comes from a table cached per (grid, out_grid) with room for as many
    images as int32 row offsets allow: of the outputs too, where up-sampling makes them more than
    the tokens (2x2 -> 726x726: 527,076 rows an image, room for 4,074 images, not 4,096)."""
    x = randn(1, 4, 2, generator=torch.Generator().manual_seed(7))
    y = deco_ops.bilinear_pool_tokens(x, (2, 2), (726, 726))
    assert_close(y[0], resample64(x[0].double(), (2, 2), (726, 726), "bilinear"), torch.float32)
    # a meta batch past the table's room (4,096 images of 2x2 -> 1x1): its table built by tensor ops
    meta = deco_ops.bilinear_pool_tokens(torch.empty(4097, 4, 2, device="meta"), (2, 2), (1, 1))
    assert meta.shape == (4097, 1, 2) and meta.device.type == "meta"


def test_unpool_of_a_dense_video_keeps_the_fake_layout(auto_backend):
    """One video of a dense batch un-pooled on the default backend comes back contiguous, as the
    fake implementation promises (ATen's 3D pooling backward returns a channels-first image, a
    transposed view of the token rows)."""
    x = randn(1, 40, 6, generator=torch.Generator().manual_seed(8))
    geometry = packed.dense_geometry((2, 4, 5), (1, 2, 3), x)
    grad = randn(6, 6, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(torch.ops.deco.unpool_tokens_packed, (grad, geometry, 40, "average"), test_utils="test_faketensor")


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    packing = deco_ops.packed.Packing([(4, 5), (3, 3)], [(2, 3), (2, 2)])
    x = torch.randn(packing.num_tokens, 6, requires_grad=True)
    g = torch.randn(packing.num_out, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.deco.pool_tokens_packed, (x, packing.geometry, packing.num_out, mode))
    torch.library.opcheck(torch.ops.deco.unpool_tokens_packed, (g, packing.geometry, packing.num_tokens, mode))
    w1, b1, w2, b2 = [p.requires_grad_(True) for p in _mlp_params(6, 8, 5, torch.float32)]
    torch.library.opcheck(torch.ops.deco.pool_mlp_packed, (x, w1, b1, w2, b2, packing.geometry, packing.num_out, "gelu", mode, True))


def test_grids_on_any_int_dtype_and_2d_3d_sizes(backend):
    """Grid tables of any integer dtype (int8 and uint8 too: a compact table of small grids) pool
    as the int64 table does."""
    x = torch.randn(20 + 18, 3)
    want, _ = deco_ops.adaptive_avg_pool_tokens_packed(x, torch.tensor([[4, 5], [3, 6]]), stride=(2, 2))
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, torch.tensor([[4, 5], [3, 6]], dtype=dtype), stride=(2, 2))
        assert y.shape == (6 + 6, 3) and cu.tolist() == [0, 6, 12] and torch.equal(y, want), dtype
    y, cu = deco_ops.adaptive_avg_pool_tokens_packed(torch.randn(12, 3), torch.tensor([[3, 2, 2]]), out_grids=torch.tensor([[1, 1, 1]]))
    assert y.shape == (1, 3) and cu.tolist() == [0, 1]


G = torch.tensor([[4, 5], [3, 3]])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(1, 29, 4)}, ValueError, "x must have 2 dimensions"),
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        ({"x": torch.randint(0, 3, (29, 4))}, TypeError, "x has dtype"),
        ({"x": torch.randn(28, 4)}, ValueError, r"sum\(prod\(grids\)\) = 29"),
        ({"x": torch.randn(30, 4)}, ValueError, r"x has 30 tokens but grids need sum\(prod\(grids\)\) = 29"),
        ({"grids": [[4, 5], [3, 3]]}, TypeError, "grids must be an int torch.Tensor"),
        ({"grids": G.float()}, TypeError, "grids must be an integer tensor"),
        ({"grids": torch.tensor([4, 5])}, ValueError, "grids must have shape"),
        ({"grids": torch.tensor([[4, 5, 1, 1]])}, ValueError, "grids must have shape"),
        ({"grids": torch.zeros(0, 2, dtype=torch.int64)}, ValueError, "at least one image"),
        ({"grids": torch.tensor([[29, 0], [0, 3]])}, ValueError, r"grids\[0\] = \(29, 0\): entries must be >= 1"),
        ({"out_grids": None, "stride": None}, ValueError, "exactly one of out_grids"),
        ({"stride": 2}, ValueError, "exactly one of out_grids"),
        ({"out_grids": torch.tensor([[2, 2]])}, ValueError, "out_grids has 1 rows but grids has 2"),
        ({"out_grids": torch.tensor([[2, 2, 1], [1, 1, 1]])}, ValueError, "out_grids has 3 columns"),
        ({"out_grids": torch.tensor([[2, 2], [0, 1]])}, ValueError, r"out_grids\[1\]"),
        ({"out_grids": None, "stride": 0}, ValueError, "stride entries must be >= 1"),
        ({"out_grids": None, "stride": (2, 2, 2)}, ValueError, "stride must be an int or a tuple of 2"),
        ({"out_grids": None, "stride": 2.0}, ValueError, "stride must be an int"),
        ({"out_grids": None, "stride": True}, ValueError, "stride must be an int or a tuple of 2 ints .*, got True"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(29, 4), "grids": G, "out_grids": torch.tensor([[2, 2], [1, 1]]), "stride": None} | kwargs
    with deco_ops.use_backend("triton"), mock.patch.object(packed_pool.pool_packed_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.adaptive_avg_pool_tokens_packed(args["x"], args["grids"], out_grids=args["out_grids"], stride=args["stride"])
    launch.assert_not_called()


@pytest.mark.parametrize("mode", MODES)
def test_float64_on_the_pytorch_backend(mode):
    """The PyTorch backend resamples float64 tokens and projects them with float64 weights (the
    kernels take 16- and 32-bit ones), packed and dense."""
    grids, outs = [(4, 5), (3, 3)], [(2, 3), (2, 2)]
    x, _ = _case(grids, outs, torch.float64, C=4, seed=24)
    w1, b1, w2, b2 = _mlp_params(4, 8, 5, torch.float64, seed=25)
    want = loop64(x, grids, outs, mode)
    with deco_ops.use_backend("torch"):
        y, _ = _pool_fn(mode)(x, _t(grids), out_grids=_t(outs))
        z, _ = deco_ops.pool_mlp_packed(x, _t(grids), w1, b1, w2, b2, out_grids=_t(outs), mode=mode)
        dense = deco_ops.bilinear_pool_tokens(x[:20][None], (4, 5), (2, 3))
    assert y.dtype == z.dtype == dense.dtype == torch.float64
    assert_close(y, want, torch.float64, "pooled")
    assert_close(z, F.linear(F.gelu(F.linear(want, w1, b1)), w2, b2), torch.float64, "projected")
    assert_close(dense[0], loop64(x[:20], grids[:1], outs[:1], "bilinear"), torch.float64, "bilinear")


def test_bad_mlp_input():
    x = torch.randn(29, 4)
    w1, b1, w2, b2 = _mlp_params(4, 8, 5, torch.float32)
    outs = torch.tensor([[2, 2], [1, 1]])
    with pytest.raises(ValueError, match="mode must be one of"):
        deco_ops.pool_mlp_packed(x, G, w1, b1, w2, b2, out_grids=outs, mode="nearest")
    with pytest.raises(ValueError, match="w1 has shape"):
        deco_ops.pool_mlp_packed(x, G, w1[:, :3], b1, w2, b2, out_grids=outs)
    with pytest.raises(TypeError, match="w2 has dtype"):
        deco_ops.pool_mlp_packed(x, G, w1, b1, w2.double(), b2, out_grids=outs)
    with pytest.raises(TypeError, match="w1 has dtype torch.float16 but x has torch.float32"):
        deco_ops.pool_mlp_packed(x, G, w1.half(), b1.half(), w2.half(), b2.half(), out_grids=outs)
    with pytest.raises(ValueError, match="activation must be one of"):
        deco_ops.pool_mlp_packed(x, G, w1, b1, w2, b2, out_grids=outs, activation="relu")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_pool_packed_fuzz_large(seed):
    """Bigger random mixes up to 40x40 (down to 1x1 outputs) on the Triton kernels."""
    rng = random.Random(seed)
    grids = [(rng.randint(1, 40), rng.randint(1, 40)) for _ in range(6)]
    outs = [tuple(rng.randint(1, s) for s in g) for g in grids]
    x, dy = _case(grids, outs, torch.float32, C=33, seed=seed)
    x.requires_grad_(True)
    for mode in MODES:
        with deco_ops.use_backend("triton"):
            y, _ = _pool_fn(mode)(x, _t(grids), out_grids=_t(outs))
            (dx,) = torch.autograd.grad(y, x, dy)
        x64 = x.detach().double().requires_grad_(True)
        y64 = loop64(x64, grids, outs, mode)
        (dx64,) = torch.autograd.grad(y64, x64, dy.double())
        assert_close(y, y64, torch.float32)
        assert_close(dx, dx64, torch.float32)


def _packed_pool_reference(x, grids, out_grids):
    """float64 pooling of each image of a packed batch (rows back to back)."""
    outs, start = [], 0
    for g, o in zip(grids.tolist(), out_grids.tolist()):
        n = math.prod(g)
        outs.append(deco_ops.reference.adaptive_avg_pool_tokens(x[start: start + n].double()[None], g, o)[0])
        start += n
    return torch.cat(outs)


def test_tables_that_cannot_key_a_plan_are_read_on_every_call(backend):
    """A packed call's plan is keyed on its grid tables' values. Tables whose values cannot key one
    (an integer ``nn.Parameter``) take the full path on every call: a second call with other values
    of the same shape pools by its own grids, not the first call's."""
    x = randn(24, 8, generator=torch.Generator().manual_seed(11))
    for rows, outs in (([[4, 4], [2, 4]], [[2, 2], [1, 3]]), ([[2, 4], [4, 4]], [[1, 3], [2, 2]]), ([[3, 4], [3, 4]], [[2, 2], [3, 1]])):
        grids = torch.nn.Parameter(torch.tensor(rows, device=DEVICE), requires_grad=False)
        out_grids = torch.nn.Parameter(torch.tensor(outs, device=DEVICE), requires_grad=False)
        y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)
        assert_close(y, _packed_pool_reference(x, grids, out_grids), x.dtype, "pooled")
        assert cu.tolist() == [0, math.prod(outs[0]), math.prod(outs[0]) + math.prod(outs[1])]


def test_plan_made_under_a_device_context_keeps_host_tables(backend):
    """A packed call's plan holds host tables built on the CPU whatever ``torch.device`` context the
    call that built them ran in; the later calls of its signature use them, outside the context too."""
    x = randn(24, 8, generator=torch.Generator().manual_seed(12))
    grids, out_grids = torch.tensor([[4, 4], [2, 4]], device=DEVICE), torch.tensor([[2, 2], [1, 1]], device=DEVICE)
    with torch.device("meta"):
        y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)
    for _ in range(2):
        assert y.device == cu.device == x.device
        assert_close(y, _packed_pool_reference(x, grids, out_grids), x.dtype, "pooled")
        y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)


def test_packed_calls_under_inference_mode(backend):
    """Under ``torch.inference_mode()`` the geometry tables are inference tensors, which have no
    version counter: the kernels' image index is built for them without its cache; a plan made
    there serves the ``no_grad`` calls of its signature too."""
    x = randn(24, 8, generator=torch.Generator().manual_seed(13))
    grids, out_grids = torch.tensor([[4, 4], [2, 4]], device=DEVICE), torch.tensor([[2, 2], [1, 1]], device=DEVICE)
    w1, b1, w2, b2 = randn(6, 8, generator=torch.Generator().manual_seed(14)), randn(6, generator=torch.Generator().manual_seed(15)), randn(5, 6, generator=torch.Generator().manual_seed(16)), randn(5, generator=torch.Generator().manual_seed(17))
    want = _packed_pool_reference(x, grids, out_grids)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            y, _ = deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)
            z, _ = deco_ops.pool_mlp_packed(x, grids, w1, b1, w2, b2, out_grids=out_grids)
        assert_close(y, want, x.dtype, "pooled")
        assert_close(z, F.linear(F.gelu(F.linear(want, w1.double(), b1.double())), w2.double(), b2.double()), x.dtype, "projected")


def test_cu_seqlens_written_by_the_caller_leave_the_next_call_alone(backend):
    """A packed call's plan holds its ``cu_seqlens``; each call returns its own copy: a caller that
    writes to the one it got (offsetting it in place into a longer sequence) leaves the next call's
    offsets as they were."""
    x = randn(24, 8, generator=torch.Generator().manual_seed(18))
    grids, out_grids = torch.tensor([[4, 4], [2, 4]]), torch.tensor([[2, 2], [1, 3]])
    for _ in range(2):
        y, cu = deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=out_grids)
        assert cu.tolist() == [0, 4, 7]
        assert_close(y, _packed_pool_reference(x, grids, out_grids), x.dtype, "pooled")
        cu += 100


def test_dense_geometry_written_in_place_is_read_again():
    """A dense batch's cached geometry table knows its layout without a host read (the PyTorch path
    pools it in one call); written in place since (a buffer reused for another batch's layout), the
    PyTorch path reads the rows again and pools each image by its own."""
    x = randn(2, 16, 3, generator=torch.Generator().manual_seed(19))
    grids, outs = [(4, 4), (4, 4)], [(1, 1), (2, 2)]
    geometry = packed.dense_geometry((4, 4), (2, 2), x)
    dense_rows = geometry.clone()
    try:
        geometry.copy_(packed.Packing(grids, outs).geometry)
        with deco_ops.use_backend("torch"), poisoned_empty():
            y = torch.ops.deco.pool_tokens_packed(x.reshape(32, 3), geometry, 5, "average")
        assert_close(y, loop64(x.reshape(32, 3).double(), grids, outs, "average"), torch.float32)
    finally:  # the cached table (plans hold it too) gets its rows back; later tables are new ones
        geometry.copy_(dense_rows)
        packed._dense_geometry_view.cache_clear()
        packed_pool.dense_geometry.cache_clear()


@pytest.mark.parametrize("weight", ["w2", "b2"])
def test_second_layer_alone_trains_under_a_dispatch_mode(backend, weight):
    """Only the second Linear's weight or bias requires grad, under a dispatch mode (a profiler's,
    a FLOP counter's: the call goes through ``torch.ops.deco`` and the op's own autograd formula,
    where a plain call's ``F.linear`` records those gradients itself): the op keeps its residuals
    and the gradient is float64's, packed and dense."""
    from harness import PassThrough

    grids, outs = [(4, 4), (3, 4)], [(2, 2), (2, 3)]
    x, _ = _case(grids, outs, torch.float32, C=4, seed=20)
    params = _mlp_params(4, 8, 5, torch.float32, seed=21)
    index = ("w1", "b1", "w2", "b2").index(weight)
    dy = randn(10, 5, generator=torch.Generator().manual_seed(22))
    ref = [leaf(p, torch.float64) for p in params]
    F.linear(F.gelu(F.linear(loop64(x.double(), grids, outs, "average"), ref[0], ref[1])), ref[2], ref[3]).backward(dy.double())
    dense_ref = [leaf(p, torch.float64) for p in params]
    dense_x = x[:16].view(1, 16, 4)
    y64 = F.linear(F.gelu(F.linear(loop64(x[:16].double(), grids[:1], outs[:1], "average"), dense_ref[0], dense_ref[1])), dense_ref[2], dense_ref[3])
    y64.backward(dy[:4].double())
    for call, got_dy, want in (
        (lambda p: deco_ops.pool_mlp_packed(x, _t(grids), *p, out_grids=_t(outs))[0], dy, ref[index].grad),
        (lambda p: packed.pool_mlp_resampled(dense_x, *p, grid=(4, 4), out_grid=(2, 2))[0], dy[:4], dense_ref[index].grad),
    ):
        trained = [p.clone().requires_grad_(i == index) for i, p in enumerate(params)]
        with PassThrough(), poisoned_empty():
            y = call(trained)
            y.backward(got_dy)
        assert_close(trained[index].grad, want, torch.float32, f"grad {weight}")


def test_packed_ops_on_meta_tensors(auto_backend):
    """Meta tokens run the packed ops as they run the dense ones (shapes only, forward and backward,
    as a loop of PyTorch's pooling over the images does): the PyTorch path reads the host geometry
    table, which a meta copy of it has no values for (every packed op but the merge's block order
    raised NotImplementedError, "Cannot copy out of meta tensor")."""
    grids, grids_thw = torch.tensor([[4, 4], [3, 5]]), torch.tensor([[1, 4, 4], [1, 2, 6]])
    w1, w1_merge, w2 = (torch.empty(*shape, device="meta", requires_grad=True) for shape in ((6, 8), (6, 32), (5, 6)))
    norm_weight = torch.empty(8, device="meta", requires_grad=True)
    ops = {
        "adaptive_avg_pool_tokens_packed": (31, lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, grids, stride=2), 8),
        "bilinear_pool_tokens_packed": (31, lambda x: deco_ops.bilinear_pool_tokens_packed(x, grids, stride=2), 8),
        "pool_mlp_packed": (31, lambda x: deco_ops.pool_mlp_packed(x, grids, w1, None, w2, None, stride=2), 5),
        "mlp_pool_packed": (31, lambda x: deco_ops.mlp_pool_packed(x, grids, w1, None, w2, None, stride=2), 5),
        "merge_mlp_packed grid": (28, lambda x: deco_ops.merge_mlp_packed(x, grids_thw, norm_weight, None, w1_merge, None, w2, None,
                                                                           order="grid"), 5),
    }
    for name, (tokens, op, width) in ops.items():
        x = torch.empty(tokens, 8, device="meta", requires_grad=True)
        y, cu = op(x)
        want_rows = 10 if tokens == 31 else 7
        assert y.shape == (want_rows, width) and y.device.type == "meta", name
        assert cu.shape == (3,) and cu.dtype == torch.int32, name
        y.sum().backward()
        assert x.grad.shape == x.shape and x.grad.device.type == "meta", name


def test_pool_mlp_packed_with_frozen_first_linear_keeps_no_pooled_input():
    """The pooled input is read for dW1 alone: with frozen weights (only x trains) only the
    pre-activation is kept, as eager does; dx equals the dense op's."""
    g = torch.Generator().manual_seed(0)
    x = randn(2, 144, 64, generator=g)
    w1, b1 = randn(256, 64, scale=0.125, generator=g), randn(256, generator=g)
    w2, b2 = randn(256, 256, scale=0.0625, generator=g), randn(256, generator=g)
    xp = leaf(x.reshape(288, 64))
    grids = torch.tensor([[12, 12], [12, 12]])
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        y, _ = deco_ops.pool_mlp_packed(xp, grids, w1, b1, w2, b2, out_grids=torch.tensor([[6, 6], [6, 6]]))
    assert (72, 64) not in kept and (72, 256) in kept  # no pooled input, the pre-activation
    dy = randn(72, 256, generator=g)
    y.backward(dy)
    xd = leaf(x)
    deco_ops.pool_mlp(xd, w1, b1, w2, b2, grid=(12, 12), out_grid=(6, 6)).backward(dy.view(2, 36, 256))
    assert_close(xp.grad, xd.grad.view(288, 64), torch.float32, "grad x")
