"""``mlp_pool``: the project-then-pool order of PLLaVA and LLaVA-OneVision/Video,
``pool(Linear2(act(Linear1(x))))``, computed exactly as ``Linear2(pool(act(Linear1(x))))``.

Pooling (adaptive average or bilinear) is a per-axis weighted average whose weights sum to one,
so it commutes with the affine ``Linear2``: the second GEMM runs on the pooled rows only
(``2 * P * hidden * out`` FLOPs instead of ``2 * N * hidden * out``, N tokens, P pooled rows).

Forward on the Triton backend, two launches: ``pool_gemm`` as a plain GEMM over every token with
bias + activation in its epilogue, then ``pool_gemm`` (packed) pooling that activation inside its
A-operand loads and applying ``Linear2``'s bias. One launch per stage for a whole packed batch.

Saved for backward: ``x`` (an input, so it costs no memory; dW1 needs it anyway), the weights,
and the pooled activation ``(P, hidden)`` where dW2 is needed (nothing else reads it). Not the
token-sized pre-activation nor the activation: backward recomputes the pre-activation in
``kernels/mlp_pool.py``, whose epilogue also gathers the un-pooled gradient and applies act'.

Both ops have composed twins (``deco_ops.composed``: ``F.linear``, the activation and our packed
pooling / un-pooling kernel), chosen by ``deco_ops.strategy``.

Registered ops: ``deco::mlp_pool_packed`` and ``deco::mlp_pool_act_backward``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _backend, composed, strategy
from ._direct import custom_op, deco, register_autograd
from .kernels import mlp_pool as mlp_pool_kernel
from .kernels import packed_pool, pool_gemm
from .packed import (dense_mlp, dense_mlp_plans, packed_key, packed_mlp, packed_mlp_implementation, packed_mlp_plans, reference_pool,
                     reference_unpool)
from .projector import add_grads, linear_grads


def _fused(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    act, _, _ = pool_gemm.pool_gemm(
        x.unsqueeze(0), (1, 1, x.shape[0]), (1, 1, x.shape[0]), w1.contiguous(), None if b1 is None else b1.contiguous(),
        activation, store_pre=False, store_pooled=False,
    )
    y, _, pooled = pool_gemm.pool_gemm_packed(
        act, geometry, num_out, mode, w2.contiguous(), None if b2 is None else b2.contiguous(),
        "identity", store_pre=False, store_pooled=keep_residuals,
    )
    return y, pooled


def _composed(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    """The composed twin on the Triton backend: our packed pooling kernel between the torch ops."""
    return composed.mlp_pool(x, w1, b1, w2, b2, activation, packed_pool.pool_packed, geometry, num_out, mode)


def _reference(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    """The PyTorch backend's: PyTorch's pooling (``reference_pool``)."""
    return composed.mlp_pool(x, w1, b1, w2, b2, activation, reference_pool, geometry, num_out, mode)


def _implementation(*args) -> Callable:
    """What runs ``deco::mlp_pool_packed`` on ``args``. It returns (y, pooled activation) where the
    residual is kept, else y and anything: the custom op's body puts the empty tensor of its schema
    in its place (``projector._pool_mlp_implementation``)."""
    return packed_mlp_implementation("mlp_pool_packed", args, _fused, _composed, _reference)


@custom_op("mlp_pool_packed")
def _mlp_pool(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    geometry: torch.Tensor,
    num_out: int,
    activation: str,
    mode: str,
    keep_residuals: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals)
    y, pooled = _implementation(*args)(*args)
    return y, pooled if keep_residuals else x.new_empty((0,))


@_mlp_pool.register_fake
def _(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    pooled = x.new_empty((num_out, w1.shape[0])) if keep_residuals else x.new_empty((0,))
    return x.new_empty((num_out, w2.shape[0])), pooled


def _act_backward_fused(x, w1, b1, dpooled, geometry, activation, mode):
    return mlp_pool_kernel.gemm_unpool_act_grad(
        x, w1.contiguous(), None if b1 is None else b1.contiguous(), dpooled, geometry, activation, mode)


def _act_backward_composed(x, w1, b1, dpooled, geometry, activation, mode):
    """The composed twin on the Triton backend: our packed un-pooling kernel between the torch ops."""
    return composed.mlp_pool_act_backward(x, w1, b1, dpooled, activation, packed_pool.unpool_packed, geometry, x.shape[0], mode)


def _act_backward_reference(x, w1, b1, dpooled, geometry, activation, mode):
    """The PyTorch backend's: PyTorch's un-pooling (``reference_unpool``)."""
    return composed.mlp_pool_act_backward(x, w1, b1, dpooled, activation, reference_unpool, geometry, x.shape[0], mode)


def _act_backward_implementation(x, w1, b1, dpooled, geometry, activation, mode) -> Callable:
    """The function that runs ``deco::mlp_pool_act_backward`` on these arguments (the strategy's choice)."""
    on_triton = _backend.use_triton(x.device)
    return strategy.implementation(
        (x, w1, b1, dpooled, geometry, activation, mode), on_triton=on_triton,
        key=lambda: packed_key("mlp_pool_act_backward", x, dpooled.shape[0], True, hidden=w1.shape[0], act=activation, mode=mode),
        fused=_act_backward_fused if on_triton else None,
        composed=_act_backward_composed if on_triton else _act_backward_reference,
    )


@custom_op("mlp_pool_act_backward", plan=_act_backward_implementation)
def _act_backward(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, dpooled: torch.Tensor, geometry: torch.Tensor, activation: str, mode: str
) -> torch.Tensor:
    """dz = unpool(dpooled) * act'(x @ w1.T + b1), (tokens, hidden), the pre-activation recomputed."""
    args = (x, w1, b1, dpooled, geometry, activation, mode)
    return _act_backward_implementation(*args)(*args)


@_act_backward.register_fake
def _(x, w1, b1, dpooled, geometry, activation, mode):
    return x.new_empty((x.shape[0], w1.shape[0]))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32. ``dy @ W2`` per pooled row is un-pooled next: a
    token in several windows (overlap, up-sampling, bilinear) sums their gradients, and where
    they cancel, rounding each to 16 bits first loses the difference (eager PyTorch un-pools ``dy``
    before its GEMM, so it rounds after the cancellation). cuBLAS writes the fp32 accumulator
    directly (``out_dtype``, CUDA only); elsewhere 16-bit operands are upcast. fp32 and float64
    (the PyTorch backend's reference dtype) stay as they are."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep = inputs
    # The tokens rebuild the pre-activation for dx, dW1 and db1; with only the second Linear
    # trained nothing reads them. Tokens made under torch.inference_mode (a frozen tower run in it)
    # cannot be saved for backward, where eager PyTorch, which saves the first Linear's output,
    # trains the layers after them: a copy is saved instead.
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or need[2]):  # no Python-level call (tests/test_host_path.py pins them)
        x = None
    elif x.is_inference():
        x = x.clone()
    ctx.save_for_backward(x, w1, b1, w2, output[1] if need[3] else None, geometry)  # the pooled activation: for dW2 alone
    ctx.activation, ctx.mode, ctx.keep = activation, mode, keep
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dpooled_extra):
    """Gradients that nothing produced arrive as None (no zero-filled tensors) and stay None."""
    x, w1, b1, w2, pooled, geometry = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::mlp_pool_packed ran with keep_residuals=False; call deco_ops.mlp_pool to differentiate it")
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    dx = dw1 = db1 = dw2 = db2 = dpooled = None
    if dy is not None:
        dw2, db2 = linear_grads(dy, pooled, need_w2, need_b2 and ctx.has_b2)
        if need_x or need_w1 or (need_b1 and ctx.has_b1):
            dpooled = _mm_fp32(dy, w2)
    dpooled = add_grads(dpooled, dpooled_extra)
    if dpooled is not None and (need_x or need_w1 or (need_b1 and ctx.has_b1)):
        dz = deco.mlp_pool_act_backward(x, w1, b1, dpooled, geometry, ctx.activation, ctx.mode)
        dw1, db1 = linear_grads(dz, x, need_w1, need_b1 and ctx.has_b1)
        if need_x:
            dx = torch.mm(dz, w1)
    return dx, dw1, db1, dw2, db2, None, None, None, None, None


