"""The fused DeCo projectors: ``pool_linear`` (pool -> Linear) and ``pool_mlp``
(pool -> Linear -> activation -> Linear), forward and backward.

Forward on the Triton backend: one kernel pools while it loads the first GEMM's A tiles and applies
bias + activation in its epilogue; the second Linear is ``torch.addmm`` (cuBLAS).

What is kept for backward (only when autograd needs it): the pooled input ``(B, P, C)`` and the
pre-activation ``(B, P, hidden)``. Never the patch tokens, never the activation. The custom ops
return these residuals as extra outputs (empty when not kept) because a ``torch.library`` autograd
formula can only save inputs and outputs; the public functions return the projection alone.

Backward: one Triton GEMM computes ``dz = (dy @ W2) * act'(z)`` and rebuilds ``act(z)`` in its
epilogue; dW2, dW1 and d(pooled) are cuBLAS GEMMs; the input gradient is un-pooled by a
deterministic Triton gather, and only computed when ``x`` requires grad (a frozen vision tower
costs nothing).
"""

from __future__ import annotations

import torch

from . import _backend, _validate, reference
from .kernels import gemm_act_grad, pool_gemm
from .pooling import as_3d, check_pool_input

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "quick_gelu")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


# ----------------------------------------------------------------------------------------------
# pool -> Linear


@torch.library.custom_op("deco::pool_linear", mutates_args=())
def _pool_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, grid: list[int], out_grid: list[int], keep_residuals: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B, P = x.shape[0], torch.Size(out_grid).numel()
    if _backend.use_triton(x.device):
        y, _, pooled = pool_gemm.pool_gemm(
            x, as_3d(grid), as_3d(out_grid), w.contiguous(), None if b is None else b.contiguous(),
            "identity", store_pre=False, store_pooled=keep_residuals,
        )
        pooled = pooled.view(B, P, x.shape[2]) if keep_residuals else _empty(x)
        return y.view(B, P, w.shape[0]), pooled
    pooled = reference.adaptive_avg_pool_tokens(x, grid, out_grid).contiguous()
    return torch.nn.functional.linear(pooled, w, b), pooled if keep_residuals else _empty(x)


