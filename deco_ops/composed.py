"""The projectors' composed twins: what a careful user writes with the same pieces. Our pooling op
(the Triton pooling / packed-gather kernel on the Triton backend, PyTorch's adaptive pooling on
the PyTorch backend), then ``F.linear`` (cuBLAS ``addmm`` on CUDA), then the activation in PyTorch.

They return exactly the fused paths' residuals (the pooled input and the pre-activation, or the
pooled activation for ``mlp_pool``), so one backward serves both. On the PyTorch backend they are
the projectors' only implementation.

The backward through the activation is cuBLAS's ``dy @ W2`` then, on the Triton backend, one
elementwise Triton pass (``kernels/activation_backward.py``: dz, act and db1 from one read of the
pre-activation); on the PyTorch backend ATen's own activation backward kernel.

``linear_act_linear_tma`` is the same MLP with the first Linear and its activation on our persistent
TMA GEMM (Hopper only, ``tma_applies``): ``pool_mlp``'s and ``merge_mlp``'s opt-in ``fused_tma``
candidate, as ``tma_gemm.tma_gemm_act_grad`` is ``mlp_activation_backward``'s (``deco_ops.strategy``:
opt-in until a GPU has measured them against cuBLAS).

No cuBLASLt epilogue: ``torch._addmm_activation``'s GELU epilogue is the tanh approximation
applied to the fp32 accumulator, so it is not erf-GELU (``nn.GELU()``, the default here) and not
bit-identical to ``F.gelu(approximate="tanh")`` on the rounded pre-activation either; and under
autograd the pre-activation must be stored anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import reference
from .kernels import _tuning, activation_backward, tma_gemm


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((0,))


def pool_linear(pooled: torch.Tensor, w, b, keep_residuals: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Linear(pooled)``, pooled or empty), as ``deco::pool_linear``."""
    return F.linear(pooled, w, b), pooled if keep_residuals else _empty(pooled)


def pool_mlp(pooled: torch.Tensor, w1, b1, w2, b2, activation: str, keep_residuals: bool):
    """(``Linear2(act(Linear1(pooled)))``, pooled, pre-activation) (empties when not kept), as
    ``deco::pool_mlp`` and ``deco::pool_mlp_packed``."""
    if not keep_residuals:  # one expression: the pre-activation is freed once the activation has read it,
        # before the second Linear's output exists (eager's inference peak; a local held it to the end)
        # (the empties inline, as ``_empty`` makes them: two Python-level calls fewer on every inference call)
        return (F.linear(reference.ACTIVATIONS[activation](F.linear(pooled, w1, b1)), w2, b2),
                pooled.new_empty((0,)), pooled.new_empty((0,)))
    pre = F.linear(pooled, w1, b1)
    return F.linear(reference.ACTIVATIONS[activation](pre), w2, b2), pooled, pre


def tma_applies(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, rows_dtype: torch.dtype | None = None) -> bool:
    """Whether ``linear_act_linear_tma`` can run the first Linear of a projector on rows made from
    ``x`` (pooled or normalised merged rows: a fresh contiguous (rows, w1.shape[1]) tensor, so only
    the device, dtype and widths matter; ``rows_dtype``: theirs where it is not x's, a float32
    norm's rows rounded to a 16-bit MLP's dtype): an sm_90 device (Hopper's TMA descriptors and
    wgmma; the interpreter plans for one on the CPU), 16-bit operands of one dtype, input and
    hidden rows 16-byte multiples, ``w1`` readable through a descriptor (``tma_gemm.tma_compatible``)."""
    dtype = x.dtype if rows_dtype is None else rows_dtype
    return (_tuning.device_arch(x.device) == 90 and w1.dtype == dtype and (b1 is None or b1.dtype == dtype)
            and w1.shape[1] * w1.element_size() % tma_gemm.TMA_ALIGN_BYTES == 0
            and w1.shape[0] * w1.element_size() % tma_gemm.TMA_ALIGN_BYTES == 0 and tma_gemm.tma_compatible(w1))


