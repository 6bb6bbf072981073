"""mlp_pool (project then pool, PLLaVA / LLaVA-OneVision) and DeCoProjector's order/mode switches,
forward and every gradient, against float64 eager PyTorch in the eager order pool(Linear2(act(Linear1(x))))."""

import math
import random
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import deco_ops
from deco_ops import reference
from deco_ops.kernels import mlp_pool as mlp_pool_kernel
from deco_ops.kernels import pool_gemm
from harness import (DEVICE, DTYPES, assert_close, guarded, guarded_strided, head_strided, leaf, peak_bytes, poisoned_empty, randn, rel_err,
                     training_step)
from test_packed import _mlp_params, _t, loop64, random_mix, resample64

GRIDS = [
    ((24, 24), (12, 12)),
    ((27, 27), (12, 12)),
    ((5, 9), (3, 4)),
    ((4, 4), (4, 4)),
    ((3, 2), (4, 5)),
    ((4, 6, 6), (2, 3, 3)),
]


def eager64(params, grid, out_grid, activation, mode):
    """PLLaVA's order in float64: the MLP on every token, then pool."""
    x, w1, b1, w2, b2 = params
    h = F.linear(reference.ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2)
    return torch.stack([resample64(h[b], grid, out_grid, mode) for b in range(x.shape[0])])


