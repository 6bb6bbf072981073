"""Attention weights of the cross-attention, from the forward's log-sum-exp.

    W[b, h, i, j] = exp(scale * q_i . k_j + bias_ij - LSE[b, h, i]) / R[b, h, i] o Z / (1 - p)
    R[b, h, i]    = sum_j exp(scale * q_i . k_j + bias_ij - LSE[b, h, i])

exactly the probabilities the forward weighted V with (the same additive mask, keys past
``kv_lens[b]`` at zero, the same regenerated dropout mask Z). ``nn.MultiheadAttention`` returns
these (``need_weights=True``), per head (B, H, M, N) or averaged over the heads (B, M, N).

The LSE alone would normalise every row, but an fp32 LSE is off by up to half its ulp, and that
error is a factor common to the row: 4e-6 of every weight at logits near 100, where eager softmax
is off by its rounding alone, and softmax's backward through the weights turns a row sum off 1
into error in the gradients (100x eager's in dq at such logits, in fp32). So a first pass
(``ROW_SUMS``: one program per (batch, head, query block) over all its keys) sums each row, and the
weights are divided by the sum, which cancels the LSE's error as softmax's own sum would.

One program of the weights pass owns a BLOCK_M x BLOCK_N tile of (batch, query, key) and, when
averaging, loops over the heads and sums in registers, so the per-head matrix is never written.
A row without keys (LSE = +inf, sum 0) gets zeros.

Counts: flops = 4 * B*H*M*N*D (QK^T computed in both passes); bytes = (reads of Q and K once per
key block or query block, twice) + B*(H or 1)*M*N * elem written.
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._tuning import autotuned, dot_dtype_workaround
from .cross_attention_fwd import (
    LOG2E, LOG2E_JIT, acc_dtype, add_bias, bias_args, dot_precision, dropout_keep, dropout_stream, kv_at, kv_extent, kv_mode, kv_strides,
    int32_heads, load_bias, load_rows,
)
from .dot import dot
from .scalars import fp32_scalar


def cuda_configs() -> list[triton.Config]:
    """Small tiles: the kernel is write-bound (M x N weights per head) with one dot per head."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 8, 2)]
    ]


def fits(config: triton.Config, elem_bytes: int, ieee: bool, extra_tiles: bool) -> bool:
    """Whether ``config`` compiles without register spills (``python -m deco_ops.aot``, sm_90,
    triton 3.9, head dims 64 and 128): 16x64 tiles on 4 warps always; 16-bit inputs also 32x128 on
    8 warps, and every config without dropout and mask tiles (``extra_tiles``); exact fp32 dots
    (``ieee``: FMA) only 16x64; tf32 every config without the extra tiles."""
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
    if tile == (16, 64, 4):
        return True
    if elem_bytes == 2 and tile == (32, 128, 8):
        return True
    return not ieee and not extra_tiles


def _prune(configs, named_args, **constexprs):
    ieee = constexprs["INPUT_PRECISION"] == "ieee"
    extra = constexprs["DROPOUT"] or constexprs["HAS_BIAS"]
    return [c for c in configs if fits(c, named_args["q_ptr"].element_size(), ieee, extra)]


INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})


@triton.jit
def exp_scores(q, k_base, bias_base, lse_rows, rows, row_mask, cols, col_mask, dims, dim_mask, skn, skd, sbm, sbn, qk_scale,
               HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """exp(S + bias - LSE) of the (rows, cols) tile of one head, zero outside the valid keys:
    the probabilities before their row's sum divides them. ``lse_rows``: the head's LSE row."""
    valid = row_mask[:, None] & col_mask[None, :]
    k = load_rows(k_base, cols, col_mask, skn, dims, dim_mask, skd)
    s = dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=ACC), DOT_FP32, INPUT_PRECISION) * qk_scale
    if HAS_BIAS:
        s = add_bias(s, load_bias(bias_base, rows[:, None], cols[None, :], valid, sbm, sbn))
    lse2 = tl.load(lse_rows + rows, mask=row_mask, other=0.0) * LOG2E_JIT
    return tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)


@autotuned(cuda_configs(), INTERPRET_CONFIG,
           key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "AVERAGE", "ROW_SUMS", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_prune)
