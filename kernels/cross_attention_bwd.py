"""Cross-attention backward, deterministic (no float atomics: the same bits on every run), except
the opt-in one-kernel schedule below.

With the forward's LSE, each (query block, key block) tile recomputes its probabilities
    P = exp(scale * Q K^T - LSE),   Pz = P o Z / (1 - p)     (Z: the forward's dropout mask, regenerated)
and the gradients follow (Delta = rowsum(dO o O), computed from O where a kernel loads its query rows:
no preprocess launch):
    dV = Pz^T dO,   dP = (dO V^T) o Z / (1 - p),   dS = P o (dP - Delta),
    dK = scale * dS^T Q,   dQ = scale * dS K.
Keys at or past ``kv_lens[b]`` are masked out of every tile (never loaded), so their dK, dV are
written as exact zeros; a batch without keys gets zero dQ (its LSE is +inf, no key is visited).
An additive mask (``HAS_BIAS``) enters S exactly as in the forward (``add_bias``), so P, and with
it every gradient, sees the same masked scores; the mask itself gets no gradient.

Two schedules, chosen by ``use_single_pass(M, D)``:

* Single pass (few queries): one program per (batch, head, key split) keeps *all* M queries' Q, dO,
  LSE, Delta and the fp32 dQ accumulator in registers and sweeps its keys once, writing each key
  block's dK and dV directly. K and V are read once, Q, dO and O (for Delta, once at the start)
  once per split, and P is recomputed once (5 matmuls per tile). With several key splits each
  writes an fp32 dQ partial and the last split to finish sums them in a fixed order (``write_dq``),
  in the same launch and without float atomics. The key splits follow the
  forward's rule (``choose_num_splits`` with B * H programs), so BLIP-2's 32 queries at batch 1 fill
  the GPU.
* FlashAttention-2 (many queries): a dQ kernel, one program per query block, loops over the key
  blocks; then a dK/dV kernel, one program per key block, loops over all query blocks. P is
  recomputed in both (7 matmuls per tile instead of 5), in exchange for bounded registers. The dQ
  kernel computes its rows' Delta from O (each row once, as a preprocess kernel would) and stores
  it for the dK/dV kernel: recomputing it there instead would read O once per key block (at Qwen-VL's
  resampler, B=16 M=256 N=1024 H=32 D=128 bf16 with 64-key blocks, 16 x 34 MB = 537 MB of O read
  instead of 34 MB once, against 16 x 0.5 MB = 8 MB of fp32 Delta read back). Only when dQ is not wanted (frozen
  queries, rare) does dK/dV recompute Delta (``DELTA_FROM_O``): O is then read once per key block,
  as Q and dO already are (mostly from L2), in exchange for the preprocess launch. The
  dK/dV kernel forms its tiles keys-major (S^T = K Q^T, dV += Pz^T dO, dK += dS^T Q with the
  transposed tiles as left operands): with exact fp32 dots (FMA) the queries-major form, which
  transposes P and dS in registers, spilled in every config.

* One kernel (opt-in, ``one_kernel=True``; FA2's case with every gradient wanted): the dK/dV
  kernel alone, with Delta from O and each tile's dS K added to an fp32 dQ buffer by float atomics
  (``DQ_ATOMIC``); the last program of a query set writes dQ. P is recomputed once (10 matmul
  FLOPs per score, as the single pass), at the price of dQ's bits changing from run to run.

Crossover: single pass while ``M <= 128`` and ``next_pow2(M) * next_pow2(D) * elem <= 8 KiB``, i.e.
for fp16/bf16 up to 64 queries at head dim 64 and 32 at head dim 80-128 (fp32: half that). There
the resident Q and dO tiles (8 KiB each) and the fp32 dQ accumulator (16 KiB) sit in registers next
to the K/V tiles and the three M x BLOCK_N fp32 score tiles. One step up (M = 128 at D = 64,
M = 64 at D = 128) every config spills on sm_90 and sm_80 (``python -m deco_ops.aot``), and the
FA2 schedule's extra QK^T recompute costs less than the spills. BLIP-2 (M = 32, D = 64) runs single
pass; Qwen-VL's resampler (M = 256, D = 128) runs FA2.

Queries shared by the batch (zero batch stride): dQ is produced per batch (and per key split) in
fp32 and summed over the batch inside the launch by the group's last program (``write_dq``: an
int32 arrival counter per group, zero-filled by the launcher, then a fixed-order sum). Float
atomics would do without the final sum but still need a zero-filled fp32 buffer (and a cast for
16-bit q), and their order, hence the bits, would change from run to run.

Counts (the benchmarks report TFLOP/s and GB/s from these):
    flops = 10 * B*H*M*N*D (single pass)  or  14 * B*H*M*N*D (FA2)
    bytes = (B*M*H*D [O for Delta] + reads of Q, dO + 2*B*N*H*D [K, V] + B*M*H*D [dQ]
             + 2*B*N*H*D [dK, dV]) * elem + B*H*M * 4 * (1 [LSE] or 3 [FA2: LSE, Delta written and read])
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._tuning import autotuned, device_arch, dot_dtype_workaround
from .arrival import last_to_arrive
from .dot import dot
from .cross_attention_fwd import (
    KV_PACKED, LOG2E, acc_dtype, add_bias, bias_args, choose_num_splits, dot_precision, dropout_keep, dropout_stream,
    int32_heads, kv_at, kv_extent, kv_mode, kv_strides, load_bias, load_rows, split_ranges,
)
from .scalars import fp32_scalar

SINGLE_PASS_MAX_M = 128
SINGLE_PASS_MAX_TILE = 4096  # BLOCK_M * BLOCK_D for 2-byte inputs; half for fp32


def one_kernel_applies(M: int, D: int, elem: int, need_dq: bool, need_dkv: bool) -> bool:
    """Whether ``cross_attention_bwd(..., one_kernel=True)`` changes anything: the FA2 schedule with
    both of its kernels (many queries, every gradient wanted)."""
    return need_dq and need_dkv and not use_single_pass(M, D, elem)


def use_single_pass(M: int, D: int, elem: int = 2) -> bool:
    """Whether one program can hold all M queries of a (batch, head) (``elem``: bytes per input
    element): see the module docstring."""
    block_m = max(16, next_power_of_2(M))
    tile = block_m * max(16, next_power_of_2(D)) * max(elem, 2) // 2
    return M <= SINGLE_PASS_MAX_M and tile <= SINGLE_PASS_MAX_TILE


# ----------------------------------------------------------------------------------------------
# shared tile math


@triton.jit
def grad_tile(q, do, lse2, delta, k, v, rows, cols, valid, seed, rng_offset, bh, M, N, qk_scale, dropout_p,
              bias_base, sbm, sbn, HAS_BIAS: tl.constexpr,
              DROPOUT: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEYS_MAJOR: tl.constexpr):
    """(Pz, dS) of one (query block, key block) tile, queries x keys, or with KEYS_MAJOR its
    transpose, keys x queries (S^T = K Q^T, as the dK/dV kernel consumes it: its dots then need no
    register transpose, which keeps the exact-fp32 FMA dots free of spills). ``valid`` masks missing
    queries and keys, shaped like the tile. ``lse2`` is LSE * log2(e), ``qk_scale`` = softmax scale *
    log2(e); dS excludes the scale. With HAS_BIAS the additive mask at ``bias_base`` (this batch and
    head; query and key strides ``sbm``, ``sbn``) is added to S as in the forward."""
    if KEYS_MAJOR:
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
        s = dot(k, tl.trans(q), zero, DOT_FP32, INPUT_PRECISION) * qk_scale
        dp = dot(v, tl.trans(do), zero, DOT_FP32, INPUT_PRECISION)
        lse2 = lse2[None, :]
        delta = delta[None, :]
        rows = rows[None, :]
        cols = cols[:, None]
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        s = dot(q, tl.trans(k), zero, DOT_FP32, INPUT_PRECISION) * qk_scale
        dp = dot(do, tl.trans(v), zero, DOT_FP32, INPUT_PRECISION)
        lse2 = lse2[:, None]
        delta = delta[:, None]
        rows = rows[:, None]
        cols = cols[None, :]
    if HAS_BIAS:
        s = add_bias(s, load_bias(bias_base, rows, cols, valid, sbm, sbn))
    p = tl.where(valid, tl.exp2(s - lse2), 0.0)
    if DROPOUT:
        keep = dropout_keep(seed, rng_offset, bh, M, N, rows, cols, dropout_p)
        inv_keep = 1.0 / (1.0 - dropout_p)
        pz = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        pz = p
    return pz, p * (dp - delta)


@triton.jit
def store_rows(base, tile, rows, row_mask, stride_row, dims, dim_mask, stride_dim):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + dims[None, :] * stride_dim
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def load_query_rows(q_base, do_base, o_base, lse_ptr, delta_ptr, bh, M, rows, row_mask, sqm, sqd, sdom, sdod, som, sod,
                    dims, dim_mask, ACC: tl.constexpr, DELTA_FROM_O: tl.constexpr):
    """Q and dO tiles of the query ``rows`` of (batch * H + head) ``bh`` (``q_base``/``do_base``/``o_base``
    already at its batch and head), with their LSE * log2(e) and Delta = rowsum(dO o O): computed here
    from the forward's O with DELTA_FROM_O (one more read of O's rows, no preprocess launch), else
    read from ``delta_ptr``, where the dQ kernel stored it."""
    q = load_rows(q_base, rows, row_mask, sqm, dims, dim_mask, sqd)
    do = load_rows(do_base, rows, row_mask, sdom, dims, dim_mask, sdod)
    offs = bh.to(tl.int64) * M + rows
    lse2 = tl.load(lse_ptr + offs, mask=row_mask, other=0.0) * 1.4426950408889634
    if DELTA_FROM_O:
        o = load_rows(o_base, rows, row_mask, som, dims, dim_mask, sod)
        delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    else:
        delta = tl.load(delta_ptr + offs, mask=row_mask, other=0.0)
    return q, do, lse2, delta


@triton.jit
def write_dq(dq, dq_ptr, dq_part_ptr, count_ptr, b, h, H, dq_batches, split, splits, block, blocks,
             sdqs, sdqb, sdqm, sdqh, sdqd, rows, row_mask, dims, dim_mask):
    """Writes the fp32 ``dq`` of batch ``b``, head ``h``, key split ``split`` of ``splits``, query
    block ``block`` of ``blocks`` to dq_ptr at batch b // dq_batches (0 when the batch shares the
    queries): directly when it is the only program of its group (the dq_batches batches sharing the
    queries, times the splits), else summed over the group inside this launch, without float
    atomics (a runtime branch: one binary serves both, ``dq_batches`` is not specialised). Each
    program of a group stores its partial (dq_part_ptr + split * sdqs + b * sdqb; rows, heads and
    dims as dq_ptr), then counts itself in (one int32 counter per group and query block, acquire-release at GPU scope);
    the last to arrive sums the group's partials in a fixed order (batch, then split) and writes dQ,
    so the bits never depend on which program finished last."""
    group = b // dq_batches
    dq_rows = dq_ptr + group.to(tl.int64) * sdqb + h * sdqh
    members = dq_batches * splits
    if members > 1:
        part_head = dq_part_ptr + h * sdqh
        store_rows(part_head + tl.cast(split, tl.int64) * sdqs + b.to(tl.int64) * sdqb, dq, rows, row_mask, sdqm, dims,
                   dim_mask, sdqd)
        if last_to_arrive(count_ptr + (group * H + h) * blocks + block, members):
            total = tl.zeros_like(dq)
            offs = rows.to(tl.int64)[:, None] * sdqm + dims[None, :] * sdqd
            for i in range(members):
                batch, key_split = group * dq_batches + i // splits, i % splits
                member = tl.cast(batch, tl.int64) * sdqb + tl.cast(key_split, tl.int64) * sdqs
                total += tl.load(part_head + member + offs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
                                 cache_modifier=".cg")
            store_rows(dq_rows, total, rows, row_mask, sdqm, dims, dim_mask, sdqd)
    else:
        store_rows(dq_rows, dq, rows, row_mask, sdqm, dims, dim_mask, sdqd)


# ----------------------------------------------------------------------------------------------
# single pass


def single_pass_cuda_configs() -> list[triton.Config]:
    """BLOCK_M is all queries (set by the launcher); the key block and pipelining are tuned.
    Key blocks of 64 take 8 warps: with 4 (or with 128-key blocks) the resident Q/dO/dQ tiles spill."""
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(32, 4, 2), (32, 8, 3), (64, 8, 2), (32, 8, 2)]
    ]


SINGLE_PASS_INTERPRET_CONFIG = triton.Config({"BLOCK_N": 32})


def single_pass_fits(config: triton.Config, block_m: int, block_d: int, elem_bytes: int, dropout: bool,
                     arch: int) -> bool:
    """Whether ``config`` compiles without spills (measured by ``python -m deco_ops.aot`` with
    triton 3.6 and 3.9). fp32 inputs, exact or tf32, take 32-key blocks on 8 warps and 3 stages.
    Dropout regenerates the Philox mask inside the loop: every input width then takes 32-key blocks
    on 8 warps and 2 stages (with 16-bit 64x64 resident tiles on sm_80 at 255 registers: it spilled
    8 B while Delta was read from a preprocess kernel's buffer, and compiles clean since Delta is
    computed at the program's start). Otherwise, on sm_80 the 64-key block spills once the resident query tiles
    reach 64x64 (Hopper's wgmma keeps its accumulators in fewer registers and runs it clean)."""
    bn, warps, stages = config.kwargs["BLOCK_N"], config.num_warps, config.num_stages
    if dropout or elem_bytes == 4:
        return (bn, warps, stages) == (32, 8, 2 if dropout else 3)
    return not (arch < 90 and bn >= 64 and block_m * block_d >= 64 * 64)


def _single_pass_prune(configs, named_args, **constexprs):
    q = named_args["q_ptr"]
    return [c for c in configs if single_pass_fits(c, constexprs["BLOCK_M"], constexprs["BLOCK_D"], q.element_size(),
                                                   constexprs["DROPOUT"], device_arch(q.device))]


@autotuned(
    single_pass_cuda_configs(), SINGLE_PASS_INTERPRET_CONFIG,
    key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "INPUT_PRECISION"], buckets=("M", "N"),
    prune=_single_pass_prune,
)
@triton.jit(do_not_specialize=["dq_batches"])
def cross_attention_bwd_single_pass_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, dq_ptr, dq_part_ptr, count_ptr, dk_ptr, dv_ptr, lens_ptr, cu_ptr,
    rng_ptr, bias_ptr,
    H, M, N, D, keys_per_split, dq_batches,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sob, som, soh, sod,
    sbb, sbh, sbm, sbn, sdqs, sdqb, sdqm, sdqh, sdqd, sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, splits). Delta comes from O at the start (all rows are resident). dQ goes to
    dq_ptr (+ batch // dq_batches, row, head, dim), written directly, or summed in this launch over
    the dq_batches batches sharing the queries and the splits (fp32 partial of split s, batch b at
    dq_part_ptr + s * sdqs + b * sdqb; one int32 counter per group at count_ptr)."""
    qk_scale, scale, dropout_p = fp32_scalar(qk_scale), fp32_scalar(scale), fp32_scalar(dropout_p)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q, do, lse2, delta = load_query_rows(
        q_ptr + b64 * sqb + h * sqh, do_ptr + b64 * sdob + h * sdoh, o_ptr + b64 * sob + h * soh, lse_ptr, lse_ptr,
        bh, M, rows, row_mask, sqm, sqd, sdom, sdod, som, sod, dims, dim_mask, ACC, True)

    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    k_base = k_ptr + b64 * skb + kv_start * skn + h * skh
    v_base = v_ptr + b64 * svb + kv_start * svn + h * svh
    dk_base = dk_ptr + b64 * sdkb + kv_start * sdkn + h * sdkh
    dv_base = dv_ptr + b64 * sdvb + kv_start * sdvn + h * sdvh
    bias_base = bias_ptr + b64 * sbb + h.to(tl.int64) * sbh
    lo = split.to(tl.int64) * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len)
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        k = load_rows(k_base, cols, col_mask, skn, dims, dim_mask, skd)
        v = load_rows(v_base, cols, col_mask, svn, dims, dim_mask, svd)
        pz, ds = grad_tile(q, do, lse2, delta, k, v, rows, cols, row_mask[:, None] & col_mask[None, :],
                           seed, rng_offset, bh, M, N, qk_scale, dropout_p, bias_base, sbm, sbn, HAS_BIAS,
                           DROPOUT, ACC, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, False)
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        dv = dot(tl.trans(pz).to(do.dtype), do, zero, DOT_FP32, INPUT_PRECISION)
        dk = dot(tl.trans(ds).to(q.dtype), q, zero, DOT_FP32, INPUT_PRECISION) * scale
        dq = dot(ds.to(k.dtype), k, dq, DOT_FP32, INPUT_PRECISION)
        store_rows(dk_base, dk, cols, col_mask, sdkn, dims, dim_mask, sdkd)
        store_rows(dv_base, dv, cols, col_mask, sdvn, dims, dim_mask, sdvd)

    # Keys this batch owns past kv_lens[b] (padding) get exact zeros; packed batches own none.
    owned = N if KV_MODE != 2 else kv_len
    zero_hi = tl.minimum(lo + keys_per_split, owned)
    for start in range(tl.maximum(lo, kv_len), zero_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < zero_hi
        zero = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        store_rows(dk_base, zero, cols, col_mask, sdkn, dims, dim_mask, sdkd)
        store_rows(dv_base, zero, cols, col_mask, sdvn, dims, dim_mask, sdvd)

    write_dq(dq * scale, dq_ptr, dq_part_ptr, count_ptr, b, h, H, dq_batches, split, tl.num_programs(1), 0, 1,
             sdqs, sdqb, sdqm, sdqh, sdqd, rows, row_mask, dims, dim_mask)


# ----------------------------------------------------------------------------------------------
# FlashAttention-2 schedule


def fa2_cuda_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 8, 2), (32, 32, 8, 2),
            (32, 64, 8, 2), (16, 64, 8, 2), (16, 16, 4, 2),
        ]
    ]


FA2_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})
FA2_SMALLEST_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in [*fa2_cuda_configs(), FA2_INTERPRET_CONFIG])  # most dQ counters


def fa2_fits(kernel: str, config: triton.Config, elem_bytes: int, dropout: bool, block_d: int, arch: int,
             delta_from_o: bool = False, bias: bool = False) -> bool:
    """Whether ``config`` compiles without register spills for the dK/dV (``kernel="dkdv"``) or
    dQ (``"dq"``) kernel, or the dK/dV kernel's one-kernel schedule (``"one_kernel"``: Delta from O,
    and each tile's fp32 dS K partial beside the dK, dV accumulators), as measured with ``python -m deco_ops.aot`` on sm_80 and sm_90 at head
    dims 64 and 128, with triton 3.6 and 3.9.

    dK/dV keeps two BLOCK_N x D accumulators: 16-bit inputs fit 64 keys x 64 queries on 8 warps
    (not when it also computes Delta from O, ``delta_from_o``: 44-108 B of spills), 64 x 32 on 4
    (with ``delta_from_o`` only on sm_90: 12 B on sm_80 under triton 3.6), and 32 x 32 on 8 warps,
    the only one left with dropout's in-loop Philox mask; fp32 (exact or tf32) fits 32 x 32 on 8
    warps. dQ keeps one (and, since it computes Delta and may sum the batch's dQ partials, a little
    more): 16-bit inputs fit up to 64 queries x 128 keys on Hopper's wgmma, 32 queries elsewhere,
    and with dropout 32 x 32 on 8 warps (32 x 64 on 4 spills 8-24 B); fp32 fits 32 x 32 queries x
    keys on 8 warps (32 x 64 too on sm_90), and with dropout 16 x 64 on 8 warps at head dim 64,
    16 x 16 on 4 warps above (with tf32 the 16 x 64 tile spills 8 B at head dim 128 since B*H moved
    to grid axis 0; above 128 it needs more shared memory than an A100 has). The one-kernel schedule
    (8 warps throughout) fits 16-bit inputs at 16 x 64 queries x keys, 32 x 64 without dropout and
    32 x 32 on sm_90 up to head dim 64 (on sm_80 triton 3.6 spills it at head dim 128, and on sm_90
    8 B at head dim 128 since the last program zeroes the dQ sums it read); fp32 at 32 x 32 on sm_90 and
    16 x 64 below (each spills on the other arch under triton 3.6), with dropout only at 16 x 16 on
    4 warps (tf32 at head dim 128 spills every larger tile on sm_90).

    An additive mask (``bias``), compiled apart from dropout and kv_lens (``--full``): with 16-bit
    inputs above head dim 64 the dK/dV kernel's 64 x 32 tile on 4 warps spills 8-36 B on both
    targets, and on sm_90 dQ keeps 64 x 64 on 4 warps only (64 x 128 on 8 warps spills 84-296 B
    under triton 3.9, 32 x 128 on 4 warps 28-68 B under both); at head dim 64 dQ leaves 64 x 128 out."""
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
    if kernel == "one_kernel":
        if elem_bytes == 4:
            return tile == ((16, 16, 4) if dropout else (32, 32, 8) if arch >= 90 else (16, 64, 8))
        return tile == (16, 64, 8) or (tile == (32, 64, 8) and not dropout) or (tile == (32, 32, 8) and arch >= 90 and block_d <= 64)
    if kernel == "dkdv":
        if elem_bytes == 4:
            return tile == (32, 32, 8)
        if dropout:
            return tile == (32, 32, 8)
        return tile == (32, 32, 8) or (tile == (32, 64, 4) and (arch >= 90 or not delta_from_o) and not (bias and block_d > 64)) \
            or (tile == (64, 64, 8) and not delta_from_o)
    if elem_bytes == 4:
        if dropout:
            return tile == ((16, 64, 8) if block_d <= 64 else (16, 16, 4))
        return tile == (32, 32, 8) or (tile == (32, 64, 8) and arch >= 90)
    if dropout:
        return tile == (32, 32, 8)
    if arch >= 90:
        if bias:
            return tile == (64, 64, 4) or (tile == (32, 128, 4) and block_d <= 64)
        return tile in ((64, 128, 8), (64, 64, 4), (32, 128, 4))
    return tile in ((32, 64, 4), (32, 128, 4))


def _fa2_prune(kernel: str):
    def prune(configs, named_args, **constexprs):
        q = named_args["q_ptr"]
        fits_as = "one_kernel" if constexprs.get("DQ_ATOMIC", False) else kernel
        return [c for c in configs if fa2_fits(fits_as, c, q.element_size(), constexprs["DROPOUT"], constexprs["BLOCK_D"],
                                               device_arch(q.device), constexprs.get("DELTA_FROM_O", False),
                                               constexprs["HAS_BIAS"])]
    return prune


@triton.jit
def write_dq_accumulated(dq_acc_ptr, dq_ptr, counter, base, M, members, sdqm, sdqd, dims, dim_mask, BLOCK_M: tl.constexpr):
    """The one-kernel schedule's dQ: each of the ``members`` programs adding into the fp32 rows at
    ``base`` (a query set and head) counts itself in at ``counter`` once its atomics are issued;
    the last to arrive reads the sums, writes them to dq_ptr in its dtype and zeroes the rows it
    read, so that a launch repeated on the same buffers (the autotuner's timing) adds from zero, as
    its counter starts a new generation (``arrival``)."""
    if last_to_arrive(counter, members):
        for start_m in range(0, M, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            offs = rows.to(tl.int64)[:, None] * sdqm + dims[None, :] * sdqd
            mask = row_mask[:, None] & dim_mask[None, :]
            total = tl.load(dq_acc_ptr + base + offs, mask=mask, other=0.0, cache_modifier=".cg")
            store_rows(dq_ptr + base, total, rows, row_mask, sdqm, dims, dim_mask, sdqd)
            tl.store(dq_acc_ptr + base + offs, tl.zeros_like(total), mask=mask)


@autotuned(fa2_cuda_configs(), FA2_INTERPRET_CONFIG,
           key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "DELTA_FROM_O", "DQ_ATOMIC", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_fa2_prune("dkdv"))
@triton.jit(do_not_specialize=["dq_batches"])
def cross_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, dq_ptr, count_ptr,
    lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D, dq_batches,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sob, som, soh, sod,
    sbb, sbh, sbm, sbn, sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd, sdqb, sdqm, sdqh, sdqd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, DELTA_FROM_O: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(N / BLOCK_N)): one key block's dK, dV, looping over every query block.
    Delta is read from delta_ptr (stored by the dQ kernel, launched first), or with DELTA_FROM_O
    (no dQ kernel) recomputed from O for every query block: O read once per key block.

    DQ_ATOMIC (with DELTA_FROM_O; the one-kernel schedule): the tile's dQ contribution dS K is
    added to an fp32 accumulator (dq_acc_ptr, zero-filled, laid out as dq_ptr) with float atomics,
    so no second kernel recomputes P; the last of the dq_batches * key-block programs of a (query
    set, head) to finish (an int32 counter at count_ptr, acquire-release) writes dQ in q's dtype.
    The atomics' order, hence dQ's last bits, changes from run to run."""
    qk_scale, scale, dropout_p = fp32_scalar(qk_scale), fp32_scalar(scale), fp32_scalar(dropout_p)
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < kv_len
    k = load_rows(k_ptr + b64 * skb + kv_start * skn + h * skh, cols, col_mask, skn, dims, dim_mask, skd)
    v = load_rows(v_ptr + b64 * svb + kv_start * svn + h * svh, cols, col_mask, svn, dims, dim_mask, svd)
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)
    bias_base = bias_ptr + b64 * sbb + h.to(tl.int64) * sbh

    q_base = q_ptr + b64 * sqb + h * sqh
    do_base = do_ptr + b64 * sdob + h * sdoh
    o_base = o_ptr + b64 * sob + h * soh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    m_end = tl.where(tl.program_id(1) * BLOCK_N < kv_len, M, 0)
    for start_m in range(0, m_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        q, do, lse2, delta = load_query_rows(q_base, do_base, o_base, lse_ptr, delta_ptr, bh, M, rows, row_mask,
                                             sqm, sqd, sdom, sdod, som, sod, dims, dim_mask, ACC, DELTA_FROM_O)
        pz_t, ds_t = grad_tile(q, do, lse2, delta, k, v, rows, cols, col_mask[:, None] & row_mask[None, :],
                               seed, rng_offset, bh, M, N, qk_scale, dropout_p, bias_base, sbm, sbn, HAS_BIAS,
                               DROPOUT, ACC, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, True)
        dv = dot(pz_t.to(do.dtype), do, dv, DOT_FP32, INPUT_PRECISION)
        dk = dot(ds_t.to(q.dtype), q, dk, DOT_FP32, INPUT_PRECISION)
        if DQ_ATOMIC:
            dq = dot(tl.trans(ds_t.to(k.dtype)), k, tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC), DOT_FP32, INPUT_PRECISION)
            offs = rows.to(tl.int64)[:, None] * sdqm + dims[None, :] * sdqd
            # the query set's rows, computed here: hoisted above the loop it spills on sm_90 (bf16, D128)
            tl.atomic_add(dq_acc_ptr + (b // dq_batches).to(tl.int64) * sdqb + h * sdqh + offs, dq * scale,
                          mask=row_mask[:, None] & dim_mask[None, :], sem="relaxed")

    # Written for every key the batch owns: zeros past kv_lens[b]; packed batches own kv_len rows.
    owned = cols < (N if KV_MODE != 2 else kv_len)
    store_rows(dk_ptr + b64 * sdkb + kv_start * sdkn + h * sdkh, dk * scale, cols, owned, sdkn, dims, dim_mask, sdkd)
    store_rows(dv_ptr + b64 * sdvb + kv_start * sdvn + h * sdvh, dv, cols, owned, sdvn, dims, dim_mask, sdvd)
    if DQ_ATOMIC:
        group = b // dq_batches
        write_dq_accumulated(dq_acc_ptr, dq_ptr, count_ptr + group * H + h, group.to(tl.int64) * sdqb + h * sdqh, M,
                             dq_batches * tl.num_programs(1), sdqm, sdqd, dims, dim_mask, BLOCK_M)



@autotuned(fa2_cuda_configs(), FA2_INTERPRET_CONFIG, key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_fa2_prune("dq"))
@triton.jit(do_not_specialize=["dq_batches"])
def cross_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, delta_ptr, dq_ptr, dq_part_ptr, count_ptr, lens_ptr, cu_ptr, rng_ptr,
    bias_ptr,
    H, M, N, D, dq_batches,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sob, som, soh, sod,
    sbb, sbh, sbm, sbn, sdqb, sdqm, sdqh, sdqd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(M / BLOCK_M)): one query block's dQ, looping over the keys. Computes its
    rows' Delta from O and stores it to delta_ptr for the dK/dV kernel launched after it. dQ goes
    to dq_ptr directly, or (queries shared by the dq_batches batches) summed in this launch over
    the batch: fp32 partial of batch b at dq_part_ptr + b * sdqb, one int32 counter per (head,
    query block) at count_ptr."""
    qk_scale, scale, dropout_p = fp32_scalar(qk_scale), fp32_scalar(scale), fp32_scalar(dropout_p)
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q, do, lse2, delta = load_query_rows(
        q_ptr + b64 * sqb + h * sqh, do_ptr + b64 * sdob + h * sdoh, o_ptr + b64 * sob + h * soh, lse_ptr, delta_ptr,
        bh, M, rows, row_mask, sqm, sqd, sdom, sdod, som, sod, dims, dim_mask, ACC, True)
    tl.store(delta_ptr + bh.to(tl.int64) * M + rows, delta, mask=row_mask)
    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    k_base = k_ptr + b64 * skb + kv_start * skn + h * skh
    v_base = v_ptr + b64 * svb + kv_start * svn + h * svh
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)
    bias_base = bias_ptr + b64 * sbb + h.to(tl.int64) * sbh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(0, kv_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < kv_len
        k = load_rows(k_base, cols, col_mask, skn, dims, dim_mask, skd)
        v = load_rows(v_base, cols, col_mask, svn, dims, dim_mask, svd)
        _, ds = grad_tile(q, do, lse2, delta, k, v, rows, cols, row_mask[:, None] & col_mask[None, :],
                          seed, rng_offset, bh, M, N, qk_scale, dropout_p, bias_base, sbm, sbn, HAS_BIAS,
                          DROPOUT, ACC, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, False)
        dq = dot(ds.to(k.dtype), k, dq, DOT_FP32, INPUT_PRECISION)
    write_dq(dq * scale, dq_ptr, dq_part_ptr, count_ptr, b, h, H, dq_batches, 0, 1, tl.program_id(1), tl.num_programs(1),
             0, sdqb, sdqm, sdqh, sdqd, rows, row_mask, dims, dim_mask)


# ----------------------------------------------------------------------------------------------
# launcher


@on_input_device
def cross_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    B: int,
    N: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    need_dq: bool = True,
    need_dkv: bool = True,
    bias: torch.Tensor | None = None,
    num_splits: int | None = None,
    one_kernel: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq shaped like q, dk, dv shaped like k, v), None for a gradient not asked for (only the
    FA2 schedule can skip work; the single pass always computes all three).

    Layouts and arguments as ``cross_attention_fwd``; ``dout`` is (B, M, H, D) and ``out``/``lse``
    are the forward's outputs; ``bias`` the forward's additive mask. ``num_splits`` overrides the
    single pass's key-split heuristic. ``one_kernel``: where the FA2 schedule would run both of
    its kernels, the one-kernel schedule instead (dQ by float atomics inside the dK/dV kernel:
    not bitwise reproducible; see ``one_kernel_applies``).
    """
    dout, q, k, v = int32_heads(dout, q, k, v)
    _, M, H, D = q.shape
    if B == 0:
        dkv = (torch.zeros_like(k), torch.zeros_like(v)) if need_dkv else (None, None)
        return (torch.zeros_like(q) if need_dq else None), *dkv
    shared = q.shape[0] == 1 and B > 1
    stat_dtype = lse.dtype
    ACC = acc_dtype(q.dtype)
    BLOCK_D = max(16, next_power_of_2(D))
    mode = kv_mode(kv_lens, cu_seqlens_k)
    aux = dict(
        KV_MODE=mode, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, ACC=ACC,
        DOT_FP32=dot_dtype_workaround(q.dtype == torch.bfloat16), INPUT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=BLOCK_D,
    )
    bias_ptr, *bias_strides = bias_args(bias, lse)
    extras = (kv_lens if kv_lens is not None else lse, cu_seqlens_k if cu_seqlens_k is not None else lse,
              rng if rng is not None else lse, bias_ptr)
    sqb = 0 if q.shape[0] == 1 else q.stride(0)
    in_strides = (sqb, *q.stride()[1:], *kv_strides(k), *kv_strides(v), *dout.stride(), *out.stride(), *bias_strides)
    scales = (scale * LOG2E, scale, dropout_p)
    dq_batches = B if shared else 1

    # Gradients are contiguous (as the op's fake implementation says). Packed keys: rows outside
    # every sequence must read as zero gradient, and no program owns them.
    def new_kv(t):
        return (torch.zeros if mode == KV_PACKED else torch.empty)(t.shape, device=t.device, dtype=t.dtype)

    def new_dq(splits: int, blocks: int):
        """(dq, fp32 partials (splits, B, M, H, D), zeroed int32 counters (per query set, head and
        one of ``blocks`` query blocks), the partials' strides): the kernels sum the partials
        themselves where key splits or a shared query set give a dQ row more than one program;
        otherwise dQ is written directly and the two buffers are empty."""
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        if splits == 1 and not shared:
            return dq, lse.new_empty((0,)), torch.empty((0,), device=q.device, dtype=torch.int32), (0, *dq.stride())
        part = torch.empty((splits, B, M, H, D), device=q.device, dtype=stat_dtype)
        count = torch.zeros(B // dq_batches * H * blocks, device=q.device, dtype=torch.int32)
        return dq, part, count, part.stride()

    if use_single_pass(M, D, q.element_size()):
        if num_splits is None:
            num_splits = choose_num_splits(B * H, N, q.device)
        keys_per_split, num_splits = split_ranges(N, num_splits)
        dk, dv = new_kv(k), new_kv(v)
        dq, dq_part, count, dq_strides = new_dq(num_splits, 1)
        cross_attention_bwd_single_pass_kernel[(B * H, num_splits)](
            q, k, v, dout, out, lse, dq, dq_part, count, dk, dv, *extras,
            H, M, N, D, keys_per_split, dq_batches, *in_strides, *dq_strides, *kv_strides(dk), *kv_strides(dv), *scales,
            BLOCK_M=max(16, next_power_of_2(M)), **aux,
        )
        return (dq if need_dq else None), (dk if need_dkv else None), (dv if need_dkv else None)

    # The dQ kernel runs first and leaves Delta for the dK/dV kernel; without it, dK/dV computes
    # Delta itself (frozen queries, or the one-kernel schedule, which also adds up dQ).
    dq = dk = dv = None
    delta = torch.empty((B, H, M), device=q.device, dtype=stat_dtype)
    atomic = one_kernel and need_dq and need_dkv
    if atomic:
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=stat_dtype)
        count = torch.zeros(q.shape[0] * H, device=q.device, dtype=torch.int32)
    elif need_dq:
        dq, dq_part, count, dq_strides = new_dq(1, cdiv(M, FA2_SMALLEST_BLOCK_M))
        cross_attention_bwd_dq_kernel[lambda meta: (B * H, cdiv(M, meta["BLOCK_M"]))](
            q, k, v, dout, out, lse, delta, dq, dq_part, count, *extras,
            H, M, N, D, dq_batches, *in_strides, *dq_strides[1:], *scales, **aux,
        )
    if need_dkv:
        dk, dv = new_kv(k), new_kv(v)
        dq_args = (dq_acc, dq, count) if atomic else (lse, lse, lse)  # unused pointers: any tensor
        cross_attention_bwd_dkdv_kernel[lambda meta: (B * H, cdiv(N, meta["BLOCK_N"]))](
            q, k, v, dout, out, lse, delta, dk, dv, *dq_args, *extras,
            H, M, N, D, dq_batches, *in_strides, *kv_strides(dk), *kv_strides(dv), *(dq if atomic else q).stride(), *scales,
            DELTA_FROM_O=atomic or not need_dq, DQ_ATOMIC=atomic, **aux,
        )
    return dq, dk, dv


def flops(B: int, H: int, M: int, N: int, D: int, elem: int = 2) -> int:
    """Matmul FLOPs of the backward under the schedule ``use_single_pass`` picks."""
    return (10 if use_single_pass(M, D, elem) else 14) * B * H * M * N * D


def bytes_moved(B: int, H: int, M: int, N: int, D: int, elem: int, shared_q: bool = False) -> int:
    """Fewest bytes the backward moves: O read for Delta; Q, dO, K, V read by the gradient kernels
    (FA2 reads K, V twice: once per kernel); dQ, dK, dV written; fp32 LSE (and FA2's Delta, stored
    by its dQ kernel and read by its dK/dV kernel)."""
    q_rows = M if shared_q else B * M
    single_pass = use_single_pass(M, D, elem)
    kv_passes = 2 if single_pass else 4
    tensors = B * M * H * D + (q_rows + B * M) * H * D + kv_passes * B * N * H * D + q_rows * H * D + 2 * B * N * H * D
    return tensors * elem + (1 if single_pass else 3) * B * H * M * 4
