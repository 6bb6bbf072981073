"""pool_linear and pool_mlp, forward and every gradient, against float64 eager PyTorch."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import deco_ops
from deco_ops import reference
from deco_ops.kernels import activation_backward, adaptive_pool, gemm_act_grad, mlp_pool, packed_pool, pool_gemm
from harness import (DEVICE, DTYPES, assert_close, assert_rounded_once, guarded, guarded_strided, leaf, peak_bytes, poisoned_empty, randn,
                     saved_bytes, training_step)

GRIDS = [
    ((24, 24), (12, 12)),
    ((27, 27), (12, 12)),
    ((24, 24), (7, 7)),
    ((5, 9), (3, 4)),
    ((4, 4), (4, 4)),
    ((3, 2), (4, 5)),
    ((4, 6, 6), (2, 3, 3)),
]


ACTIVATION_NAMES = ["gelu", "gelu_tanh", "silu", "quick_gelu"]


def _mlp_case(grid, out_grid, dtype, B=2, C=37, hidden=48, out=29, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn(B, math.prod(grid), C, dtype=dtype, generator=g)
    w1 = randn(hidden, C, dtype=dtype, scale=C**-0.5, generator=g)
    b1 = randn(hidden, dtype=dtype, generator=g) if bias else None
    w2 = randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=g)
    b2 = randn(out, dtype=dtype, generator=g) if bias else None
    dy = randn(B, math.prod(out_grid), out, dtype=dtype, generator=g)
    return [x, w1, b1, w2, b2], dy


def _check_mlp(params, dy, grid, out_grid, dtype, activation, requires_x=True):
    # the biases at stride 4 between NaNs: the kernels read each as contiguous (the ops copy one that is not)
    leaves = [leaf(guarded_strided(p) if p is not None else None) for p in params]
    if not requires_x:
        leaves[0].requires_grad_(False)
    with poisoned_empty():
        y = deco_ops.pool_mlp(*leaves, grid=grid, out_grid=out_grid, activation=activation)
        y.backward(guarded(dy))
        with torch.no_grad():  # inference: the implementations' other branch (no residuals kept)
            y_infer = deco_ops.pool_mlp(*leaves, grid=grid, out_grid=out_grid, activation=activation)
    ref = [leaf(p, torch.float64) for p in params]
    y64 = reference.pool_mlp(*ref, grid, out_grid, activation)
    y64.backward(dy.double())
    assert y.dtype == y_infer.dtype == dtype
    assert_close(y, y64, dtype, "y")
    assert_close(y_infer, y64, dtype, "y without grad")
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        if got is None or not got.requires_grad:
            continue
        assert_close(got.grad, want.grad, dtype, f"grad {name}")
    if not requires_x:
        assert leaves[0].grad is None


@pytest.mark.parametrize("grid,out_grid", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_mlp(backend, grid, out_grid, dtype):
    params, dy = _mlp_case(grid, out_grid, dtype, B=1 if math.prod(grid) > 200 else 2)
    _check_mlp(params, dy, grid, out_grid, dtype, "gelu")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_mlp_activations(backend, activation, dtype):
    params, dy = _mlp_case((6, 5), (3, 2), dtype, C=64, hidden=96, out=70)
    _check_mlp(params, dy, (6, 5), (3, 2), dtype, activation)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_mlp_without_bias_and_frozen_tokens(backend, dtype):
    params, dy = _mlp_case((7, 7), (3, 3), dtype, bias=False, B=1)
    _check_mlp(params, dy, (7, 7), (3, 3), dtype, "gelu", requires_x=False)


@pytest.mark.parametrize("grid,out_grid", [((24, 24), (12, 12)), ((27, 27), (12, 12)), ((5, 9), (3, 4)), ((3, 4, 4), (2, 2, 2))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_pool_linear(backend, grid, out_grid, dtype, bias):
    (x, w, b, _, _), _ = _mlp_case(grid, out_grid, dtype, B=1, bias=bias)
    dy = randn(1, math.prod(out_grid), w.shape[0], dtype=dtype)
    leaves = [leaf(guarded(x)), leaf(guarded(w)), leaf(b if b is None else guarded_strided(b))]
    with poisoned_empty():
        y = deco_ops.pool_linear(*leaves, grid=grid, out_grid=out_grid)
        y.backward(guarded(dy))
    ref = [leaf(t, torch.float64) for t in (x, w, b)]
    y64 = reference.pool_linear(*ref, grid, out_grid)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip(("x", "w", "b"), leaves, ref):
        if got is not None:
            assert_close(got.grad, want.grad, dtype, f"grad {name}")


def test_frozen_tokens_skip_unpooling():
    """A frozen vision tower (x without grad) costs no input-gradient work."""
    params, dy = _mlp_case((6, 6), (3, 3), torch.float32)
    leaves = [leaf(p) for p in params]
    leaves[0].requires_grad_(False)
    with deco_ops.use_backend("triton"), mock.patch.object(adaptive_pool.unpool_tokens_kernel, "run") as unpool:
        deco_ops.pool_mlp(*leaves, grid=(6, 6), out_grid=(3, 3)).backward(dy)
    unpool.assert_not_called()
    assert leaves[1].grad is not None


def test_triton_kernels_launch():
    params, dy = _mlp_case((6, 6), (3, 3), torch.float16)
    leaves = [leaf(p) for p in params]
    kernels = [pool_gemm.pool_gemm_kernel, gemm_act_grad.gemm_act_grad_kernel, adaptive_pool.unpool_tokens_kernel]
    with deco_ops.use_backend("triton"), mock.patch.multiple("deco_ops.reference", pool_mlp=mock.DEFAULT, mlp_activation_backward=mock.DEFAULT, unpool_tokens=mock.DEFAULT):
        spies = [mock.patch.object(k, "run", wraps=k.run) for k in kernels]
        mocks = [s.start() for s in spies]
        try:
            deco_ops.pool_mlp(*leaves, grid=(6, 6), out_grid=(3, 3)).backward(dy)
        finally:
            for s in spies:
                s.stop()
    assert [m.call_count for m in mocks] == [1, 1, 1]


def test_inference_keeps_no_residuals():
    params, _ = _mlp_case((6, 6), (3, 3), torch.float32)
    with torch.no_grad(), deco_ops.use_backend("triton"):
        y, pooled, pre = torch.ops.deco.pool_mlp(*params, [6, 6], [3, 3], "gelu", False)
    assert pooled.numel() == 0 and pre.numel() == 0 and y.shape == (2, 9, 29)


@pytest.mark.parametrize("strategy", ["fused", "composed"])
def test_gradient_of_the_pre_activation_output_joins_db1(strategy):
    """deco::pool_mlp's residual outputs are differentiable too: a loss on the pre-activation adds
    to dz after the activation backward, so db1 is summed from the total, not taken from the pass."""
    params, dy = _mlp_case((4, 6), (2, 3), torch.float32)
    dpre = randn(2, 6, 48, generator=torch.Generator().manual_seed(5))
    leaves = [leaf(p) for p in params]
    with deco_ops.use_backend("triton"), deco_ops.use_strategy(strategy):
        y, _, pre = torch.ops.deco.pool_mlp(*leaves, [4, 6], [2, 3], "gelu", True)
        ((y * dy).sum() + (pre * dpre).sum()).backward()
    ref = [leaf(p, torch.float64) for p in params]
    pre64 = torch.nn.functional.linear(reference.adaptive_avg_pool_tokens(ref[0], (4, 6), (2, 3)), ref[1], ref[2])
    y64 = torch.nn.functional.linear(reference.ACTIVATIONS["gelu"](pre64), ref[3], ref[4])
    ((y64 * dy.double()).sum() + (pre64 * dpre.double()).sum()).backward()
    for name, got, want in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref):
        assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


def _eager_pool_mlp(x, grid, out_grid, w1, b1, w2, b2):
    """The eager code a projector replaces, as a user writes it (temporaries in one expression)."""
    B, _, C = x.shape
    pooled = F.adaptive_avg_pool2d(x.view(B, *grid, C).permute(0, 3, 1, 2), out_grid).flatten(2).transpose(1, 2)
    return F.linear(F.gelu(F.linear(pooled, w1, b1)), w2, b2)


@pytest.mark.parametrize("op", ["pool_mlp", "pool_mlp_packed", "mlp_pool"])
def test_inference_peak_memory_is_no_more_than_eagers(auto_backend, op, capsys):
    """Inference (no grad) holds no more memory at its peak than the eager code the op replaces:
    the pre-activation is freed once the activation has read it, before the second Linear's output
    exists. Before 2026-12-07 the composed twins held it to the end (one hidden-sized buffer more:
    1.44x eager's peak, as the H200 run of 2026-12-04 showed at llava15_7b: 117 MiB against 81)."""
    g = torch.Generator().manual_seed(11)
    B, C, hidden, out, grid, out_grid = 2, 32, 512, 512, (24, 24), (12, 12)  # LLaVA: hidden = out
    x = randn(B, math.prod(grid), C, generator=g)
    w1, b1, w2, b2 = randn(hidden, C, generator=g), randn(hidden, generator=g), randn(out, hidden, generator=g), randn(out, generator=g)
    if op == "pool_mlp":
        def ours():
            return deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=grid, out_grid=out_grid)

        def eager():
            return _eager_pool_mlp(x, grid, out_grid, w1, b1, w2, b2)
    elif op == "pool_mlp_packed":  # the batch's images packed; eagerly pooled one by one, then one MLP
        grids, out_grids = torch.tensor([grid] * B), torch.tensor([out_grid] * B)

        def ours():
            return deco_ops.pool_mlp_packed(x.view(-1, C), grids, w1, b1, w2, b2, out_grids=out_grids)[0]

        def eager():
            pooled = torch.cat([F.adaptive_avg_pool2d(x[i].view(*grid, C).permute(2, 0, 1), out_grid).flatten(1).t() for i in range(B)])
            return F.linear(F.gelu(F.linear(pooled, w1, b1)), w2, b2)
    else:
        def ours():
            return deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=grid, out_grid=out_grid)

        def eager():
            act = F.gelu(F.linear(x, w1, b1))
            return F.linear(F.adaptive_avg_pool2d(act.view(B, *grid, hidden).permute(0, 3, 1, 2), out_grid).flatten(2).transpose(1, 2), w2, b2)
    with torch.no_grad():
        torch.testing.assert_close(ours(), eager(), rtol=1e-4, atol=1e-4)
        ours_peak, eager_peak = peak_bytes(ours), peak_bytes(eager)
    with capsys.disabled():
        print(f"\n{op} inference peak: ours {ours_peak / 2**10:.0f} KiB, eager {eager_peak / 2**10:.0f} KiB")
    hidden_buffer = B * math.prod(out_grid) * hidden * 4
    assert ours_peak <= eager_peak + hidden_buffer // 8, (ours_peak, eager_peak)


