"""The fused DeCo projectors: ``pool_linear`` (pool -> Linear) and ``pool_mlp``
(pool -> Linear -> activation -> Linear), forward and backward.

Forward on the Triton backend: one kernel pools while it loads the first GEMM's A tiles and applies
bias + activation in its epilogue; the second Linear is ``torch.addmm`` (cuBLAS).

What is kept for backward (only when autograd needs it): the pooled input ``(B, P, C)`` where
the first weight's gradient is needed (nothing else reads it) and the pre-activation
``(B, P, hidden)``. Never the patch tokens, never the activation. The custom ops return these
residuals as extra outputs (empty when not kept) because a ``torch.library`` autograd formula can
only save inputs and outputs; the public functions return the projection alone.

Each op and backward GEMM has a composed twin (``deco_ops.composed``: the pooling op's own
choice, our kernel or ATen's (``deco_ops.pooling``), then cuBLAS, then the activation in PyTorch) returning the same residuals; ``deco_ops.strategy`` picks
which runs. On the PyTorch backend the composed twin is the implementation. On Hopper,
``pool_mlp``'s first GEMM and the backward's ``dz`` GEMM have a ``fused_tma`` candidate on the
persistent TMA GEMM (``kernels/tma_gemm.py``), opt-in until a GPU has measured it.

Backward: one Triton GEMM computes ``dz = (dy @ W2) * act'(z)`` and rebuilds ``act(z)`` in its
epilogue; dW2, dW1 and d(pooled) are cuBLAS GEMMs; the input gradient is un-pooled by ``deco::unpool_tokens`` (a
deterministic Triton gather, or ATen's pooling backward where the strategy picks it), and only computed when ``x`` requires grad (a frozen vision tower
costs nothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _autocast, _backend, _plan, _validate, composed, pooling, reference, strategy
from ._direct import custom_op, deco, register_autograd
from .kernels import gemm_act_grad, pool_gemm, tma_gemm
from ._plan import needs_residuals
from .pooling import as_3d, check_pool_input

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "quick_gelu")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(rows, features)``: the leading dims flattened (a reshape to ``(-1, features)``
    cannot infer the rows of a zero-width tensor, a layer of 0 features)."""
    return t.flatten(0, -2)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def add_grads(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """a + b where None stands for a zero gradient (the ops set ``ctx.set_materialize_grads(False)``,
    so an output nothing used brings None, never a zero-filled tensor)."""
    if a is None:
        return b
    return a if b is None else a + b


def linear_grads(g: torch.Tensor, a: torch.Tensor, need_w: bool, need_b: bool):
    """(dW, db) of a Linear with output gradient ``g`` (rows, out) and input ``a`` (rows, in); None
    where not needed."""
    dw = torch.mm(g.t(), a) if need_w else None
    db = reference.bias_grad(g) if need_b else None
    return dw, db


def activation_backward(dy, w2, pre, activation: str, need_db1: bool):
    """``(dz, act(pre), db1)`` of the MLP's activation, ``dz = (dy @ w2) * act'(pre)``, ``db1`` the
    column sums of ``dz`` taken in the same pass (None unless ``need_db1``); callers that add another
    gradient to ``dz`` afterwards sum ``db1`` themselves."""
    dz, act, db1 = deco.mlp_activation_backward(dy, w2, pre, activation, need_db1)
    return dz, act, db1 if need_db1 else None


def mlp_backward(ctx, dy, dpre_extra, w1, w2, pooled, pre):
    """Shared backward of the pool -> Linear -> act -> Linear ops (dense and packed), on 2D rows.

    ``dy`` (rows, out) and ``dpre_extra`` (rows, hidden) may be None (zero). Returns
    ``(dpooled, dw1, db1, dw2, db2)``: ``dpooled`` (rows, C) only when ``x`` needs a gradient, each
    entry None where it is not needed or zero. The input flags come from ``ctx.needs_input_grad``
    (x, w1, b1, w2, b2 first) and ``ctx.has_b1``/``ctx.has_b2``.
    """
    need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
    need_b1 = need_b1 and ctx.has_b1
    dz = dpooled = dw1 = db1 = dw2 = db2 = None
    if dy is not None:
        dz, act, db1 = activation_backward(dy, w2, pre, ctx.activation, need_b1 and dpre_extra is None)
        dw2, db2 = linear_grads(dy, act, need_w2, need_b2 and ctx.has_b2)
        del act  # read by dW2 alone: freed before dW1's GEMM, as eager's autograd frees its saved activation
    dz = add_grads(dz, dpre_extra)
    if dz is not None:
        dw1, db1_of_sum = linear_grads(dz, pooled, need_w1, need_b1 and db1 is None)
        db1 = db1_of_sum if db1 is None else db1
        if need_x:
            dpooled = torch.mm(dz, w1)
    return dpooled, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------
# pool -> Linear


def _key(op: str, x: torch.Tensor, grid, out_grid, keep_residuals: bool, **dims) -> str:
    rows = x.shape[0] * torch.Size(out_grid).numel()
    return strategy.make_key(op, x.device, x.dtype, keep_residuals, rows=strategy.bucket(rows), C=x.shape[2],
                             grid=grid, out_grid=out_grid, **dims)


def _pool_linear_fused(x, w, b, grid, out_grid, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    y, _, pooled = pool_gemm.pool_gemm(
        x, as_3d(grid), as_3d(out_grid), w.contiguous(), None if b is None else b.contiguous(),
        "identity", store_pre=False, store_pooled=keep_residuals,
    )
    return y.view(B, P, w.shape[0]), pooled.view(B, P, x.shape[2]) if keep_residuals else None


def _composed_twins(pool):
    """(pool_linear's, pool_mlp's, pool_mlp's TMA) composed twin over ``pool``, one of the pooling
    op's implementations: chosen with the strategy (once per plan), not by the pooling op on every call."""

    def pool_linear_composed(x, w, b, grid, out_grid, keep_residuals):
        return composed.pool_linear(pool(x, grid, out_grid), w, b, True)  # the residual is an intermediate anyway

    def pool_mlp_composed(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
        # not kept, the pre-activation is freed before the second Linear's output exists (eager's peak)
        return composed.pool_mlp(pool(x, grid, out_grid), w1, b1, w2, b2, activation, keep_residuals)

    def pool_mlp_tma(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
        return composed.pool_mlp_tma(pool(x, grid, out_grid), w1, b1, w2, b2, activation, keep_residuals)

    return pool_linear_composed, pool_mlp_composed, pool_mlp_tma


_COMPOSED = {pool: _composed_twins(pool) for pool in pooling.POOL_IMPLEMENTATIONS}


def _pool_linear_implementation(x, w, b, grid, out_grid, keep_residuals):
    """The function that runs ``deco::pool_linear`` on these arguments (the strategy's choice); it
    returns (y, pooled) where the residual is kept, else y and anything (``_pool_mlp_implementation``)."""
    on_triton = _backend.use_triton(x.device)
    composed_twin, *_ = _COMPOSED[pooling.pool_implementation(x, grid, out_grid)]
    return strategy.implementation(
        (x, w, b, grid, out_grid, keep_residuals), on_triton=on_triton,
        key=lambda: _key("pool_linear", x, grid, out_grid, keep_residuals, out=w.shape[0]),
        fused=_pool_linear_fused if on_triton else None, composed=composed_twin,
    )


@custom_op("pool_linear")
def _pool_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, grid: list[int], out_grid: list[int], keep_residuals: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, w, b, grid, out_grid, keep_residuals)
    y, pooled = _pool_linear_implementation(*args)(*args)
    return (y, pooled) if keep_residuals else (y, _empty(x))


@_pool_linear.register_fake
def _(x, w, b, grid, out_grid, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    pooled = x.new_empty((B, P, x.shape[2])) if keep_residuals else _empty(x)
    return x.new_empty((B, P, w.shape[0])), pooled


def _pool_linear_setup(ctx, inputs, output):
    _, w, b, grid, out_grid, keep = inputs
    # the pooled input is read for dW alone: with a frozen w it is not kept
    ctx.save_for_backward(w, output[1] if ctx.needs_input_grad[1] else None)
    ctx.grid, ctx.out_grid, ctx.keep, ctx.has_bias = grid, out_grid, keep, b is not None
    ctx.set_materialize_grads(False)


def _pool_linear_backward(ctx, dy, dpooled_extra):
    """Gradients that nothing produced arrive as None (no zero-filled tensors) and stay None."""
    w, pooled = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::pool_linear ran with keep_residuals=False; call deco_ops.pool_linear to differentiate it")
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dw = db = dpooled = None
    if dy is not None:
        dy2 = _rows(dy)
        dw, db = linear_grads(dy2, _rows(pooled) if need_w else None, need_w, need_b and ctx.has_bias)
        if need_x:
            dpooled = torch.mm(dy2, w).view(dy.shape[:-1] + w.shape[1:])
    dpooled = add_grads(dpooled, dpooled_extra)
    if need_x and dpooled is not None:
        dx = deco.unpool_tokens(dpooled, ctx.grid, ctx.out_grid)
    return dx, dw, db, None, None, None


register_autograd(_pool_linear, _pool_linear_backward, _pool_linear_setup)


# ----------------------------------------------------------------------------------------------
# pool -> Linear -> activation -> Linear


def _activation_backward_on(gemm, dy, w2, pre, activation, need_db1):
    """``deco::mlp_activation_backward`` on one of our act' GEMMs (``gemm(dy, w2, pre, activation)
    -> (dz, act)``), db1 one reduction of dz."""
    dz, act = gemm(dy, w2, pre, activation)
    return dz, act, reference.bias_grad(dz) if need_db1 else _empty(dz)


def _activation_backward_fused(dy, w2, pre, activation, need_db1):
    return _activation_backward_on(gemm_act_grad.gemm_act_grad, dy, w2, pre, activation, need_db1)


def _activation_backward_tma(dy, w2, pre, activation, need_db1):
    """On the TMA GEMM, or the pointer GEMM where a descriptor cannot read the operands: a plan keeps
    the choice of its first call, and a later ``dy`` of the same key may be unreadable to one (a
    view whose rows are not 16-byte aligned; a stride-0 ``dy`` is another key: its last stride)."""
    gemm = tma_gemm.tma_gemm_act_grad if tma_gemm.tma_compatible(dy, w2, pre) else gemm_act_grad.gemm_act_grad
    return _activation_backward_on(gemm, dy, w2, pre, activation, need_db1)


def _activation_backward_composed(elementwise_kernel: bool):
    """The composed twin of ``deco::mlp_activation_backward`` (``elementwise_kernel``: the Triton backend's)."""

    def composed_backward(dy, w2, pre, activation, need_db1):
        return composed.mlp_activation_backward(dy, w2, pre, activation, need_db1, elementwise_kernel)

    return composed_backward


_ACTIVATION_BACKWARD_COMPOSED = {on_triton: _activation_backward_composed(on_triton) for on_triton in (False, True)}
# The Triton backend's other candidates, by whether the TMA GEMM applies: the PyTorch backend's
# twin (ATen's activation backward and one reduction after cuBLAS) beside ours, for the calls where
# a Triton launch's host time outweighs the elementwise passes it saves.
_ACTIVATION_BACKWARD_KERNELS = {
    tma: {"composed_aten": strategy.Candidate(_ACTIVATION_BACKWARD_COMPOSED[False]),
          **({"fused_tma": strategy.Candidate(_activation_backward_tma, opt_in=True)} if tma else {})}
    for tma in (False, True)
}


def _activation_backward_implementation(dy, w2, pre, activation, need_db1=False):
    """The function that runs ``deco::mlp_activation_backward`` on these arguments (the strategy's choice)."""
    on_triton = _backend.use_triton(dy.device)
    return strategy.implementation(
        (dy, w2, pre, activation, need_db1), on_triton=on_triton,
        key=lambda: strategy.make_key("mlp_activation_backward", dy.device, dy.dtype, True, rows=strategy.bucket(dy.shape[0]),
                                      out=dy.shape[1], hidden=pre.shape[1], act=activation),
        fused=_activation_backward_fused if on_triton else None, composed=_ACTIVATION_BACKWARD_COMPOSED[on_triton],
        composed_kernels=_ACTIVATION_BACKWARD_KERNELS[composed.act_grad_tma_applies(dy, w2, pre)] if on_triton else None,
    )


@custom_op("mlp_activation_backward", plan=_activation_backward_implementation)
def _mlp_activation_backward(
    dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor, activation: str, need_db1: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy @ w2 * act'(pre), act(pre), db1) for 2D dy (rows, out), w2 (out, hidden), pre (rows,
    hidden); db1 = the first output's column sums (hidden,) when ``need_db1``, else empty."""
    args = (dy, w2, pre, activation, need_db1)
    return _activation_backward_implementation(*args)(*args)


@_mlp_activation_backward.register_fake
def _(dy, w2, pre, activation, need_db1=False):
    return torch.empty_like(pre), torch.empty_like(pre), pre.new_empty((pre.shape[1] if need_db1 else 0,))


def _pool_mlp_fused(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    act, pre, pooled = pool_gemm.pool_gemm(
        x, as_3d(grid), as_3d(out_grid), w1.contiguous(), None if b1 is None else b1.contiguous(),
        activation, store_pre=keep_residuals, store_pooled=keep_residuals,
    )
    y = F.linear(act, w2, b2).view(B, P, w2.shape[0])
    if not keep_residuals:
        return y, None, None
    return y, pooled.view(B, P, x.shape[2]), pre.view(B, P, w1.shape[0])


def _pool_mlp_implementation(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
    """The function that runs ``deco::pool_mlp`` on these arguments (the strategy's choice). It
    returns (y, pooled, pre) where the residuals are kept, else y and anything (None or the
    intermediates): the custom op's body puts the empty tensors of its schema in their place,
    which a direct call that wants y alone does not pay for."""
    on_triton = _backend.use_triton(x.device)
    _, composed_twin, tma_twin = _COMPOSED[pooling.pool_implementation(x, grid, out_grid)]
    return strategy.implementation(
        (x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals), on_triton=on_triton,
        key=lambda: _key("pool_mlp", x, grid, out_grid, keep_residuals, hidden=w1.shape[0], out=w2.shape[0], act=activation),
        fused=_pool_mlp_fused if on_triton else None, composed=composed_twin,
        composed_kernels=({"fused_tma": strategy.Candidate(tma_twin, opt_in=True)}
                          if on_triton and composed.tma_applies(x, w1, b1) else None),
    )


@custom_op("pool_mlp")
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
    args = (x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals)
    y, pooled, pre = _pool_mlp_implementation(*args)(*args)
    return (y, pooled, pre) if keep_residuals else (y, _empty(x), _empty(x))


@_pool_mlp.register_fake
def _(x, w1, b1, w2, b2, grid, out_grid, activation, keep_residuals):
    B, P = x.shape[0], torch.Size(out_grid).numel()
    y = x.new_empty((B, P, w2.shape[0]))
    if not keep_residuals:
        return y, _empty(x), _empty(x)
    return y, x.new_empty((B, P, x.shape[2])), x.new_empty((B, P, w1.shape[0]))


def _pool_mlp_setup(ctx, inputs, output):
    _, w1, b1, w2, b2, grid, out_grid, activation, keep = inputs
    # the pooled input is read for dW1 alone: with a frozen w1 it is not kept
    ctx.save_for_backward(w1, w2, output[1] if ctx.needs_input_grad[1] else None, output[2])
    ctx.grid, ctx.out_grid, ctx.activation, ctx.keep = grid, out_grid, activation, keep
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.set_materialize_grads(False)


def _pool_mlp_backward(ctx, dy, dpooled_extra, dpre_extra):
    w1, w2, pooled, pre = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::pool_mlp ran with keep_residuals=False; call deco_ops.pool_mlp to differentiate it")
    dy2 = None if dy is None else _rows(dy)
    dpre2 = None if dpre_extra is None else _rows(dpre_extra)
    dpooled, *param_grads = mlp_backward(ctx, dy2, dpre2, w1, w2, None if pooled is None else _rows(pooled), _rows(pre))
    dpooled = add_grads(None if dpooled is None else dpooled.view(pre.shape[:-1] + w1.shape[1:]), dpooled_extra)
    dx = None
    if ctx.needs_input_grad[0] and dpooled is not None:
        dx = deco.unpool_tokens(dpooled, ctx.grid, ctx.out_grid)
    return dx, *param_grads, None, None, None, None


register_autograd(_pool_mlp, _pool_mlp_backward, _pool_mlp_setup)


# ----------------------------------------------------------------------------------------------
# public API


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
    plan = _pool_linear_plans.get(x, w, b, grid, out_grid)
    if plan is None:
        out = _autocast.plain_call(pool_linear, "pool_linear", (x, w, b), {"grid": grid, "out_grid": out_grid})
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.pool_linear, *_pool_linear_checked(x, w, b, grid, out_grid))
    run, g, o, keep = plan
    return run(x, w, b, g, o, keep)[0]


def _pool_linear_checked(x, w, b, grid, out_grid) -> tuple[list[int], list[int], bool]:
    """Every check of ``pool_linear``: (grid, out_grid, whether autograd needs the residual)."""
    _validate.tensor("x", x, 3)
    _validate.linear("w", w, "b", b, x.shape[2], "x.shape[-1]")
    g, o = _check_common(x, grid, out_grid, w=w, b=b)
    return g, o, needs_residuals(x, w, b)


def _pool_linear_plan(x, w, b, grid, out_grid) -> tuple:
    """A plain eager call's plan: (what runs it, grid, out_grid, whether the residual is kept)."""
    g, o, keep = _pool_linear_checked(x, w, b, grid, out_grid)
    return _plan.runner(deco.pool_linear, _pool_linear_implementation, (x, w, b, g, o, keep), keep), g, o, keep


_pool_linear_plans = _plan.Plans(_pool_linear_plan)


def _pool_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation) -> tuple[list[int], list[int], bool]:
    """Every check of ``pool_mlp``: (grid, out_grid, whether autograd needs the residuals)."""
    _validate.tensor("x", x, 3)
    _validate.linear("w1", w1, "b1", b1, x.shape[2], "x.shape[-1]")
    _validate.linear("w2", w2, "b2", b2, w1.shape[0], "w1.shape[0] (hidden features)")
    _validate.activation(activation, ACTIVATIONS)
    g, o = _check_common(x, grid, out_grid, w1=w1, b1=b1, w2=w2, b2=b2)
    return g, o, needs_residuals(x, w1, b1, w2, b2)


def _pool_mlp_plan(x, w1, b1, w2, b2, grid, out_grid, activation) -> tuple:
    """A plain eager call's plan: (what runs it, grid, out_grid, whether residuals are kept)."""
    g, o, keep = _pool_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation)
    return _plan.runner(deco.pool_mlp, _pool_mlp_implementation, (x, w1, b1, w2, b2, g, o, activation, keep), keep), g, o, keep


_pool_mlp_plans = _plan.Plans(_pool_mlp_plan)


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
    plan = _pool_mlp_plans.get(x, w1, b1, w2, b2, grid, out_grid, activation)
    if plan is None:
        out = _autocast.plain_call(pool_mlp, "pool_mlp",
                                   (x, w1, b1, w2, b2), {"grid": grid, "out_grid": out_grid, "activation": activation})
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.pool_mlp, *_pool_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation))
    run, g, o, keep = plan
    return run(x, w1, b1, w2, b2, g, o, activation, keep)[0]