def linear_act_linear_tma(rows: torch.Tensor, w1, b1, w2, b2, activation: str,
                          keep_pre: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``Linear2(act(Linear1(rows)))``, the pre-activation or None) for 2-D contiguous ``rows``,
    the first Linear, its bias and the activation in one persistent TMA GEMM
    (``kernels/tma_gemm.py``, sm_90) instead of ``F.linear`` plus a PyTorch activation: the
    pre-activation is written only when kept, the activation never round-trips through memory.
    The second Linear stays on cuBLAS. See ``tma_applies``; a ``w1`` a descriptor cannot read (a plan
    keeps the choice of its first call, and its key holds no strides or addresses) takes
    ``F.linear`` and the activation in PyTorch instead."""
    if tma_gemm.tma_compatible(w1):
        act, pre = tma_gemm.tma_linear_act(rows, w1, b1, activation, store_pre=keep_pre)
    else:
        pre = F.linear(rows, w1, b1)
        act = reference.ACTIVATIONS[activation](pre)
        if not keep_pre:  # freed before the second Linear's output is allocated (eager's inference peak)
            pre = None
    return F.linear(act, w2, b2), pre


def pool_mlp_tma(pooled: torch.Tensor, w1, b1, w2, b2, activation: str, keep_residuals: bool):
    """``pool_mlp`` on ``linear_act_linear_tma``, with pool_mlp's residuals. ``pooled`` (B, P, C)
    contiguous."""
    B, P, C = pooled.shape
    y, pre = linear_act_linear_tma(pooled.view(B * P, C), w1, b1, w2, b2, activation, keep_residuals)
    y = y.view(B, P, w2.shape[0])
    if not keep_residuals:
        return y, _empty(pooled), _empty(pooled)
    return y, pooled, pre.view(B, P, w1.shape[0])


def act_grad_tma_applies(dy: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> bool:
    """Whether ``tma_gemm.tma_gemm_act_grad`` can run ``deco::mlp_activation_backward``'s call: an
    sm_90 device, dy, w2 and pre of one 16-bit dtype and readable through descriptors, hidden rows
    of the new dz a 16-byte multiple."""
    return (_tuning.device_arch(dy.device) == 90 and dy.dtype == w2.dtype == pre.dtype
            and tma_gemm.tma_compatible(dy, w2, pre) and pre.shape[1] * pre.element_size() % tma_gemm.TMA_ALIGN_BYTES == 0)


def mlp_pool(x: torch.Tensor, w1, b1, w2, b2, activation: str, pool: Callable[..., torch.Tensor],
             *where) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Linear2(pool(act(Linear1(x)), *where))``, the pooled activation), as
    ``deco::mlp_pool_packed`` (the residual is an intermediate anyway)."""
    pooled = pool(reference.ACTIVATIONS[activation](F.linear(x, w1, b1)), *where)
    return F.linear(pooled, w2, b2), pooled


def mlp_pool_act_backward(x: torch.Tensor, w1, b1, dpooled: torch.Tensor, activation: str,
                          unpool: Callable[..., torch.Tensor], *where) -> torch.Tensor:
    """``unpool(dpooled, *where) * act'(x @ w1.T + b1)``, the pre-activation recomputed, act' in at least fp32."""
    z = F.linear(x, w1, b1)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    # act'(z) first, into z's name (z freed before the un-pooled gradient exists), then the product in
    # place: two token-sized buffers fewer at the peak than the product of the two (eager's peak)
    z = reference.ACTIVATION_GRADS[activation](z)
    z *= unpool(dpooled, *where).to(z.dtype)
    return z.to(x.dtype)


def mlp_activation_backward(dy: torch.Tensor, w2, pre: torch.Tensor, activation: str, need_db1: bool,
                            elementwise_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``dh * act'(pre)``, ``act(pre)``, db1 or empty) with ``dh = dy @ w2``, as
    ``deco::mlp_activation_backward``: cuBLAS for ``dh``, then (``elementwise_kernel``, the Triton
    backend) one Triton pass over ``dh`` and ``pre`` that writes both tensors and sums db1 in the
    same read, or (PyTorch backend) ATen's activation backward kernel and one reduction."""
    if elementwise_kernel:
        dz, act, db1 = activation_backward.activation_backward(dy @ w2, pre, activation, need_db1, dh_is_scratch=True)
        return dz, act, db1 if need_db1 else _empty(dz)
    dz, act = reference.mlp_activation_backward(dy, w2, pre, activation)
    return dz, act, reference.bias_grad(dz) if need_db1 else _empty(dz)
