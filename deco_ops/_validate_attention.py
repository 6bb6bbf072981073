"""Argument checks of ``deco_ops.cross_attention``: each raises ValueError/TypeError naming the
argument, before anything is launched.

Host syncs: none for ``kv_lens`` (its values are never read on the host: every path clamps each length
into [0, N], on CPU and CUDA alike, with value checks on or off) nor for ``attn_mask`` (any pattern is
computed exactly, so there is nothing to check in its values). Packed keys
(``cu_seqlens_k``) need their longest length on the host to size the launch: that is one
documented transfer (one ``tolist()``), and the offsets are checked from that host copy for free."""

from __future__ import annotations

import math
import numbers

import torch

from . import _backend, _validate

MAX_HEAD_DIM = 256
INDEX_DTYPES = (torch.int32, torch.int64)


def floating(name: str, value: torch.Tensor, use_triton: bool) -> None:
    """fp16/bf16/fp32 everywhere; float64 on the reference path and under Triton's interpreter
    (there the kernels accumulate in fp64, so float64 gradchecks run the real kernels)."""
    _validate.floating(name, value, use_triton and not (_backend.interpreting() and value.device.type == "cpu"))


def qkv(q, k, v, packed: bool) -> tuple[int, int]:
    """Shapes of q (B or 1, M, H, D) and k, v (B, N, H, D), or packed (total_N, H, D); returns (H, D)."""
    _validate.tensor("q", q, 4)
    kv_rank = 3 if packed else 4
    layout = "(total_N, H, D) with cu_seqlens_k" if packed else "(B, N, H, D)"
    for name, t in (("k", k), ("v", v)):
        _validate.tensor(name, t)
        if t.dim() != kv_rank:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    H, D = q.shape[2], q.shape[3]
    if k.shape[-2] != H:
        raise ValueError(f"k/v have {k.shape[-2]} heads but q has {H} (q is (B, M, H, D), k/v {layout})")
    if k.shape[-1] != D:
        raise ValueError(f"k/v have head dim {k.shape[-1]} but q has {D}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got q of shape {tuple(q.shape)}")
    if q.shape[1] < 1:
        raise ValueError(f"q must have at least one query, got shape {tuple(q.shape)}")
    if H < 1:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    if k.shape[-3] < 1:
        raise ValueError(f"k/v must have at least one key, got shape {tuple(k.shape)}")
    use_triton = _backend.use_triton(q.device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        floating(name, t, use_triton)
    _validate.same_dtype("q", q, k=k, v=v)
    _validate.same_device("q", q, k=k, v=v)
    return H, D


def query_batch(q: torch.Tensor, B: int) -> None:
    if q.shape[0] != 1 and q.shape[0] != B:  # != rather than ``in``: as attn_mask's check, for torch.compile's symbolic sizes
        raise ValueError(f"q has batch {q.shape[0]}; it must be 1 (queries shared by the batch) or the key batch {B}")


def kv_lens(value, B: int, device: torch.device) -> torch.Tensor | None:
    """(B,) int32/int64 lengths on q's device; returned as contiguous int32. Values are not read:
    every path clamps them into [0, N] (documented behaviour, the same on every device); int64
    lengths are clamped into int32's range first, on the device (a cast alone wraps 2**31 to a
    negative length and 2**32 + 5 to 5)."""
    if value is None:
        return None
    _validate.tensor("kv_lens", value, 1)
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"kv_lens must be int32 or int64, got {value.dtype}")
    if value.shape[0] != B:
        raise ValueError(f"kv_lens has {value.shape[0]} entries but the batch is {B}")
    if value.device != device:
        raise ValueError(f"kv_lens is on {value.device} but q is on {device}")
    if value.dtype == torch.int64:
        value = value.clamp(0, 2**31 - 1)
    return value.to(torch.int32).contiguous()


def attn_mask(value, shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention``'s ``attn_mask``: bool (True = attend) or floating (added to
    the scores), of up to 4 dims broadcastable to ``shape`` = (B, H, M, N), on q's device. A mask
    that requires grad raises: no gradient flows to it."""
    if value is None:
        return None
    _validate.tensor("attn_mask", value)
    if not (value.dtype == torch.bool or value.is_floating_point()):
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to the scores), got {value.dtype}")
    # != rather than ``in``: while torch.compile traces, ``in`` compares a static mask size with the
    # symbolic sizes of a recompile as different objects, where != compares values
    if value.dim() > 4 or any(n != 1 and n != want for n, want in zip(reversed(value.shape), reversed(shape))):
        raise ValueError(
            f"attn_mask of shape {tuple(value.shape)} does not broadcast to (B, H, M, N) = {shape} "
            "(batch, heads, queries, keys; SDPA's convention)"
        )
    if value.device != device:
        raise ValueError(f"attn_mask is on {value.device} but q is on {device}")
    if value.requires_grad:
        raise ValueError(
            "attn_mask requires grad: deco_ops.cross_attention computes no gradient for an additive mask; "
            "pass attn_mask.detach(), or use F.scaled_dot_product_attention to learn the bias"
        )
    return value


def cu_seqlens(value, total: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """int32 (B + 1,) offsets, 0 = cu[0] <= cu[1] <= ... <= cu[B] <= total_N (FlashAttention's
    convention). Returns (cu_seqlens_k, B, longest sequence)."""
    _validate.tensor("cu_seqlens_k", value, 1)
    if value.dtype != torch.int32:
        raise TypeError(f"cu_seqlens_k must be int32 (FlashAttention's convention), got {value.dtype}")
    if value.shape[0] < 2:
        raise ValueError(f"cu_seqlens_k must have B + 1 >= 2 entries, got {value.shape[0]}")
    if value.device != device:
        raise ValueError(f"cu_seqlens_k is on {value.device} but q is on {device}")
    if value.is_meta:  # as packed grids: the offsets are read on the host, and a meta tensor has none
        raise ValueError("cu_seqlens_k must hold its values (a CPU or GPU tensor; its offsets size the launch), "
                         "got a tensor on the meta device")
    _validate.not_traced("cu_seqlens_k")
    offsets = value.tolist()  # the one host transfer (a sync when on the GPU): sizes the launch
    lens = [b - a for a, b in zip(offsets, offsets[1:])]
    if offsets[0] != 0 or min(lens) < 0 or offsets[-1] > total:
        raise ValueError(f"cu_seqlens_k must start at 0, never decrease and end at most at total_N={total}, got {offsets}")
    return value.contiguous(), value.shape[0] - 1, max(1, max(lens))


# A real number, numpy's too, as SDPA takes them. int and float first: isinstance against a tuple
# stops at the first match, where numbers.Real alone takes the ABC's instance check on every call.
_REALS = (int, float, numbers.Real)


def scale(value, D: int) -> float:
    if value is None:
        return 1.0 / math.sqrt(D)  # SDPA's default, computed as it computes it (``D ** -0.5`` may differ in the last bit)
    if isinstance(value, bool) or not isinstance(value, _REALS):
        raise TypeError(f"softmax_scale must be a finite float or None, got {value!r}")
    if not -math.inf < value < math.inf:  # comparisons: a SymFloat under torch.compile too
        raise ValueError(f"softmax_scale must be a finite float or None, got {value!r}")
    return float(value)


def dropout(p, generator) -> float:
    if isinstance(p, bool) or not isinstance(p, _REALS) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return float(p)
