"""Patch merge + norm fused into a GEMM's A-operand load, with bias and activation in the epilogue:

    out[m, n] = act( sum_k norm(merge(x))[m, k] * w[n, k] + b[n] ),   m = merged row, k = q*C + c

the first Linear of the Qwen2/2.5/3-VL ``PatchMerger`` and InternVL's ``mlp1``. Neither the merged
nor the normalised tensor exists in memory: the K loop walks the S*S sub-tokens ``q`` of each
merged row and, inside, chunks of their C channels; each A tile is gathered from its tokens
(``merge_rows.merged_rows``: consecutive tokens for Qwen's order, a strided 2x2 block of the grid
for InternVL's), normalised in fp32 with the per-group statistics of the ``merge_norm_stats``
pre-pass and the norm's weight and bias, and rounded to the operand dtype once, as the eager
norm's output is. Then a tensor-core ``tl.dot`` with fp32 accumulation; the epilogue adds the
bias, optionally stores the pre-activation (kept for backward) and applies the activation.

Why a pre-pass and not a fold of the norm into W1: ``W1 @ LN(x)`` can be rewritten as
``rstd * (x @ (W1*gamma).T) - rstd*mean*rowsum(W1*gamma) + W1 @ beta``, a plain GEMM on raw
tokens, but that subtracts two large terms when the tokens' mean is large against their spread
(cancellation in the fp32 accumulator), rounds ``W1*gamma`` to 16 bits, and needs S*S separate
accumulators for a pre-merge norm. The pre-pass costs one extra read of the tokens (C/hidden of
the GEMM's own operand traffic) and keeps the GEMM's A operand bit-identical to eager's.

Counts (M merged rows, K = S*S*C, N = hidden):
    flops = 2 * M * N * K                                   (the norm adds ~4*M*K)
    bytes = (M*K + N*K + N + M*N * (1 + stored_pre)) * elem + 8 * M * groups
"""

import torch
import triton
import triton.language as tl

from . import activations
from ._device import on_input_device
from .dot import dot
from .gemm_epilogue import bias_act_store
from .merge_rows import NORMS, ORDERS, affine, group_stats, merged_rows, norm_channels, standardized_tile
from .tiling import INTERPRET_CONFIG, gemm_configs, output_tile, tile_grid
from ._tuning import autotuned, device_arch, dot_dtype_workaround, input_precision


def cuda_configs() -> list[triton.Config]:
    """Tiles for Hopper/Ampere: M = merged rows is a few hundred to a few thousand per image
    batch, N (hidden) and K (S*S*C) are 4-5k."""
    return gemm_configs([
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 64, 32, 4, 2),
        (32, 64, 32, 4, 2),
    ])


