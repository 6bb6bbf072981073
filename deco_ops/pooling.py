"""``adaptive_avg_pool_tokens``: 2D/3D adaptive average pooling of (B, N, C) token grids.

Registered as ``torch.ops.deco.adaptive_avg_pool_tokens`` and its adjoint
``torch.ops.deco.unpool_tokens``; each one's autograd formula is the other, so gradients of any
order flow and both are opaque, graph-break-free nodes under ``torch.compile``.

Each has a fused candidate (our Triton kernel, ``kernels/adaptive_pool.py``) and a composed one
(ATen's adaptive pooling and its backward on the channels-last view of the tokens,
``reference``); ``deco_ops.strategy`` picks per shape bucket on CUDA, the composed one on the
PyTorch backend. ATen's CUDA pooling backward is not deterministic (float atomics where windows
overlap), so ``torch.use_deterministic_algorithms(True)`` keeps the kernel for the unpooling.
ATen's numerics are eager PyTorch's: on CUDA in 16 bits its 2D kernels scale by a 16-bit
``1 / window`` and sum the backward in 16 bits, where the kernels accumulate in fp32 and divide
once; and its CUDA kernels index in 32 bits, so the composed candidate hands tensors past 2**31
elements to the kernels (``_aten_reaches``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _autocast, _backend, _plan, _validate, reference, strategy
from ._direct import custom_op, deco, register_autograd
from .kernels import adaptive_pool


def as_3d(grid) -> tuple[int, int, int]:
    """(H, W) -> (1, H, W): the kernels treat every grid as (T, H, W)."""
    return tuple(grid) if len(grid) == 3 else (1, *grid)


def _pool_kernel(x, grid, out_grid):
    return adaptive_pool.pool_tokens(x, as_3d(grid), as_3d(out_grid))


def _pool_reference(x, grid, out_grid):
    return reference.adaptive_avg_pool_tokens(x, grid, out_grid).contiguous()


# ATen's CUDA adaptive-pooling kernels index in 32 bits: the channels-last 2D ones cut strides and
# offsets to int32 (PyTorch's AdaptiveAveragePooling.cu); its CPU kernels index in 64 bits.
_ATEN_CUDA_INDEX_LIMIT = 2**31


def _aten_reaches(t: torch.Tensor, out_numel: int) -> bool:
    """Whether ATen's adaptive pooling (or its backward) reads ``t`` and writes ``out_numel``
    elements correctly: on CUDA, ``t``'s last element fewer than 2**31 elements past its storage's
    start and both sizes under 2**31; on the CPU, always."""
    if not t.is_cuda:
        return True
    last = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return max(last, t.numel(), out_numel) < _ATEN_CUDA_INDEX_LIMIT


def _pool_composed(x, grid, out_grid):
    """The Triton backend's composed candidate: ATen's pooling, or the kernel for tokens that ATen's
    CUDA kernels cannot index (a far-strided view, 2**31 elements): the decision, one per shape
    bucket, never sees strides, so a choice made on one call must hold for any layout."""
    if _aten_reaches(x, x.shape[0] * math.prod(out_grid) * x.shape[2]):
        return _pool_reference(x, grid, out_grid)
    return _pool_kernel(x, grid, out_grid)


def _key(op: str, t: torch.Tensor, grid, out_grid) -> str:
    return strategy.make_key(op, t.device, t.dtype, False, rows=strategy.bucket(t.shape[0] * math.prod(out_grid)),
                             C=t.shape[2], grid=grid, out_grid=out_grid)


def pool_implementation(x, grid, out_grid) -> Callable:
    """The function that runs ``deco::adaptive_avg_pool_tokens`` on these arguments (the strategy's
    choice), one of ``POOL_IMPLEMENTATIONS``."""
    on_triton = _backend.use_triton(x.device)
    return strategy.implementation((x, grid, out_grid), on_triton=on_triton,
                                   key=lambda: _key("adaptive_avg_pool_tokens", x, grid, out_grid),
                                   fused=_pool_kernel if on_triton else None,
                                   composed=_pool_composed if on_triton else _pool_reference)


POOL_IMPLEMENTATIONS = (_pool_kernel, _pool_composed, _pool_reference)


@custom_op("adaptive_avg_pool_tokens")
def _pool(x: torch.Tensor, grid: list[int], out_grid: list[int]) -> torch.Tensor:
    return pool_implementation(x, grid, out_grid)(x, grid, out_grid)


@_pool.register_fake
def _(x, grid, out_grid):
    return x.new_empty((x.shape[0], math.prod(out_grid), x.shape[2]))


def _unpool_kernel(grad, grid, out_grid):
    return adaptive_pool.unpool_tokens(grad, as_3d(grid), as_3d(out_grid))


def _unpool_reference(grad, grid, out_grid):
    return reference.unpool_tokens(grad, grid, out_grid).contiguous()


def _unpool_composed(grad, grid, out_grid):
    """The Triton backend's composed candidate: ATen's pooling backward, or the gather where ATen's
    CUDA kernels cannot index the tensors (``_pool_composed``)."""
    if _aten_reaches(grad, grad.shape[0] * math.prod(grid) * grad.shape[2]):
        return _unpool_reference(grad, grid, out_grid)
    return _unpool_kernel(grad, grid, out_grid)


def _unpool_implementation(grad, grid, out_grid) -> Callable:
    """The function that runs ``deco::unpool_tokens`` on these arguments (the strategy's choice)."""
    on_triton = _backend.use_triton(grad.device)
    return strategy.implementation((grad, grid, out_grid), on_triton=on_triton,
                                   key=lambda: _key("unpool_tokens", grad, grid, out_grid),
                                   fused=_unpool_kernel if on_triton else None,
                                   composed=_unpool_composed if on_triton else _unpool_reference,
                                   composed_deterministic=grad.device.type != "cuda")


@custom_op("unpool_tokens", plan=_unpool_implementation)
def _unpool(grad: torch.Tensor, grid: list[int], out_grid: list[int]) -> torch.Tensor:
    return _unpool_implementation(grad, grid, out_grid)(grad, grid, out_grid)


@_unpool.register_fake
def _(grad, grid, out_grid):
    return grad.new_empty((grad.shape[0], math.prod(grid), grad.shape[2]))


def _setup(ctx, inputs, output):
    ctx.grid, ctx.out_grid = inputs[1], inputs[2]
    ctx.set_materialize_grads(False)


def _pool_backward(ctx, grad):
    if grad is None:
        return None, None, None
    return deco.unpool_tokens(grad.contiguous(), ctx.grid, ctx.out_grid), None, None


def _unpool_backward(ctx, grad):
    if grad is None:
        return None, None, None
    return deco.adaptive_avg_pool_tokens(grad, ctx.grid, ctx.out_grid), None, None


register_autograd(_pool, _pool_backward, _setup)
register_autograd(_unpool, _unpool_backward, _setup)


def check_pool_input(x, grid, out_grid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validates (B, N, C) tokens against their grid; returns the parsed grids."""
    _validate.tensor("x", x, 3)
    _validate.floating("x", x, _backend.use_triton(x.device))
    g, o = _validate.grids(grid, out_grid)
    _validate.tokens(x, g)
    return g, o


def adaptive_avg_pool_tokens(x: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """Adaptive average pooling of a token grid, exactly ``F.adaptive_avg_pool2d``/``3d``.

    Args:
        x: ``(B, N, C)`` tokens, ``N = prod(grid)`` in row-major ``(H, W)`` or ``(T, H, W)`` order.
        grid: ``(H, W)`` or ``(T, H, W)``.
        out_grid: same rank as ``grid``, every entry >= 1 (may exceed ``grid``).

    Returns:
        ``(B, prod(out_grid), C)``; window ``i`` of an axis covers ``floor(i*L/O) .. ceil((i+1)*L/O)``.
    """
    plan = _plans.get(x, grid, out_grid)
    if plan is None:
        out = _autocast.plain_call(adaptive_avg_pool_tokens, "adaptive_avg_pool_tokens", (x, grid, out_grid))
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.adaptive_avg_pool_tokens, *_checked(x, grid, out_grid))
    run, g, o = plan
    return run(x, g, o)


def _checked(x, grid, out_grid) -> tuple[list[int], list[int]]:
    g, o = check_pool_input(x, grid, out_grid)
    return list(g), list(o)


def _plan_of(x, grid, out_grid) -> tuple:
    """A plain eager call's plan: (what runs it, grid, out_grid)."""
    g, o = _checked(x, grid, out_grid)
    records = torch.is_grad_enabled() and x.requires_grad
    return _plan.runner(deco.adaptive_avg_pool_tokens, pool_implementation, (x, g, o), records), g, o


_plans = _plan.Plans(_plan_of)