def _case(grid, out_grid, dtype, B=2, C=37, hidden=48, out=29, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = randn(B, math.prod(grid), C, dtype=dtype, generator=gen)
    dy = randn(B, math.prod(out_grid), out, dtype=dtype, generator=gen)
    return [x, *_mlp_params(C, hidden, out, dtype, bias=bias, seed=seed)], dy


def _check(params, dy, grid, out_grid, dtype, activation="gelu", mode="average", requires_x=True):
    # the biases at stride 4 between NaNs: the kernels read each as contiguous (the ops copy one that is not)
    leaves = [leaf(guarded_strided(p) if p is not None else None) for p in params]
    if not requires_x:
        leaves[0].requires_grad_(False)
    with poisoned_empty():
        y = deco_ops.mlp_pool(*leaves, grid=grid, out_grid=out_grid, activation=activation, mode=mode)
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    y64 = eager64(ref, grid, out_grid, activation, mode)
    y64.backward(dy.double())
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        if got is None or not got.requires_grad:
            continue
        assert_close(got.grad, want.grad, dtype, f"grad {name}")
    if not requires_x:
        assert leaves[0].grad is None


@pytest.mark.parametrize("grid,out_grid", GRIDS)
@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pool(backend, grid, out_grid, mode, dtype):
    params, dy = _case(grid, out_grid, dtype, B=1 if math.prod(grid) > 200 else 2, C=24, hidden=40, out=20)
    _check(params, dy, grid, out_grid, dtype, mode=mode)


@pytest.mark.parametrize("B", [1, 2])
def test_mlp_pool_reads_channel_strided_tokens(backend, B):
    """Tokens whose channels are strided (a (B, C, N) map's transposed view, inside NaN padding):
    at B = 1 the op's (N, C) rows are that view (at B > 1 its reshape copies them), and the forward
    GEMM and the backward's un-pool + act' GEMM read them by their strides."""
    params, dy = _case((6, 6), (3, 3), torch.float32, B=B, C=8, hidden=16, out=8)
    leaves = [leaf(head_strided(params[0])), *map(leaf, params[1:])]
    with poisoned_empty():
        y = deco_ops.mlp_pool(*leaves, grid=(6, 6), out_grid=(3, 3))
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    y64 = eager64(ref, (6, 6), (3, 3), "gelu", "average")
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "quick_gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pool_activations(backend, activation, dtype):
    params, dy = _case((6, 5), (3, 2), dtype, C=64, hidden=96, out=70)
    _check(params, dy, (6, 5), (3, 2), dtype, activation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pool_without_bias_and_frozen_tokens(backend, dtype):
    params, dy = _case((7, 7), (3, 3), dtype, bias=False, B=1)
    _check(params, dy, (7, 7), (3, 3), dtype, requires_x=False)


@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pool_packed(backend, mode, dtype):
    grids, outs = random_mix(4, 4, 2, max_tokens=300)
    C, hidden, out = 20, 36, 18
    gen = torch.Generator().manual_seed(2)
    x = randn(sum(map(math.prod, grids)), C, dtype=dtype, generator=gen)
    dy = randn(sum(map(math.prod, outs)), out, dtype=dtype, generator=gen)
    params = [x, *_mlp_params(C, hidden, out, dtype)]
    leaves = [leaf(guarded(p)) for p in params]
    with poisoned_empty():
        y, cu = deco_ops.mlp_pool_packed(leaves[0], _t(grids), *leaves[1:], out_grids=_t(outs), mode=mode)
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    h = F.linear(F.gelu(F.linear(ref[0], ref[1], ref[2])), ref[3], ref[4])
    y64 = loop64(h, grids, outs, mode)
    y64.backward(dy.double())
    assert cu.tolist()[-1] == y.shape[0]
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, dtype, f"grad {name}")


def test_mlp_pool_packed_equals_single_image_loop(backend):
    grids, outs = [(6, 6), (5, 9)], [(3, 3), (3, 5)]
    x = torch.randn(sum(map(math.prod, grids)), 16)
    w = _mlp_params(16, 32, 24, torch.float32)
    y, _ = deco_ops.mlp_pool_packed(x, _t(grids), *w, stride=2)
    ys = [deco_ops.mlp_pool(xi[None], *w, grid=g, out_grid=o)[0]
          for xi, g, o in zip(x.split([math.prod(g) for g in grids]), grids, outs)]
    assert_close(y, torch.cat(ys), torch.float32, "vs loop")


def _cancelling_case(seed: int, dtype):
    """A small random case where tokens lie in several windows (overlap, up-sampling, bilinear taps)
    whose gradients nearly cancel: neighbouring outputs get opposite gradients plus 1% noise."""
    rng = random.Random(seed)
    ndim = rng.choice((2, 2, 3))
    grid = tuple(rng.randint(1, 4 if ndim == 2 else 3) for _ in range(ndim))
    out_grid = tuple(rng.randint(max(1, g - 1), g + 3) for g in grid)
    mode = rng.choice(("average", "bilinear"))
    C, hidden, out = rng.randint(1, 6), rng.randint(8, 64), rng.randint(1, 3)
    params, _ = _case(grid, out_grid, dtype, B=1, C=C, hidden=hidden, out=out, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    P = math.prod(out_grid)
    sign = torch.tensor([(-1.0) ** (i + i // out_grid[-1]) for i in range(P)], dtype=torch.float64)
    dy = sign[:, None] * torch.randn(1, out, dtype=torch.float64, generator=gen)
    dy = dy + 0.01 * torch.randn(P, out, dtype=torch.float64, generator=gen)
    return grid, out_grid, mode, params, dy[None].to(dtype)


def _grad_x(forward, params, dy):
    leaves = [leaf(p) for p in params]
    forward(leaves).backward(dy.to(leaves[0].dtype))
    return leaves[0].grad


# (backend, dtype, seeds): 50 cases on the PyTorch backend; fewer through the (slow) interpreter,
# where both strategies run
PRECISION_RUNS = [("auto", torch.float16, 50), ("auto", torch.bfloat16, 50), ("triton", torch.float16, 12)]


@pytest.mark.parametrize("backend_name,dtype,seeds", PRECISION_RUNS, ids=["torch-fp16", "torch-bf16", "triton-fp16"])
def test_grad_x_where_windows_overlap_is_as_accurate_as_eager(backend_name, dtype, seeds):
    """dy @ W2 per window stays fp32 until un-pooled: a 16-bit round first loses what cancels
    (the old order: up to 58x eager's error on these cases). 16-bit grad x against float64 on the
    same inputs is no worse than eager PyTorch's own (1.5x plus half an ulp of slack)."""
    eps = {torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    strategies = ("fused", "composed") if backend_name == "triton" else ("auto",)
    with deco_ops.use_backend(backend_name):
        for seed in range(seeds):
            grid, out_grid, mode, params, dy = _cancelling_case(seed, dtype)
            ref = _grad_x(lambda p: eager64(p, grid, out_grid, "gelu", mode), [p.double() for p in params], dy.double())
            eager = rel_err(_grad_x(lambda p: eager64(p, grid, out_grid, "gelu", mode), params, dy), ref)
            for strategy in strategies:
                with deco_ops.use_strategy(strategy):
                    got = rel_err(_grad_x(lambda p: deco_ops.mlp_pool(*p, grid=grid, out_grid=out_grid, mode=mode), params, dy), ref)
                assert got <= 1.5 * eager + eps, f"seed {seed} {grid}->{out_grid} {mode} {strategy}: grad x {got:.2e}, eager {eager:.2e}"


@pytest.mark.parametrize("backend_name,strategy", [("triton", "fused"), ("triton", "composed"), ("torch", "auto")],
                         ids=["kernel", "composed", "torch"])
def test_act_grad_at_the_rounded_pre_activation(backend_name, strategy):
    """The backward recomputes z = x @ w1.T + b1 and takes act' at z rounded to the operand
    dtype, as the forward stored it and eager's ``gelu_backward`` sees it: exact fp16 products
    (multiples of 1/64) and b1 = -0.75 put z near the root of gelu', where one fp16 ulp of z moves
    act' by ~10%. One 2x2 image pooled to 1x1: each token's gradient is act' / 4. The fused kernel,
    and the composed twins (act' in fp32 from the rounded z: its closed form in fp16 arithmetic
    cancels near the root, 0.15 off)."""
    from deco_ops.kernels.packed_pool import dense_geometry

    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-1, 2, (4, 16), generator=g) / 64).half().to(DEVICE)
    w1 = (torch.randint(-1, 2, (64, 16), generator=g) / 64).half().to(DEVICE)
    b1 = torch.full((64,), -0.75, dtype=torch.float16, device=DEVICE)
    geometry = dense_geometry((1, 2, 2), (1, 1, 1), 1, DEVICE)
    with deco_ops.use_backend(backend_name), deco_ops.use_strategy(strategy), poisoned_empty():
        dz = torch.ops.deco.mlp_pool_act_backward(x, w1, b1, torch.ones(1, 64, device=DEVICE), geometry, "gelu", "average")
    z = (x.double() @ w1.double().T + b1.double()).half().double()  # what the forward stored
    want = reference.ACTIVATION_GRADS["gelu"](z) / 4
    assert rel_err(dz, want) < 2e-3


def test_launches_and_what_backward_skips():
    """Forward: two pool_gemm launches (GEMM+act over tokens, pool+GEMM over pooled rows).
    Backward: one fused recompute/un-pool/act' launch, skipped when x, w1, b1 need no gradient."""
    params, dy = _case((6, 6), (3, 3), torch.float32, B=2, C=16, hidden=24, out=8)
    leaves = [leaf(p) for p in params]
    fwd, bwd = pool_gemm.pool_gemm_kernel, mlp_pool_kernel.gemm_unpool_act_grad_kernel
    with deco_ops.use_backend("triton"), mock.patch.object(fwd, "run", wraps=fwd.run) as f, \
            mock.patch.object(bwd, "run", wraps=bwd.run) as b:
        deco_ops.mlp_pool(*leaves, grid=(6, 6), out_grid=(3, 3)).backward(dy)
        assert f.call_count == 2 and b.call_count == 1
        for p in leaves[:3]:
            p.requires_grad_(False)
        deco_ops.mlp_pool(*leaves, grid=(6, 6), out_grid=(3, 3)).backward(dy)
        assert f.call_count == 4 and b.call_count == 1


def test_saved_tensors_are_small():
    """Nothing token-by-hidden is saved: only x (an input), weights, the pooled activation, geometry."""
    params, _ = _case((8, 8), (2, 2), torch.float32, B=1, C=16, hidden=64, out=8)
    leaves = [leaf(p) for p in params]
    sizes = []

    def pack(t):
        sizes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        deco_ops.mlp_pool(*leaves, grid=(8, 8), out_grid=(2, 2))
    assert (64, 64) not in sizes  # (tokens, hidden) pre-activation / activation
    assert (4, 64) in sizes  # pooled activation


@pytest.mark.parametrize("mode", ["average", "bilinear"])
def test_backward_peak_memory_is_near_eagers(auto_backend, mode, capsys):
    """Forward + backward peak against the eager code (project, pool, then the second Linear on the
    pooled rows): the act' of the recomputed pre-activation is formed in place, and the un-pooled
    gradient multiplies it in place, so the token-sized buffers at the peak are eager's three
    (pre-activation, activation, un-pooled gradient). Until 2026-12-07 the closed-form act' held
    three temporaries and its result beside the pre-activation and the un-pooled gradient, then the
    product: at LLaVA-1.5 widths (B=2, 24x24->12x12, C=1024, hidden=out=4096, fp32, GELU) 171536 KiB
    against eager's 130064 (1.32x; 134672 after: the fp32 d(pooled) rows kept for the un-pooling)."""
    g = torch.Generator().manual_seed(13)
    B, C, hidden, out, grid, out_grid = 2, 64, 256, 256, (24, 24), (12, 12)
    x = randn(B, math.prod(grid), C, generator=g)  # a frozen tower
    params = [randn(hidden, C, generator=g), randn(hidden, generator=g), randn(out, hidden, generator=g), randn(out, generator=g)]
    w1, b1, w2, b2 = (p.requires_grad_() for p in params)
    dy = randn(B, math.prod(out_grid), out, generator=g)

    def eager():
        act = F.gelu(F.linear(x, w1, b1)).view(B, *grid, hidden).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(act, out_grid) if mode == "average" else F.interpolate(act, size=out_grid, mode="bilinear")
        return F.linear(pooled.flatten(2).transpose(1, 2), w2, b2)

    ours = training_step(lambda: deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=grid, out_grid=out_grid, mode=mode), dy, params)
    ours_peak, eager_peak = peak_bytes(ours), peak_bytes(training_step(eager, dy, params))
    with capsys.disabled():
        print(f"\nmlp_pool ({mode}) forward + backward peak: ours {ours_peak / 2**10:.0f} KiB, eager {eager_peak / 2**10:.0f} KiB")
    token_buffer = x.shape[0] * x.shape[1] * hidden * 4
    assert ours_peak <= eager_peak + token_buffer * 3 // 4, (ours_peak, eager_peak)  # 2.25 token buffers more before


@pytest.mark.parametrize("mode", ["average", "bilinear"])
def test_opcheck(mode):
    packing = deco_ops.packed.Packing([(4, 5), (3, 3)], [(2, 3), (2, 2)])
    x = torch.randn(packing.num_tokens, 6, requires_grad=True)
    w1, b1, w2, b2 = [p.requires_grad_(True) for p in _mlp_params(6, 8, 5, torch.float32)]
    torch.library.opcheck(torch.ops.deco.mlp_pool_packed, (x, w1, b1, w2, b2, packing.geometry, packing.num_out, "gelu", mode, True))
    dpa = torch.randn(packing.num_out, 8)
    torch.library.opcheck(torch.ops.deco.mlp_pool_act_backward, (x.detach(), w1.detach(), b1.detach(), dpa, packing.geometry, "silu", mode))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(36, 4)}, ValueError, "x must have 3 dimensions"),
        ({"x": torch.randn(2, 35, 4)}, ValueError, "needs 36"),
        ({"grid": (6,)}, ValueError, "grid must have 2"),
        ({"out_grid": (3, 3, 1)}, ValueError, "as many entries"),
        ({"mode": "area"}, ValueError, "mode must be one of"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"w1": torch.randn(8, 5)}, ValueError, "w1 has shape"),
        ({"w2": torch.randn(5, 7)}, ValueError, "w2 has shape"),
        ({"b2": torch.randn(5).double()}, TypeError, "b2 has dtype"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"x": torch.randn(2, 36, 4), "w1": torch.randn(8, 4), "b1": torch.randn(8), "w2": torch.randn(5, 8),
            "b2": torch.randn(5), "grid": (6, 6), "out_grid": (3, 3), "mode": "average", "activation": "gelu"} | kwargs
    with deco_ops.use_backend("triton"), mock.patch.object(pool_gemm.pool_gemm_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.mlp_pool(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], grid=args["grid"],
                              out_grid=args["out_grid"], activation=args["activation"], mode=args["mode"])
    launch.assert_not_called()