@_pool_linear.register_fake
def _(x, w, b, grid, out_grid, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    pooled = x.new_empty((B, P, x.shape[2])) if keep_residuals else _empty(x)
    return x.new_empty((B, P, w.shape[0])), pooled


def _pool_linear_setup(ctx, inputs, output):
    _, w, b, grid, out_grid, keep = inputs
    ctx.save_for_backward(w, output[1])
    ctx.grid, ctx.out_grid, ctx.keep, ctx.has_bias = grid, out_grid, keep, b is not None


def _pool_linear_backward(ctx, dy, dpooled_extra):
    w, pooled = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::pool_linear ran with keep_residuals=False; call deco_ops.pool_linear to differentiate it")
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dy2 = _rows(dy)
    dx = dw = db = None
    if need_w:
        dw = dy2.t() @ _rows(pooled)
    if need_b and ctx.has_bias:
        db = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    if need_x:
        dpooled = (dy2 @ w).view(pooled.shape)
        if dpooled_extra is not None:
            dpooled = dpooled + dpooled_extra
        dx = torch.ops.deco.unpool_tokens(dpooled, ctx.grid, ctx.out_grid)
    return dx, dw, db, None, None, None


_pool_linear.register_autograd(_pool_linear_backward, setup_context=_pool_linear_setup)


# ----------------------------------------------------------------------------------------------
# pool -> Linear -> activation -> Linear


@torch.library.custom_op("deco::mlp_activation_backward", mutates_args=())
def _mlp_activation_backward(
    dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy @ w2 * act'(pre), act(pre)) for 2D dy (rows, out), w2 (out, hidden), pre (rows, hidden)."""
    if _backend.use_triton(dy.device):
        return gemm_act_grad.gemm_act_grad(dy, w2, pre, activation)
    return reference.mlp_activation_backward(dy, w2, pre, activation)


@_mlp_activation_backward.register_fake
def _(dy, w2, pre, activation):
    return torch.empty_like(pre), torch.empty_like(pre)


@torch.library.custom_op("deco::pool_mlp", mutates_args=())
def _pool_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    grid: list[int],
    out_grid: list[int],
    activation: str,
    keep_residuals: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, P = x.shape[0], torch.Size(out_grid).numel()
    if _backend.use_triton(x.device):
        act, pre, pooled = pool_gemm.pool_gemm(
            x, as_3d(grid), as_3d(out_grid), w1.contiguous(), None if b1 is None else b1.contiguous(),
            activation, store_pre=keep_residuals, store_pooled=keep_residuals,
        )
        w2t = w2.t()
        y = torch.addmm(b2, act, w2t) if b2 is not None else act @ w2t
        y = y.view(B, P, w2.shape[0])
        if not keep_residuals:
            return y, _empty(x), _empty(x)
        return y, pooled.view(B, P, x.shape[2]), pre.view(B, P, w1.shape[0])
    pooled = reference.adaptive_avg_pool_tokens(x, grid, out_grid).contiguous()
    pre = torch.nn.functional.linear(pooled, w1, b1)
    y = torch.nn.functional.linear(reference.ACTIVATIONS[activation](pre), w2, b2)
    if not keep_residuals:
        return y, _empty(x), _empty(x)
    return y, pooled, pre


@_pool_mlp.register_fake
def _(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    y = x.new_empty((B, P, w2.shape[0]))
    if not keep_residuals:
        return y, _empty(x), _empty(x)
    return y, x.new_empty((B, P, x.shape[2])), x.new_empty((B, P, w1.shape[0]))


def _pool_mlp_setup(ctx, inputs, output):
    _, w1, b1, w2, b2, grid, out_grid, activation, keep = inputs
    ctx.save_for_backward(w1, w2, output[1], output[2])
    ctx.grid, ctx.out_grid, ctx.activation, ctx.keep = grid, out_grid, activation, keep
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _pool_mlp_backward(ctx, dy, dpooled_extra, dpre_extra):
    w1, w2, pooled, pre = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::pool_mlp ran with keep_residuals=False; call deco_ops.pool_mlp to differentiate it")
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    dy2 = _rows(dy)
    dz, act = torch.ops.deco.mlp_activation_backward(dy2, w2, _rows(pre), ctx.activation)
    if dpre_extra is not None:
        dz = dz + _rows(dpre_extra)
    dx = dw1 = db1 = dw2 = db2 = None
    if need_w2:
        dw2 = dy2.t() @ act
    if need_b2 and ctx.has_b2:
        db2 = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    if need_w1:
        dw1 = dz.t() @ _rows(pooled)
    if need_b1 and ctx.has_b1:
        db1 = dz.sum(0, dtype=torch.float32).to(dz.dtype)
    if need_x:
        dpooled = (dz @ w1).view(pooled.shape)
        if dpooled_extra is not None:
            dpooled = dpooled + dpooled_extra
        dx = torch.ops.deco.unpool_tokens(dpooled, ctx.grid, ctx.out_grid)
    return dx, dw1, db1, dw2, db2, None, None, None, None


_pool_mlp.register_autograd(_pool_mlp_backward, setup_context=_pool_mlp_setup)


# ----------------------------------------------------------------------------------------------
# public API


def needs_residuals(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will need the ops' residuals (pooled input, pre-activation)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_common(x, grid, out_grid, **params):
    g, o = check_pool_input(x, grid, out_grid)
    use_triton = _backend.use_triton(x.device)
    for name, value in params.items():
        if value is not None:
            _validate.floating(name, value, use_triton)
    _validate.same_dtype("x", x, **params)
    _validate.same_device("x", x, **params)
    return list(g), list(o)


def pool_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, grid, out_grid) -> torch.Tensor:
    """``F.linear(adaptive_avg_pool_tokens(x, grid, out_grid), w, b)`` fused: the pooled tokens
    are formed inside the GEMM's operand loads.

    Args:
        x: ``(B, prod(grid), C)`` tokens. w: ``(out, C)`` (``nn.Linear`` layout). b: ``(out,)`` or None.
    Returns:
        ``(B, prod(out_grid), out)``.
    """
    _validate.tensor("x", x, 3)
    _validate.linear("w", w, "b", b, x.shape[2], "x.shape[-1]")
    g, o = _check_common(x, grid, out_grid, w=w, b=b)
    return torch.ops.deco.pool_linear(x, w, b, g, o, needs_residuals(x, w, b))[0]


def pool_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    grid,
    out_grid,
    activation: str = "gelu",
) -> torch.Tensor:
    """The DeCo projector ``Linear2(act(Linear1(adaptive_avg_pool(x))))``, fused.

    Args:
        x: ``(B, prod(grid), C)`` tokens in row-major grid order.
        w1, b1: first Linear, ``(hidden, C)`` and ``(hidden,)`` or None.
        w2, b2: second Linear, ``(out, hidden)`` and ``(out,)`` or None.
        grid, out_grid: ``(H, W)`` or ``(T, H, W)``; windows as ``F.adaptive_avg_pool2d``/``3d``.
        activation: ``"gelu"`` (erf, ``nn.GELU()``), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
    Returns:
        ``(B, prod(out_grid), out)``.
    """
    _validate.tensor("x", x, 3)
    _validate.linear("w1", w1, "b1", b1, x.shape[2], "x.shape[-1]")
    _validate.linear("w2", w2, "b2", b2, w1.shape[0], "w1.shape[0] (hidden features)")
    _validate.activation(activation, ACTIVATIONS)
    g, o = _check_common(x, grid, out_grid, w1=w1, b1=b1, w2=w2, b2=b2)
    return torch.ops.deco.pool_mlp(x, w1, b1, w2, b2, g, o, activation, needs_residuals(x, w1, b1, w2, b2))[0]