@pytest.mark.parametrize("C,tokens_require_grad,allowance", [(8, True, 1 / 8), (8, False, 1 / 8), (1024, False, 1.0)])
def test_training_peak_memory_is_no_more_than_eagers(auto_backend, C, tokens_require_grad, allowance, capsys):
    """Forward and backward (gradients unset before, as ``zero_grad()`` leaves them) hold no more at
    their peak than eager's: the backward frees ``dy @ W2`` before computing act(pre) for dW2, and
    act(pre) once dW2 has read it (it held each to the end: one hidden-sized buffer above eager's
    peak each, where eager frees its saved activation first). Rows outnumber the weights here, so
    the hidden buffers set the peak; at C = 1024, at dW1's GEMM: there one hidden-sized buffer
    more is allowed, the pre-activation, saved by the op's one autograd node until its backward
    returns (eager frees it after GELU's backward)."""
    g = torch.Generator().manual_seed(12)
    B, hidden, grid, out_grid = 4, 64, (24, 24), (12, 12)
    x = randn(B, math.prod(grid), C, generator=g).requires_grad_(tokens_require_grad)
    params = [randn(hidden, C, generator=g), randn(hidden, generator=g), randn(hidden, hidden, generator=g), randn(hidden, generator=g)]
    params = [p.requires_grad_() for p in params]
    dy = randn(B, math.prod(out_grid), hidden, generator=g)

    ours = training_step(lambda: deco_ops.pool_mlp(x, *params, grid=grid, out_grid=out_grid), dy, (x, *params))
    eager = training_step(lambda: _eager_pool_mlp(x, grid, out_grid, *params), dy, (x, *params))
    ours_peak, eager_peak = peak_bytes(ours), peak_bytes(eager)
    with capsys.disabled():
        print(f"\npool_mlp forward+backward peak (C={C}): ours {ours_peak / 2**10:.0f} KiB, eager {eager_peak / 2**10:.0f} KiB")
    hidden_buffer = B * math.prod(out_grid) * hidden * 4
    assert ours_peak <= eager_peak + allowance * hidden_buffer, (ours_peak / hidden_buffer, eager_peak / hidden_buffer)