# ----------------------------------------------------------------------------------------------
# DeCoProjector(order=..., mode=...)


@pytest.mark.parametrize("order", ["pool_mlp", "mlp_pool"])
@pytest.mark.parametrize("mode", ["average", "bilinear"])
def test_projector_order_and_mode(backend, order, mode):
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(12, 10, hidden_features=16, grid=(6, 6), out_grid=(3, 3), order=order, mode=mode,
                                  num_prefix_tokens=1)
    x = torch.randn(2, 37, 12, requires_grad=True)
    y = proj(x)
    p64 = [t.detach().double() for t in (x[:, 1:], proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc2.bias)]
    if order == "mlp_pool":
        y64 = eager64(p64, (6, 6), (3, 3), "gelu", mode)
    else:
        pooled = torch.stack([resample64(p64[0][b], (6, 6), (3, 3), mode) for b in range(2)])
        y64 = F.linear(F.gelu(F.linear(pooled, p64[1], p64[2])), p64[3], p64[4])
    assert_close(y, y64, torch.float32)
    y.sum().backward()
    assert x.grad is not None and proj.fc1.weight.grad is not None
    # per-call grids (AnyRes): no rebuild
    assert proj(torch.randn(1, 1 + 20, 12), grid=(4, 5), out_grid=(2, 2)).shape == (1, 4, 10)
    assert f"order={order!r}" in repr(proj) and f"mode={mode!r}" in repr(proj)