def fits(config: triton.Config, elem_bytes: int, ieee_fp32: bool, arch: int) -> bool:
    """Whether ``config`` compiles without spills (``python -m deco_ops.aot``, sm_90 and sm_80).
    sm_90: 16-bit operands fit every tile; fp32 ones (tf32) only 64x64 tiles (64x128 and 128x128
    spilled 64-192 B, the fp32 A tile and its normalisation sit beside the accumulator); exact
    fp32 dots (no tf32) run on FMA units and fit only the 64x64x32 tile (BLOCK_K 64 spilled
    20-48 B). sm_80 (no wgmma, the accumulator in registers): 16-bit operands fit 64x64 tiles
    (64x128 and 128x128 spill with a pre-merge norm or packed rows); fp32 only 32x64x32 (every
    64x64 tile spills for some norm, order or precision; with exact fp32 dots that tile still
    spills under triton 3.6, on sm_80 and, for InternVL's post-merge norm, on sm_90 — so sm_90
    keeps its 64x64 tiles)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if arch < 90:
        return bm * bn <= 64 * 64 if elem_bytes < 4 else (bm, bn, bk) == (32, 64, 32)
    if elem_bytes < 4:
        return True
    return (bm, bn) == (64, 64) and (not ieee_fp32 or bk <= 32)


def _prune(configs, named_args, **constexprs):
    x, w = named_args["x_ptr"], named_args["w_ptr"]
    ieee = w.dtype == torch.float32 and constexprs["INPUT_PRECISION"] == "ieee"  # the dot's operands are w's dtype
    # fp32 tokens before a 16-bit w (what autocast runs) hold fp32 A tiles until the rounding: the
    # fp32 tile rules (a 64x128 tile spilled 16-20 B on sm_90 under triton 3.6)
    return [c for c in configs if fits(c, max(x.element_size(), w.element_size()), ieee, device_arch(w.device))]


@autotuned(
    cuda_configs(), INTERPRET_CONFIG,
    key=["M", "N", "C", "ORDER", "PACKED", "MERGE", "NORM", "PRE", "STORE_PRE", "ACTIVATION", "INPUT_PRECISION"],
    buckets=("M",), prune=_prune,
)
@triton.jit
def merge_gemm_kernel(
    x_ptr, stats_ptr, wn_ptr, bn_ptr, w_ptr, b_ptr, out_ptr, pre_ptr, image_ptr, geometry_ptr,
    M, N, C, P, H, W,
    sxb, sxn, sxc, swn, swk,
    ORDER: tl.constexpr, PACKED: tl.constexpr, MERGE: tl.constexpr, NORM: tl.constexpr, PRE: tl.constexpr,
    HAS_WN: tl.constexpr, HAS_BN: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, _, rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)
    base, step_h = merged_rows(rows, row_mask, P, H, W, sxb, sxn, image_ptr, geometry_ptr, ORDER, PACKED, MERGE)
    if not PRE:
        mean, rstd = group_stats(stats_ptr, rows, row_mask, 0, 1)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * swn
    for q in range(MERGE * MERGE):
        if PRE:
            mean, rstd = group_stats(stats_ptr, rows, row_mask, q, MERGE * MERGE)
        for c0 in range(0, C, BLOCK_K):
            c = c0 + ks
            xhat, c_mask = standardized_tile(x_ptr, base, step_h, sxn, sxc, q, c, C, row_mask, mean, rstd, NORM, MERGE)
            a = affine(xhat, wn_ptr, bn_ptr, norm_channels(q, c, C, PRE), c_mask, HAS_WN, HAS_BN)
            a = a.to(w_ptr.dtype.element_ty)  # rounded to the GEMM's dtype once, as eager's Linear casts the norm's output
            k = (q * C + c).to(tl.int64)
            wt = tl.load(w_cols + k[:, None] * swk, mask=c_mask[:, None] & col_mask[None, :], other=0.0)
            acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)

    bias_act_store(acc, rows, cols, row_mask, col_mask, N, b_ptr, pre_ptr, out_ptr, HAS_BIAS, STORE_PRE, ACTIVATION)


@on_input_device
def merge_gemm(x, stats, wn, bn, w, b, merge, order, grid, geometry, image, norm, pre, activation, store_pre):
    """act(norm(merge(x)) @ w.T + b) for x (B, N, C) -> (M, hidden) with M = B*N/merge**2, plus
    the pre-activation on request, in ``w``'s dtype (x and the norm's ``wn``, ``bn`` may be
    float32 before a 16-bit ``w``: the norm runs in float32 and its rows are rounded to ``w``'s
    dtype). ``stats`` from ``merge_norm.merge_norm_stats``; ``w``, ``b``, ``wn``, ``bn``
    contiguous; ``grid`` (T, H, W) for dense ``"grid"`` order, ``geometry``/``image`` for packed
    grids."""
    B, N, C = x.shape
    P = N // (merge * merge)
    M, Nout = B * P, w.shape[0]
    out = torch.empty((M, Nout), device=x.device, dtype=w.dtype)
    pre_act = torch.empty((M, Nout), device=x.device, dtype=w.dtype) if store_pre else None
    if M == 0 or Nout == 0:
        return out, pre_act
    packed = geometry is not None

    merge_gemm_kernel[tile_grid(M, Nout)](
        x, stats, out if wn is None else wn, out if bn is None else bn, w, out if b is None else b, out,
        pre_act if store_pre else out, image if packed else stats, geometry if packed else stats,
        M, Nout, C, P, grid[1], grid[2], *x.stride(), *w.stride(),
        ORDER=ORDERS[order], PACKED=packed, MERGE=merge, NORM=NORMS[norm], PRE=pre,
        HAS_WN=wn is not None, HAS_BN=bn is not None, HAS_BIAS=b is not None,
        ACTIVATION=activations.CODES[activation], STORE_PRE=store_pre,
        DOT_FP32=dot_dtype_workaround(w.dtype == torch.bfloat16), INPUT_PRECISION=input_precision(w.dtype),
    )
    return out, pre_act


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K
