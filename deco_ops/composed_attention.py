"""``cross_attention``'s composed twin: PyTorch's own scaled-dot-product-attention kernels, wherever
they express the call exactly.

The kernels are the ones ``F.scaled_dot_product_attention`` dispatches to, called through the ATen
ops that also return the log-sum-exp, so this twin keeps exactly the fused path's residuals (the
output and the fp32 LSE ``(B, H, M)``, natural log, ``+inf`` for a row without keys) and either
backward can follow either forward:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (SDPA's CPU kernel).
* CUDA: ``aten._scaled_dot_product_efficient_attention`` and its backward (SDPA's memory-efficient
  kernel, the one that takes an additive mask; its LSE is padded to a multiple of 32 queries).

How the call is expressed:

* shared queries ``(1, M, H, D)`` are expanded to the batch (a stride-0 view, never a copy); their
  gradient is summed over the batch;
* ``kv_lens`` becomes an additive ``0 / -inf`` mask. Keys at or past ``kv_lens[b]`` are replaced by
  zeros first, because SDPA still reads masked keys and ``0 * NaN`` would leak their garbage; a
  batch without keys attends to its zeroed keys and its rows are then set to zero output and
  ``+inf`` LSE, which makes every gradient of that batch exactly zero in backward.

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


def _inputs(q, k, v, kv_lens):
    """(B, H, *, D) views of q (expanded), k and v (zeroed past ``kv_lens``), the additive mask or
    None, and the (B,) bool "batch has keys" or None."""
    B, N, H, D = k.shape
    M = q.shape[1]
    qt = q.transpose(1, 2).expand(B, H, M, D)
    if kv_lens is None:
        return qt, k.transpose(1, 2), v.transpose(1, 2), None, None
    valid = torch.arange(N, device=k.device)[None, :] < kv_lens.to(device=k.device, dtype=torch.int64)[:, None]
    has_keys = kv_lens > 0
    k = torch.where(valid[:, :, None, None], k, 0.0)
    v = torch.where(valid[:, :, None, None], v, 0.0)
    attend = valid | ~has_keys[:, None]
    cuda = q.device.type == "cuda"
    width = -(-N // _BIAS_ALIGN_CUDA) * _BIAS_ALIGN_CUDA if cuda else N
    bias = torch.zeros((B, 1, 1, width), dtype=q.dtype, device=q.device)
    bias[..., :N].masked_fill_(~attend[:, None, None, :], float("-inf"))
    bias = bias[..., :N]
    if cuda:
        bias = bias.expand(B, H, M, N)
    return qt, k.transpose(1, 2), v.transpose(1, 2), bias, has_keys


def forward(q, k, v, kv_lens, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(O ``(B, M, H, D)`` in q's dtype, LSE ``(B, H, M)``), as ``deco::cross_attention``."""
    M = q.shape[1]
    qt, kt, vt, bias, has_keys = _inputs(q, k, v, kv_lens)
    if q.device.type == "cuda":
        o, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, False, scale=scale
        )
        lse = lse[:, :, :M]
    else:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, attn_mask=bias, scale=scale)
    out = o.transpose(1, 2)
    if has_keys is not None:
        out = torch.where(has_keys[:, None, None, None], out, 0.0)
        lse = torch.where(has_keys[:, None, None], lse, float("inf"))
    return out.contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, kv_lens, scale, need_dq: bool, need_dkv: bool):
    """(dq, dk, dv) from the residuals of either forward (None where not needed); dq of shared
    queries summed over the batch."""
    M = q.shape[1]
    qt, kt, vt, bias, _ = _inputs(q, k, v, kv_lens)
    do, ot = dout.transpose(1, 2), out.transpose(1, 2)
    if q.device.type == "cuda":
        padded = -(-M // _LSE_ALIGN_CUDA) * _LSE_ALIGN_CUDA
        lse = torch.nn.functional.pad(lse.float(), (0, padded - M))
        unused_rng = torch.zeros((), dtype=torch.int64)  # the Philox seed/offset; read only with dropout
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            do, qt, kt, vt, bias, ot, lse, unused_rng, unused_rng, 0.0, [need_dq, need_dkv, need_dkv, False], False, scale=scale
        )
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, qt, kt, vt, ot, lse, 0.0, False, attn_mask=bias, scale=scale
        )
    if need_dq and q.shape[0] == 1 and dq.shape[0] > 1:
        dq = dq.sum(0, keepdim=True)
    as_bmhd = lambda t, needed: t.transpose(1, 2).contiguous() if needed else None  # noqa: E731
    return as_bmhd(dq, need_dq), as_bmhd(dk, need_dkv), as_bmhd(dv, need_dkv)