def test_projector_bad_switches():
    with pytest.raises(ValueError, match="order must be one of"):
        deco_ops.DeCoProjector(4, 4, order="pool_then_mlp")
    with pytest.raises(ValueError, match="mode must be one of"):
        deco_ops.DeCoProjector(4, 4, mode="nearest")


@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("B,hidden", [(0, 48), (2, 0)], ids=["empty-batch", "empty-hidden-layer"])
def test_mlp_pool_of_nothing(backend, mode, B, hidden):
    """An empty batch gives a (0, P, out) output and empty gradients; an empty hidden layer gives
    b2 at every pooled token (the pooled constant), as ``pool_mlp`` and eager PyTorch do (no
    reshape of zero elements to -1)."""
    g = torch.Generator().manual_seed(3)
    C, out = 8, 6
    x, w1, b1 = randn(B, 16, C, generator=g), randn(hidden, C, generator=g), randn(hidden, generator=g)
    w2, b2 = randn(out, hidden, generator=g), randn(out, generator=g)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    y = deco_ops.mlp_pool(*leaves, grid=(4, 4), out_grid=(3, 3), mode=mode)
    assert y.shape == (B, 9, out)
    assert torch.equal(y, b2.detach().expand(B, 9, out))  # no hidden unit, or no token: b2 alone
    dy = randn(B, 9, out, generator=g)
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    assert [tuple(gr.shape) for gr in grads] == [tuple(t.shape) for t in leaves]
    assert torch.allclose(grads[4], dy.sum((0, 1)))
    assert all(not gr.any() for gr in grads[:4])


@pytest.mark.parametrize("mode", ["average", "bilinear"])
def test_frozen_second_linear_keeps_no_pooled_activation(mode):
    """The pooled activation is read for dW2 alone: with frozen weights (only x trains) nothing is
    kept but the inputs (x, the weights, the geometry); dx is unchanged (float64 eager)."""
    params, dy = _case((12, 12), (6, 6), torch.float32, C=64, hidden=256, out=64)
    x, (w1, b1, w2, b2) = leaf(params[0]), params[1:]
    kept = {}

    def pack(t):
        if t.shape == (2 * 36, 256):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=(12, 12), out_grid=(6, 6), mode=mode)
    assert not kept  # no (P, hidden) pooled activation
    y.backward(dy)
    x64 = leaf(params[0], torch.float64)
    eager64([x64, *(p.double() for p in params[1:])], (12, 12), (6, 6), "gelu", mode).backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad x")
