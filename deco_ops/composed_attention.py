"""``cross_attention``'s composed twin: PyTorch's own scaled-dot-product-attention kernels, wherever
they express the call exactly.

The kernels are the ones ``F.scaled_dot_product_attention`` dispatches to, called through the ATen
ops that also return the log-sum-exp, so this twin keeps exactly the fused path's residuals (the
output and the fp32 LSE ``(B, H, M)``, natural log, ``+inf`` for a row without keys) and either
backward can follow either forward:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (SDPA's CPU kernel),
  on ``(B, H, L, D)`` views.
* CUDA: ``aten._efficient_attention_forward`` / ``_backward`` (SDPA's memory-efficient kernel, the
  one that takes an additive mask), which read our ``(B, L, H, D)`` layout as it is. Its LSE holds
  ``ceil(M / 32) * 32`` queries per row; its mask rows must be 16-element aligned.

How the call is expressed:

* shared queries ``(1, M, H, D)`` are expanded to the batch (a stride-0 view, never a copy, except
  in the CUDA backward: see ``backward``); their gradient is summed over the batch;
* ``kv_lens`` becomes an additive ``0 / -inf`` mask. Keys at or past ``kv_lens[b]`` are replaced by
  zeros first, because SDPA still reads masked keys and ``0 * NaN`` would leak their garbage;
* the caller's additive mask (``bias``, ``deco_ops.cross_attention``'s ``attn_mask`` as a
  (B, H, M, N) view) is added to it at its compact (unbroadcast) shape;
* a row whose keys are all masked ("dead") attends to every key instead (SDPA would give NaN or
  a meaningless LSE) and its output is then set to zero and its LSE to ``+inf``, which makes every
  gradient of that row exactly zero in backward, as on the fused path.

Not expressible, so the fused path runs: dropout (SDPA draws its own mask; ours is Philox,
reproduced bit for bit by the reference path) and, on CUDA, head dims that are not a multiple of 8
(the memory-efficient kernel's alignment).
"""

from __future__ import annotations

import torch

_LSE_ALIGN_CUDA = 32  # the memory-efficient kernel's LSE holds ceil(M / 32) * 32 queries
_BIAS_ALIGN_CUDA = 16  # ... and wants its additive mask's rows 16-element aligned


def expressible(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether SDPA's kernels compute this call exactly."""
    if dropout_p > 0:
        return False
    if q.device.type == "cuda":
        return q.shape[-1] % 8 == 0
    return q.device.type == "cpu"


def deterministic_backward(device: torch.device) -> bool:
    """SDPA's CPU backward reduces in a fixed order; the memory-efficient CUDA backward may not."""
    return device.type != "cuda"


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A broadcast view at its own size: every zero-stride dim narrowed to 1."""
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def _inputs(q, k, v, kv_lens, user_bias=None):
    """q expanded to the batch (a view), k and v (zeroed past ``kv_lens``), the additive mask
    ``(B or 1, 1 or H, 1 or M, N)`` (expanded to (B, H, M, N) on CUDA) or None, and the bool "row has
    no key" ``(B or 1, 1 or H, 1 or M)`` or None; layouts as given."""
    B, N, H, _ = k.shape
    M = q.shape[1]
    q = q.expand(B, -1, -1, -1)
    if kv_lens is None and user_bias is None:
        return q, k, v, None, None
    bias = torch.zeros((1, 1, 1, N), dtype=q.dtype, device=q.device)
    if kv_lens is not None:
        valid = torch.arange(N, device=k.device)[None, :] < kv_lens.to(device=k.device, dtype=torch.int64)[:, None]
        k = torch.where(valid[:, :, None, None], k, 0.0)
        v = torch.where(valid[:, :, None, None], v, 0.0)
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
    if user_bias is not None:
        bias = bias + _compact(user_bias).to(q.dtype)
    dead = (bias == float("-inf")).all(-1)
    cuda = q.device.type == "cuda"
    width = -(-N // _BIAS_ALIGN_CUDA) * _BIAS_ALIGN_CUDA if cuda else N
    aligned = torch.zeros((*bias.shape[:-1], width), dtype=q.dtype, device=q.device)
    aligned[..., :N] = bias.masked_fill(dead[..., None], 0.0)
    bias = aligned[..., :N]
    if cuda:
        bias = bias.expand(B, H, M, N)
    return q, k, v, bias, dead


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the memory-efficient CUDA kernel accepts it: a 16-byte aligned start and strides,
    unit stride on the last dim (its alignment check fails otherwise, "no kernel found to launch",
    e.g. for a view that starts mid-buffer). Anything else is copied; an aligned tensor is not."""
    step = 16 // t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % step == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def forward(q, k, v, kv_lens, scale, need_lse: bool = True, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O ``(B, M, H, D)`` in q's dtype, LSE ``(B, H, M)``), as ``deco::cross_attention``.

    Without ``need_lse`` (no input requires grad: no backward will read the LSE) on CUDA, the
    output comes from ``F.scaled_dot_product_attention``, which picks PyTorch's fastest kernel for
    the call (cuDNN, flash or memory-efficient; the first GPU run measured cuDNN 1.3-2x faster than
    the memory-efficient kernel on BLIP-2 and Qwen-VL shapes), and the LSE is left unwritten."""
    M = q.shape[1]
    cuda = q.device.type == "cuda"
    if cuda and need_lse:
        q, k, v = (_aligned(t) for t in (q, k, v))
    q, k, v, bias, dead = _inputs(q, k, v, kv_lens, bias)
    if cuda and need_lse:
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(q, k, v, bias, None, None, None, None, 0.0, 0, True, scale=scale)
        lse = lse[:, :, :M]
    elif cuda:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=scale
        ).transpose(1, 2)
        lse = torch.empty((q.shape[0], q.shape[2], M), device=q.device, dtype=torch.float32)
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=bias, scale=scale
        )
        out = o.transpose(1, 2)
    if dead is not None:
        out = torch.where(dead.transpose(1, 2)[..., None], 0.0, out)
        lse = torch.where(dead, float("inf"), lse)
    return out.contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, kv_lens, scale, need_dq: bool, need_dkv: bool, bias=None):
    """(dq, dk, dv) from the residuals of either forward (None where not needed); dq of shared
    queries summed over the batch."""
    shared = q.shape[0] == 1
    M, N = q.shape[1], k.shape[1]
    q, k, v, bias, _ = _inputs(q, k, v, kv_lens, bias)
    if q.device.type == "cuda":
        # q is materialised: the kernel may lay dq out like q, and a stride-0 batch would alias it
        q = q.contiguous()
        dout, k, v, out = (_aligned(t) for t in (dout, k, v, out))
        padded = -(-M // _LSE_ALIGN_CUDA) * _LSE_ALIGN_CUDA
        lse = torch.nn.functional.pad(lse.float(), (0, padded - M))
        unused_rng = torch.zeros((), dtype=torch.int64)  # the Philox seed and offset, read only with dropout
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            dout, q, k, v, bias, out, None, None, M, N, lse, 0.0, unused_rng, unused_rng, 0, False, scale=scale
        )
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2), lse,
            0.0, False, attn_mask=bias, scale=scale,
        )
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if shared and dq.shape[0] > 1:
        dq = dq.sum(0, keepdim=True)
    return (dq.contiguous() if need_dq else None), (dk.contiguous() if need_dkv else None), (dv.contiguous() if need_dkv else None)