@triton.jit
def cross_attention_weights_kernel(
    q_ptr, k_ptr, lse_ptr, sum_ptr, w_ptr, lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, sbb, sbh, sbm, sbn, swb, swh, swm, swn,
    qk_scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, AVERAGE: tl.constexpr, ROW_SUMS: tl.constexpr,
    ACC: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * (1 if AVERAGE else H), ceil(M / BLOCK_M), ceil(N / BLOCK_N)). AVERAGE: the mean
    over the heads at w_ptr (head stride unused); else head h's weights. ROW_SUMS (grid (B * H,
    ceil(M / BLOCK_M), 1), not AVERAGE): the row sums of ``exp_scores`` over all keys, to sum_ptr
    (B, H, M), which the weights pass then reads."""
    qk_scale, dropout_p = fp32_scalar(qk_scale), fp32_scalar(dropout_p)
    pid = tl.program_id(0).to(tl.int64)  # int64 heads: the loop's offsets below need no casts
    if AVERAGE:
        b = pid
        h_lo = pid * 0
        h_hi = h_lo + H
    else:
        b = pid // H
        h_lo = pid % H
        h_hi = h_lo + 1
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    col_mask = cols < kv_len
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)
    inv_keep = 1.0 / (1.0 - dropout_p)

    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for h in range(h_lo, h_hi):
        bh = b * H + h
        q = load_rows(q_ptr + b * sqb + h * sqh, rows, row_mask, sqm, dims, dim_mask, sqd)
        k_base = k_ptr + b * skb + kv_start * skn + h * skh
        bias_base = bias_ptr + b * sbb + h * sbh
        lse_rows = lse_ptr + bh * M
        if ROW_SUMS:
            sums = tl.zeros([BLOCK_M], dtype=ACC)
            for start in range(0, kv_len, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                sums += tl.sum(exp_scores(q, k_base, bias_base, lse_rows, rows, row_mask, keys, keys < kv_len, dims, dim_mask,
                                          skn, skd, sbm, sbn, qk_scale, HAS_BIAS, ACC, DOT_FP32, INPUT_PRECISION), 1)
            tl.store(sum_ptr + bh * M + rows, sums, mask=row_mask)
        else:
            sums = tl.load(sum_ptr + bh * M + rows, mask=row_mask, other=1.0)
            p = exp_scores(q, k_base, bias_base, lse_rows, rows, row_mask, cols, col_mask, dims, dim_mask,
                           skn, skd, sbm, sbn, qk_scale, HAS_BIAS, ACC, DOT_FP32, INPUT_PRECISION)
            p = p / tl.where(sums == 0.0, 1.0, sums)[:, None]  # a row without keys sums to 0: zeros
            if DROPOUT:
                keep = dropout_keep(seed, rng_offset, bh, M, N, rows[:, None], cols[None, :], dropout_p)
                p = tl.where(keep, p * inv_keep, 0.0)
            total += p
    if not ROW_SUMS:
        if AVERAGE:
            total = total / H
        w_ptrs = w_ptr + b * swb + h_lo * swh + rows.to(tl.int64)[:, None] * swm + cols[None, :] * swn
        tl.store(w_ptrs, total.to(w_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N)[None, :])


@on_input_device
def cross_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    B: int,
    N: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    bias: torch.Tensor | None,
    average: bool,
) -> torch.Tensor:
    """(B, M, N) head-averaged or (B, H, M, N) per-head weights in q's dtype; arguments as
    ``cross_attention_fwd`` plus its LSE."""
    q, k = int32_heads(q, k)
    _, M, H, D = q.shape
    w = torch.empty((B, M, N) if average else (B, H, M, N), device=q.device, dtype=q.dtype)
    if B == 0:
        return w
    w_strides = (w.stride(0), 0, *w.stride()[1:]) if average else w.stride()
    bias_ptr, *bias_strides = bias_args(bias, lse)
    sqb = 0 if q.shape[0] == 1 else q.stride(0)
    sums = torch.empty((B, H, M), device=q.device, dtype=torch.float32)

    def launch(grid, row_sums: bool):
        cross_attention_weights_kernel[grid](
            q, k, lse, sums, w, kv_lens if kv_lens is not None else lse, cu_seqlens_k if cu_seqlens_k is not None else lse,
            rng if rng is not None else lse, bias_ptr,
            H, M, N, D,
            sqb, *q.stride()[1:], *kv_strides(k), *bias_strides, *w_strides,
            scale * LOG2E, dropout_p,
            KV_MODE=kv_mode(kv_lens, cu_seqlens_k), HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0 and not row_sums,
            AVERAGE=average and not row_sums, ROW_SUMS=row_sums,
            ACC=acc_dtype(q.dtype), DOT_FP32=dot_dtype_workaround(q.dtype == torch.bfloat16),
            INPUT_PRECISION=dot_precision(q.dtype), BLOCK_D=max(16, next_power_of_2(D)),
        )

    launch(lambda meta: (B * H, cdiv(M, meta["BLOCK_M"]), 1), row_sums=True)
    launch(lambda meta: (B * (1 if average else H), cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"])), row_sums=False)
    return w