@pytest.mark.parametrize("tokens_require_grad", [True, False])
def test_saved_for_backward_bytes(tokens_require_grad, capsys):
    """The fused projector keeps the pooled input and the pre-activation; eager keeps the patch
    tokens (when they need grad), the pooled input, the pre-activation and the activation.
    LLaVA-1.5 widths: with trainable tokens (P*(C+H)) / (N*C + P*(C+2H)) = 0.385; with a frozen
    tower the patch tokens drop out of both and the ratio is (C+H) / (C+2H) = 0.556."""
    B, C, hidden, out = 1, 1024, 4096, 4096
    x = torch.randn(B, 576, C, requires_grad=tokens_require_grad)
    fc1, fc2 = torch.nn.Linear(C, hidden), torch.nn.Linear(hidden, out)

    def eager():
        img = x.transpose(1, 2).reshape(B, C, 24, 24)
        pooled = torch.nn.functional.adaptive_avg_pool2d(img, (12, 12)).flatten(2).transpose(1, 2)
        return fc2(torch.nn.functional.gelu(fc1(pooled)))

    def fused():
        return deco_ops.pool_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, grid=(24, 24), out_grid=(12, 12))

    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    # The residuals are the custom op's outputs whatever backend computes them; the reference
    # backend keeps this LLaVA-sized case fast on a CPU.
    with deco_ops.use_backend("torch"):
        ratio = saved_bytes(fused, params) / saved_bytes(eager, params)
    with capsys.disabled():
        print(f"\nsaved-for-backward bytes, pool_mlp / eager (tokens require grad={tokens_require_grad}): {ratio:.3f}")
    assert ratio <= (0.45 if tokens_require_grad else 0.56)


