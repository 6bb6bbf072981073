"""The projectors' composed twins: what a careful user writes with the same pieces. Our pooling op
(the Triton pooling / packed-gather kernel on the Triton backend, PyTorch's adaptive pooling on
the PyTorch backend), then ``F.linear`` (cuBLAS ``addmm`` on CUDA), then the activation in PyTorch.

They return exactly the fused paths' residuals (the pooled input and the pre-activation, or the
pooled activation for ``mlp_pool``), so one backward serves both. On the PyTorch backend they are
the projectors' only implementation.

The backward through the activation is cuBLAS's ``dy @ W2`` then, on the Triton backend, one
elementwise Triton pass (``kernels/activation_backward.py``: dz, act and db1 from one read of the
pre-activation); on the PyTorch backend ATen's own activation backward kernel.

``pool_mlp_tma`` is the same composition with the first Linear and its activation on our
persistent TMA GEMM (Hopper only, ``tma_applies``), a candidate the strategy weighs against cuBLAS.

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
    pre = F.linear(pooled, w1, b1)
    y = F.linear(reference.ACTIVATIONS[activation](pre), w2, b2)
    if not keep_residuals:
        return y, _empty(pooled), _empty(pooled)
    return y, pooled, pre


def tma_applies(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None) -> bool:
    """Whether ``pool_mlp_tma`` can run pool_mlp's call on ``x`` (tokens or pooled rows: only the
    device, dtype and channel count matter, the pooled rows being a fresh contiguous tensor): a
    Hopper GPU (TMA descriptors, wgmma), 16-bit operands of one dtype, channel and hidden rows
    16-byte multiples (``tma_gemm.tma_compatible``)."""
    row_bytes = x.shape[-1] * x.element_size()
    return (x.device.type == "cuda" and _tuning.device_arch(x.device) == 90 and w1.dtype == x.dtype
            and (b1 is None or b1.dtype == x.dtype) and w1.shape[0] % 8 == 0 and w1.shape[-1] == x.shape[-1]
            and row_bytes % tma_gemm.TMA_ALIGN_BYTES == 0 and tma_gemm.tma_compatible(w1))


def pool_mlp_tma(pooled: torch.Tensor, w1, b1, w2, b2, activation: str, keep_residuals: bool):
    """``pool_mlp`` with the first Linear, its bias and the activation in one persistent TMA GEMM
    (``kernels/tma_gemm.py``, sm_90) instead of ``F.linear`` plus a PyTorch activation: the
    pre-activation is written only when kept, the activation never round-trips through memory.
    The second Linear stays on cuBLAS. ``pooled`` (B, P, C) contiguous; see ``tma_applies``."""
    B, P, C = pooled.shape
    act, pre = tma_gemm.tma_linear_act(pooled.view(B * P, C), w1, b1, activation, store_pre=keep_residuals)
    y = F.linear(act, w2, b2).view(B, P, w2.shape[0])
    if not keep_residuals:
        return y, _empty(pooled), _empty(pooled)
    return y, pooled, pre.view(B, P, w1.shape[0])


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
    return (unpool(dpooled, *where).to(z.dtype) * reference.ACTIVATION_GRADS[activation](z)).to(x.dtype)


def mlp_activation_backward(dy: torch.Tensor, w2, pre: torch.Tensor, activation: str, need_db1: bool,
                            elementwise_kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``dh * act'(pre)``, ``act(pre)``, db1 or empty) with ``dh = dy @ w2``, as
    ``deco::mlp_activation_backward``: cuBLAS for ``dh``, then (``elementwise_kernel``, the Triton
    backend) one Triton pass over ``dh`` and ``pre`` that writes both tensors and sums db1 in the
    same read, or (PyTorch backend) ATen's activation backward kernel and one reduction."""
    if elementwise_kernel:
        dz, act, db1 = activation_backward.activation_backward(dy @ w2, pre, activation, need_db1)
        return dz, act, db1 if need_db1 else _empty(dz)
    dz, act = reference.mlp_activation_backward(dy, w2, pre, activation)
    return dz, act, reference.bias_grad(dz) if need_db1 else _empty(dz)