register_autograd(_mlp_pool, _backward, _setup)


def mlp_pool(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    grid,
    out_grid,
    activation: str = "gelu",
    mode: str = "average",
) -> torch.Tensor:
    """Project then pool (PLLaVA, LLaVA-OneVision): ``pool(Linear2(act(Linear1(x))))``, fused.

    Args:
        x: ``(B, prod(grid), C)`` tokens in row-major grid order.
        w1, b1: first Linear ``(hidden, C)``, ``(hidden,)`` or None. w2, b2: ``(out, hidden)``, ``(out,)`` or None.
        grid, out_grid: ``(H, W)`` or ``(T, H, W)``.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        mode: ``"average"`` (``F.adaptive_avg_pool2d/3d``) or ``"bilinear"`` (``F.interpolate``
            bilinear / trilinear, ``align_corners=False``).
    Returns:
        ``(B, prod(out_grid), out)``, computed as ``Linear2(pool(act(Linear1(x))))``.
    """
    return dense_mlp(deco.mlp_pool_packed, _dense_plans, x, w1, b1, w2, b2, grid, out_grid, activation, mode)


def mlp_pool_packed(
    x: torch.Tensor,
    grids: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    out_grids: torch.Tensor | None = None,
    stride=None,
    activation: str = "gelu",
    mode: str = "average",
):
    """``mlp_pool`` over a packed ragged batch (arguments as ``pool_mlp_packed``) -> ``(y, cu_seqlens)``."""
    return packed_mlp(deco.mlp_pool_packed, _packed_plans, x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode)


_dense_plans = dense_mlp_plans(deco.mlp_pool_packed, _implementation)
_packed_plans = packed_mlp_plans(deco.mlp_pool_packed, _implementation)