def test_opcheck():
    params, _ = _mlp_case((4, 6), (2, 3), torch.float32)
    leaves = [leaf(p) for p in params]
    with deco_ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.deco.pool_mlp, (*leaves, [4, 6], [2, 3], "gelu", True))
        torch.library.opcheck(torch.ops.deco.pool_linear, (leaves[0], leaves[1], leaves[2], [4, 6], [2, 3], True))
        torch.library.opcheck(torch.ops.deco.adaptive_avg_pool_tokens, (leaves[0], [4, 6], [2, 3]))
        torch.library.opcheck(torch.ops.deco.unpool_tokens, (torch.randn(2, 6, 37, requires_grad=True), [4, 6], [2, 3]))
        torch.library.opcheck(torch.ops.deco.mlp_activation_backward, (torch.randn(5, 29), params[3], torch.randn(5, 48), "silu"))
        torch.library.opcheck(torch.ops.deco.mlp_activation_backward, (torch.randn(5, 29), params[3], torch.randn(5, 48), "gelu", True))


def _good_args():
    params, _ = _mlp_case((4, 4), (2, 2), torch.float32)
    return dict(zip(("x", "w1", "b1", "w2", "b2"), params)) | {"grid": (4, 4), "out_grid": (2, 2), "activation": "gelu"}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": torch.randn(2, 16)}, ValueError, "x must have 3 dimensions"),
        ({"x": torch.randn(2, 17, 37)}, ValueError, "num_prefix_tokens"),
        ({"w1": torch.randn(48, 36)}, ValueError, "w1 has shape"),
        ({"b1": torch.randn(47)}, ValueError, "b1 has shape"),
        ({"w2": torch.randn(29, 47)}, ValueError, "w2 has shape"),
        ({"b2": torch.randn(30)}, ValueError, "b2 has shape"),
        ({"w1": torch.randn(48, 37, dtype=torch.float16)}, TypeError, "w1 has dtype"),
        ({"x": torch.randn(2, 16, 37, dtype=torch.float64)}, TypeError, "x has dtype"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"out_grid": (2, 0)}, ValueError, "out_grid entries"),
        ({"grid": (4, 4, 1, 1)}, ValueError, "grid must have 2"),
        ({"w2": "weights"}, TypeError, "w2 must be a torch.Tensor"),
        ({"w1": torch.randn(48, 37, device="meta")}, ValueError, "w1 is on meta"),
    ],
)
def test_bad_input(change, error, match):
    args = _good_args() | change
    x = args.pop("x")
    with deco_ops.use_backend("triton"), mock.patch.object(pool_gemm.pool_gemm_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.pool_mlp(x, args.pop("w1"), args.pop("b1"), args.pop("w2"), args.pop("b2"), **args)
    launch.assert_not_called()


@pytest.mark.parametrize("strategy", ["fused", "composed"])
def test_empty_batch(backend, strategy):
    """No image: an empty output and zero weight and bias gradients (the composed backward takes db1
    from the activation pass, which has no row to sum)."""
    params, _ = _mlp_case((4, 4), (2, 2), torch.float32, B=0)
    leaves = [leaf(p) for p in params]
    with deco_ops.use_strategy(strategy), poisoned_empty():
        y = deco_ops.pool_mlp(*leaves, grid=(4, 4), out_grid=(2, 2))
        y.sum().backward()
    assert y.shape == (0, 4, 29) and leaves[0].grad.shape == leaves[0].shape
    for t in leaves[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_reference_activation_grads_match_autograd(activation):
    z = torch.randn(1000, dtype=torch.float64, requires_grad=True) * 4
    (expected,) = torch.autograd.grad(reference.ACTIVATIONS[activation](z).sum(), z)
    torch.testing.assert_close(reference.ACTIVATION_GRADS[activation](z.detach()), expected)


@pytest.mark.parametrize("path", ["gemm_act_grad", "activation_backward"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_epilogue_activation_and_derivative_to_a_few_ulps(activation, path):
    """The kernels' act(z) and act'(z) on their own: through gemm_act_grad with dy = 1 and an
    identity w2 (an exact fp32 GEMM), or the composed twin's elementwise pass with dh = 1, dz =
    act'(z) and the second output is act(z), compared with the float64 closed forms at a few fp32
    ulps (a 1e-4 GEMM tolerance hides a wrong constant)."""
    z = torch.linspace(-8, 8, 257, dtype=torch.float64).reshape(1, 257)
    ones, eye = torch.ones(1, 257, dtype=torch.float32), torch.eye(257, dtype=torch.float32)
    if path == "gemm_act_grad":
        dz, act = gemm_act_grad.gemm_act_grad(ones, eye, z.float(), activation)
    else:
        dz, act, _ = activation_backward.activation_backward(ones, z.float(), activation, False)
    bound = dict(rtol=8 * torch.finfo(torch.float32).eps, atol=8 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(act.double(), reference.ACTIVATIONS[activation](z), **bound)
    torch.testing.assert_close(dz.double(), reference.ACTIVATION_GRADS[activation](z), **bound)


@pytest.mark.parametrize("kernel", ["pool_gemm", "gemm_act_grad", "gemm_unpool_act_grad"])
def test_16_bit_epilogues_round_once(kernel):
    """fp16 gelu(pool(x) @ w.T + b) with its pre-activation (one-token windows: the pooled rows are
    x), the act' GEMM's dz = (dy @ w2) * gelu'(z) with gelu(z), and mlp_pool's un-pool + act' GEMM's
    dz = unpool(dpa) * gelu'(z): each the fp32 result rounded once, so all but a few equal the
    float64 value rounded (measured under 1%: fp32 error at a tie). An epilogue that rounds the
    pre-activation, dy @ w2 or the un-pooled gradient to 16 bits first (eager PyTorch's two
    roundings) moves a quarter to a third of them by an ulp, below any relative tolerance."""
    gen = torch.Generator().manual_seed(17)
    a, b = randn(40, 16, dtype=torch.float16, generator=gen), randn(72, dtype=torch.float16, generator=gen)
    w = randn(72, 16, dtype=torch.float16, scale=0.25, generator=gen)
    with poisoned_empty():
        if kernel == "pool_gemm":
            out, pre, _ = pool_gemm.pool_gemm(guarded(a[None]), (1, 5, 8), (1, 5, 8), w, b, "gelu", True, False)
            pre64 = torch.nn.functional.linear(a.double(), w.double(), b.double())
            results = [("pre-activation", pre, pre64), ("gelu", out, reference.ACTIVATIONS["gelu"](pre64))]
        elif kernel == "gemm_act_grad":
            z = randn(40, 72, dtype=torch.float16, generator=gen)
            dz, act = gemm_act_grad.gemm_act_grad(guarded(a), guarded(w.T), guarded(z), "gelu")
            z64 = z.double()
            results = [("dz", dz, (a.double() @ w.T.double()) * reference.ACTIVATION_GRADS["gelu"](z64)),
                       ("gelu", act, reference.ACTIVATIONS["gelu"](z64))]
        else:  # mlp_pool's backward: dz = unpool(dpa) * gelu'(z), z rounded to fp16 as the forward stored it
            dpa = randn(40, 72, generator=gen)  # fp32, as the op passes it
            geometry = packed_pool.dense_geometry((1, 5, 8), (1, 5, 8), 1, a.device)
            dz = mlp_pool.gemm_unpool_act_grad(guarded(a), w, b, guarded(dpa), geometry, "gelu", "average")
            z16 = torch.nn.functional.linear(a.double(), w.double(), b.double()).to(torch.float16).double()
            results = [("dz", dz, dpa.double() * reference.ACTIVATION_GRADS["gelu"](z16))]
    for what, got, want in results:
        assert_rounded_once(got, want, f"{kernel} {what}")


@pytest.mark.parametrize("need_db1", [True, False], ids=["db1", "no-db1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_composed_activation_backward_is_one_pass(activation, dtype, need_db1):
    """The composed twin on the Triton backend: dh = dy @ w2 by torch (cuBLAS on a GPU), then one
    elementwise launch writing dz = dh * act'(pre) and act(pre) and summing db1 = dz.sum(0) in
    the same pass. 150 rows (two full 64-row chunks and a ragged one, not a multiple of the
    16-row tile), 200 hidden (not a multiple of the 128-column block), strided NaN-guarded inputs."""
    gen = torch.Generator().manual_seed(3)
    dy = randn(150, 29, dtype=dtype, generator=gen)
    w2 = randn(29, 200, dtype=dtype, scale=29**-0.5, generator=gen)
    pre = randn(150, 200, dtype=dtype, scale=2.0, generator=gen)
    kernel = activation_backward.activation_backward_kernel
    with deco_ops.use_backend("triton"), deco_ops.use_strategy("composed"), poisoned_empty(), \
            mock.patch.object(kernel, "run", wraps=kernel.run) as launches, \
            mock.patch.object(reference, "mlp_activation_backward") as eager_path:
        dz, act, db1 = torch.ops.deco.mlp_activation_backward(guarded(dy), guarded(w2), guarded(pre), activation, need_db1)
    launches.assert_called_once()
    eager_path.assert_not_called()
    # dz written over dh = dy @ w2, the twin's own temporary: one hidden-sized buffer less at the peak
    dh_arg, dz_arg = launches.call_args.args[0], launches.call_args.args[2]
    assert dh_arg.data_ptr() == dz_arg.data_ptr() == dz.data_ptr()
    z64 = pre.double()
    dz64 = (dy.double() @ w2.double()) * reference.ACTIVATION_GRADS[activation](z64)
    assert dz.dtype == act.dtype == dtype
    assert_close(dz, dz64, dtype, "dz")
    assert_close(act, reference.ACTIVATIONS[activation](z64), dtype, "act")
    # as eager's activation backward (ATen's kernel: fp32 math, one rounding): fp32 within a few
    # ulps (tanh by sigmoid differs by ~2), fp16 the same rounding but for rare one-ulp ties
    eager_dz, eager_act = reference.mlp_activation_backward(dy, w2, pre, activation)
    eps = torch.finfo(dtype).eps
    as_eager = 4 * eps if dtype == torch.float32 else 0.1 * eps
    assert_close(dz, eager_dz.double(), dtype, "dz vs eager", tol=as_eager)
    assert_close(act, eager_act.double(), dtype, "act vs eager", tol=as_eager)
    if need_db1:
        assert db1.dtype == dtype
        assert_close(db1, dz64.sum(0), dtype, "db1")
        assert_close(db1, dz.double().sum(0), dtype, "db1 = sum of the stored dz", tol=2 * eps)
    else:
        assert db1.numel() == 0


def test_fused_activation_backward_reads_strided_operands():
    """The fused twin of the pass above (gemm_act_grad: dz and act(pre) in the GEMM's epilogue, db1
    one reduction) on the same kind of operands: strided and NaN-guarded, pre's rows 3 elements
    longer than hidden (the raw op takes any strides; a residual saved by the forward is
    contiguous), against float64."""
    gen = torch.Generator().manual_seed(4)
    dy = randn(150, 29, generator=gen)
    w2 = randn(29, 200, scale=29**-0.5, generator=gen)
    pre = randn(150, 200, scale=2.0, generator=gen)
    kernel = gemm_act_grad.gemm_act_grad_kernel
    with deco_ops.use_backend("triton"), deco_ops.use_strategy("fused"), poisoned_empty(), \
            mock.patch.object(kernel, "run", wraps=kernel.run) as launches:
        dz, act, db1 = torch.ops.deco.mlp_activation_backward(guarded(dy), guarded(w2), guarded(pre), "gelu", True)
        # and each operand column-strided (a transposed view, as a tied or transposed weight is), 40 rows
        dz_t, act_t, db1_t = torch.ops.deco.mlp_activation_backward(
            *(guarded(t.T).T for t in (dy[:40], w2, pre[:40])), "gelu", True)
    assert launches.call_count == 2
    dz64 = (dy.double() @ w2.double()) * reference.ACTIVATION_GRADS["gelu"](pre.double())
    assert_close(dz, dz64, torch.float32, "dz")
    assert_close(act, reference.ACTIVATIONS["gelu"](pre.double()), torch.float32, "act")
    assert_close(db1, dz64.sum(0), torch.float32, "db1")
    assert_close(dz_t, dz64[:40], torch.float32, "dz of column-strided operands")
    assert_close(act_t, reference.ACTIVATIONS["gelu"](pre[:40].double()), torch.float32, "act of column-strided operands")
    assert_close(db1_t, dz64[:40].sum(0), torch.float32, "db1 of column-strided operands")


@pytest.mark.parametrize("op", ["pool_linear", "pool_mlp", "pool_mlp_packed"])
def test_a_zero_width_layer_still_returns_the_pooled_rows(backend, op):
    """A first Linear of 0 features (``nn.Linear(C, 0)``) has nothing to multiply, yet the raw
    op's residual output is still the pooled rows (float64 pooling; outputs NaN-poisoned)."""
    g = torch.Generator().manual_seed(13)
    x = randn(2, 36, 8, generator=g)
    w1, b1, w2, b2 = randn(0, 8, generator=g), randn(0, generator=g), randn(5, 0, generator=g), randn(5, generator=g)
    grids = torch.tensor([[6, 6]] * 2)
    geometry = deco_ops.packed.parse(x.view(72, 8), grids, torch.tensor([[3, 2]] * 2), None).geometry
    with poisoned_empty():
        if op == "pool_linear":
            pooled = torch.ops.deco.pool_linear(x, w1, b1, [6, 6], [3, 2], True)[1]
        elif op == "pool_mlp":
            pooled = torch.ops.deco.pool_mlp(x, w1, b1, w2, b2, [6, 6], [3, 2], "gelu", True)[1]
        else:
            pooled = torch.ops.deco.pool_mlp_packed(x.view(72, 8), w1, b1, w2, b2, geometry, 12, "gelu", "average", True)[1]
    want = reference.adaptive_avg_pool_tokens(x.double(), (6, 6), (3, 2))
    assert_close(pooled.view(2, 6, 8), want, torch.float32)


@pytest.mark.parametrize("op", ["pool_linear", "pool_mlp", "pool_mlp_packed", "mlp_pool_packed"])
def test_residual_outputs_carry_gradients(op):
    """The raw ops return their residuals (the pooled rows; mlp_pool's pooled activation) as
    outputs: a loss on them (anyone calling ``torch.ops.deco`` directly may write one) gets its
    gradient in dx, as the float64 composition of pooling, the Linears and GELU gives."""
    g = torch.Generator().manual_seed(12)
    x = randn(2, 16, 8, generator=g)
    w1, b1, w2, b2 = randn(6, 8, generator=g), randn(6, generator=g), randn(5, 6, generator=g), randn(5, generator=g)
    geometry = deco_ops.packed.parse(x.view(32, 8), torch.tensor([[4, 4]] * 2), torch.tensor([[2, 2]] * 2), None).geometry

    def ours(t):  # (y, pooled) of the raw op; the packed op sees the two images as one sequence
        if op == "pool_linear":
            return torch.ops.deco.pool_linear(t, w1, b1, [4, 4], [2, 2], True)
        if op == "pool_mlp":
            return torch.ops.deco.pool_mlp(t, w1, b1, w2, b2, [4, 4], [2, 2], "gelu", True)[:2]
        y, pooled = getattr(torch.ops.deco, op)(t.reshape(32, 8), w1, b1, w2, b2, geometry, 8, "gelu", "average", True)[:2]
        return y.view(2, 4, -1), pooled.view(2, 4, -1)

    def float64(t):
        if op == "mlp_pool_packed":
            hidden = reference.ACTIVATIONS["gelu"](torch.nn.functional.linear(t, w1.double(), b1.double()))
            pooled = reference.adaptive_avg_pool_tokens(hidden, (4, 4), (2, 2))
            return torch.nn.functional.linear(pooled, w2.double(), b2.double()), pooled
        pooled = reference.adaptive_avg_pool_tokens(t, (4, 4), (2, 2))
        h = torch.nn.functional.linear(pooled, w1.double(), b1.double())
        if op == "pool_linear":
            return h, pooled
        return torch.nn.functional.linear(reference.ACTIVATIONS["gelu"](h), w2.double(), b2.double()), pooled

    dy = randn(2, 4, 6 if op == "pool_linear" else 5, generator=g)
    dpooled = randn(2, 4, 6 if op == "mlp_pool_packed" else 8, generator=g)
    x_ours, x64 = leaf(x), leaf(x, torch.float64)
    with deco_ops.use_backend("triton"):
        y, pooled = ours(x_ours)
        (got,) = torch.autograd.grad((y * dy).sum() + (pooled * dpooled).sum(), x_ours)
    y64, pooled64 = float64(x64)
    (want,) = torch.autograd.grad((y64 * dy.double()).sum() + (pooled64 * dpooled.double()).sum(), x64)
    assert_close(got, want, torch.float32, "dx")


def test_db1_sums_dz_as_stored():
    """db1 is the sum of dz as stored in 16 bits, as eager's ``dz.sum(0)``: half the rows have
    dh = 1 at z = 0.3, half dh = -fp16(gelu'(0.3)) at z = 10 (gelu' = 1), so the stored dz cancel
    exactly and db1 is 0; summing the unrounded products instead leaves 64 times their rounding
    (-3.7e-3)."""
    z = torch.full((128, 8), 0.3, dtype=torch.float16, device=DEVICE)
    z[64:] = 10.0
    slope = torch.ops.aten.gelu_backward(torch.ones_like(z[:1]), z[:1])
    dh = torch.ones_like(z)
    dh[64:] = -slope
    with deco_ops.use_backend("triton"):
        dz, _, db1 = activation_backward.activation_backward(dh, z, "gelu", True)
    assert torch.equal(dz.float().sum(0), torch.zeros(8, device=DEVICE))
    assert torch.equal(db1, torch.zeros_like(db1))


def test_db1_adds_the_row_chunks_partial_sums_in_fp32():
    """db1 adds the per-chunk (64-row) partial column sums in fp32 and rounds once: at z = 10
    (gelu' = 1, so dz = dh) the first chunk's dz sum to about +150, the second's to about -150 + 0.3,
    so db1 is about 0.3; partial sums rounded to 16 bits (ulp 0.125 at 150) would be off by ~10%."""
    gen = torch.Generator().manual_seed(5)
    first = randn(64, 8, dtype=torch.float16, generator=gen).abs() + 1.5
    dh = torch.cat([first, -first])
    dh[64] += 0.3
    z = torch.full_like(dh, 10.0)
    with deco_ops.use_backend("triton"), poisoned_empty():
        dz, _, db1 = activation_backward.activation_backward(dh, z, "gelu", True)
    assert torch.equal(dz, dh)
    assert_close(db1, dz.double().sum(0), torch.float16, "db1", tol=torch.finfo(torch.float16).eps)


@pytest.mark.parametrize("bias,dtype", [(True, torch.float16), (False, torch.float32)], ids=["bias-fp16", "no-bias-fp32"])
def test_composed_backward_takes_db1_from_the_activation_pass(bias, dtype):
    """pool_mlp's composed backward on the Triton backend: one elementwise launch, db1 out of it,
    db2 one reduction (no separate pass over dz for db1); without biases nothing is summed."""
    params, dy = _mlp_case((3, 2), (9, 8), dtype, B=1, bias=bias)  # 72 pooled rows: a ragged second chunk
    kernel = activation_backward.activation_backward_kernel
    with deco_ops.use_backend("triton"), deco_ops.use_strategy("composed"), \
            mock.patch.object(kernel, "run", wraps=kernel.run) as launches, \
            mock.patch.object(reference, "bias_grad", wraps=reference.bias_grad) as reductions:
        _check_mlp(params, dy, (3, 2), (9, 8), dtype, "gelu")
    launches.assert_called_once()
    assert launches.call_args.kwargs["BIAS_GRAD"] is bias
    assert reductions.call_count == (1 if bias else 0)  # db2 only


def test_windows_too_large_to_unroll_take_the_runtime_loop_path(monkeypatch):
    """When no config can stage a window's taps in shared memory (e.g. 24x24 -> 3x3 on a GPU),
    the launcher serves the dense batch through the ragged path's runtime window loops."""
    params, dy = _mlp_case((12, 12), (3, 2), torch.float32)
    with deco_ops.use_backend("triton"):
        expected = deco_ops.pool_mlp(*params, grid=(12, 12), out_grid=(3, 2))
        monkeypatch.setattr(pool_gemm, "unrolled_windows_fit", lambda x, taps: False)
        with mock.patch.object(pool_gemm, "pool_gemm_packed", wraps=pool_gemm.pool_gemm_packed) as packed:
            got = deco_ops.pool_mlp(*params, grid=(12, 12), out_grid=(3, 2))
    packed.assert_called_once()
    assert_close(got, expected, torch.float32)


def test_the_unroll_decision_counts_every_axis_taps():
    """The launcher asks ``unrolled_windows_fit`` about the largest window's taps over all three
    axes (a video 5x4x6 -> 3x2x3: windows up to 3x2x2, 12 taps); a count that leaves out time
    would unroll windows no config can stage on a GPU (always true under the interpreter)."""
    x, w = randn(2, 5 * 4 * 6, 3), randn(8, 3)
    with mock.patch.object(pool_gemm, "unrolled_windows_fit", return_value=True) as fit:
        out, _, _ = pool_gemm.pool_gemm(x, (5, 4, 6), (3, 2, 3), w, None, "identity", False, False)
    fit.assert_called_once_with(x, 12)
    want = torch.nn.functional.linear(reference.adaptive_avg_pool_tokens(x.double(), (5, 4, 6), (3, 2, 3)), w.double())
    assert_close(out, want.reshape(-1, 8), torch.float32)


def test_saved_pooled_rows_are_eager_pooling_bit_for_bit():
    """pool_gemm (and the pooling kernel) sums each window in fp32 and rounds the mean once, as fp16
    F.adaptive_avg_pool2d on the CPU does: the saved residual (dW's operand) and the pooled tokens
    equal it bit for bit, 3x3 windows included (a count that is not a power of two, where rounding
    the window's sum first differs)."""
    g = torch.Generator().manual_seed(5)
    x = randn(2, 36, 64, dtype=torch.float16, generator=g)
    w = randn(16, 64, dtype=torch.float16, generator=g)
    with deco_ops.use_backend("triton"):
        _, pooled = torch.ops.deco.pool_linear(x, w, None, [6, 6], [2, 2], True)
    eager = reference.adaptive_avg_pool_tokens(x.cpu(), (6, 6), (2, 2)).to(x.device)
    assert torch.equal(pooled.view(2, 4, 64), eager)
    assert torch.equal(adaptive_pool.pool_tokens(x, (1, 6, 6), (1, 2, 2)), eager)  # the pooling kernel alike


def test_pool_linear_with_frozen_weight_keeps_no_pooled_input():
    """The pooled input is read for dW alone: with a frozen w (only x trains), as eager's Linear,
    nothing but w (a parameter) is kept; dx is unchanged (float64 eager)."""
    params, _ = _mlp_case((12, 12), (6, 6), torch.float32, C=64, hidden=256)
    x, w, b = leaf(params[0]), params[1], params[2]
    assert saved_bytes(lambda: deco_ops.pool_linear(x, w, b, grid=(12, 12), out_grid=(6, 6)), [x, w]) == 0
    y = deco_ops.pool_linear(x, w, b, grid=(12, 12), out_grid=(6, 6))
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = leaf(params[0], torch.float64)
    y64 = torch.nn.functional.linear(reference.adaptive_avg_pool_tokens(x64, (12, 12), (6, 6)), w.double(), b.double())
    y64.backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad x")


def test_pool_mlp_with_frozen_first_linear_keeps_no_pooled_input():
    """The pooled input is read for dW1 alone: with frozen weights (only x trains) pool_mlp keeps
    the pre-activation, as eager does, and not the pooled rows; dx is unchanged (float64 eager)."""
    params, _ = _mlp_case((12, 12), (6, 6), torch.float32, C=64, hidden=256)
    x, (w1, b1, w2, b2) = leaf(params[0]), params[1:]

    def run():
        return deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=(12, 12), out_grid=(6, 6))

    assert saved_bytes(run, [x, w1, w2]) == 2 * 36 * 256 * 4  # the pre-activation alone
    y = run()
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = leaf(params[0], torch.float64)
    pre64 = torch.nn.functional.linear(reference.adaptive_avg_pool_tokens(x64, (12, 12), (6, 6)), w1.double(), b1.double())
    torch.nn.functional.linear(reference.ACTIVATIONS["gelu"](pre64), w2.double(), b2.double()).backward(dy.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad x")
