"""Cross-attention backward, deterministic (no float atomics: the same bits on every run).

With the forward's LSE, each (query block, key block) tile recomputes its probabilities
    P = exp(scale * Q K^T - LSE),   Pz = P o Z / (1 - p)     (Z: the forward's dropout mask, regenerated)
and the gradients follow (Delta = rowsum(dO o O), computed once by a preprocess kernel):
    dV = Pz^T dO,   dP = (dO V^T) o Z / (1 - p),   dS = P o (dP - Delta),
    dK = scale * dS^T Q,   dQ = scale * dS K.
Keys at or past ``kv_lens[b]`` are masked out of every tile (never loaded), so their dK, dV are
written as exact zeros; a batch without keys gets zero dQ (its LSE is +inf, no key is visited).
An additive mask (``HAS_BIAS``) enters S exactly as in the forward (``add_bias``), so P, and with
it every gradient, sees the same masked scores; the mask itself gets no gradient.

Two schedules, chosen by ``use_single_pass(M, D)``:

* Single pass (few queries): one program per (batch, head, key split) keeps *all* M queries' Q, dO,
  LSE, Delta and the fp32 dQ accumulator in registers and sweeps its keys once, writing each key
  block's dK and dV directly. K and V are read once, Q and dO once per split, and P is recomputed
  once (5 matmuls per tile). Each key split writes its own fp32 dQ partial; the launcher's caller
  sums the partials in a fixed order (``torch.sum``), never with atomics. The key splits follow the
  forward's rule (``choose_num_splits`` with B * H programs), so BLIP-2's 32 queries at batch 1 fill
  the GPU.
* FlashAttention-2 (many queries): a dK/dV kernel, one program per key block, loops over all query
  blocks; a separate dQ kernel, one program per query block, loops over the key blocks. P is
  recomputed in both (7 matmuls per tile instead of 5), in exchange for bounded registers. The
  dK/dV kernel forms its tiles keys-major (S^T = K Q^T, dV += Pz^T dO, dK += dS^T Q with the
  transposed tiles as left operands): with exact fp32 dots (FMA) the queries-major form, which
  transposes P and dS in registers, spilled in every config.

Crossover: single pass while ``M <= 128`` and ``next_pow2(M) * next_pow2(D) * elem <= 8 KiB``, i.e.
for fp16/bf16 up to 64 queries at head dim 64 and 32 at head dim 80-128 (fp32: half that). There
the resident Q and dO tiles (8 KiB each) and the fp32 dQ accumulator (16 KiB) sit in registers next
to the K/V tiles and the three M x BLOCK_N fp32 score tiles. One step up (M = 128 at D = 64,
M = 64 at D = 128) every config spills on sm_90 and sm_80 (``python -m deco_ops.aot``), and the
FA2 schedule's extra QK^T recompute costs less than the spills. BLIP-2 (M = 32, D = 64) runs single
pass; Qwen-VL's resampler (M = 256, D = 128) runs FA2.

Queries shared by the batch (zero batch stride): dQ is produced per batch (and per key split) in
fp32 and reduced over the batch by the caller's deterministic ``torch.sum``.

Counts (the benchmarks report TFLOP/s and GB/s from these):
    flops = 10 * B*H*M*N*D (single pass)  or  14 * B*H*M*N*D (FA2)
    bytes = (2*B*M*H*D [O, dO for Delta] + reads of Q, dO + 2*B*N*H*D [K, V] + B*M*H*D [dQ]
             + 2*B*N*H*D [dK, dV]) * elem + B*H*M * 4 * 3 [LSE, Delta written and read]
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._tuning import autotuned, device_arch, dot_dtype_workaround
from .dot import dot
from .cross_attention_fwd import (
    KV_PACKED, LOG2E, acc_dtype, add_bias, bias_args, choose_num_splits, dot_precision, dropout_keep, dropout_stream,
    kv_extent, kv_mode, kv_strides, load_bias, load_rows, split_ranges,
)

SINGLE_PASS_MAX_M = 128
SINGLE_PASS_MAX_TILE = 4096  # BLOCK_M * BLOCK_D for 2-byte inputs; half for fp32


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
def load_query_rows(q_base, do_base, lse_ptr, delta_ptr, bh, M, rows, row_mask, sqm, sqd, sdom, sdod, dims, dim_mask):
    """Q and dO tiles of the query ``rows`` of (batch * H + head) ``bh`` (``q_base``/``do_base``
    already at its batch and head), with their LSE * log2(e) and Delta."""
    q = load_rows(q_base, rows, row_mask, sqm, dims, dim_mask, sqd)
    do = load_rows(do_base, rows, row_mask, sdom, dims, dim_mask, sdod)
    offs = bh.to(tl.int64) * M + rows
    lse2 = tl.load(lse_ptr + offs, mask=row_mask, other=0.0) * 1.4426950408889634
    return q, do, lse2, tl.load(delta_ptr + offs, mask=row_mask, other=0.0)


# ----------------------------------------------------------------------------------------------
# Delta = rowsum(dO o O)


def preprocess_cuda_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in [(32, 4), (64, 4), (128, 8)]]


PREPROCESS_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32})


@autotuned(preprocess_cuda_configs(), PREPROCESS_INTERPRET_CONFIG, key=["M", "BLOCK_D"], buckets=("M",))
@triton.jit
def cross_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, H, M, D,
    sob, som, soh, sod, sdob, sdom, sdoh, sdod,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(M / BLOCK_M)): Delta (B, H, M) = rowsum(dO o O) in the accumulator dtype."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    o = load_rows(o_ptr + b * sob + h * soh, rows, row_mask, som, dims, dim_mask, sod).to(ACC)
    do = load_rows(do_ptr + b * sdob + h * sdoh, rows, row_mask, sdom, dims, dim_mask, sdod).to(ACC)
    tl.store(delta_ptr + bh.to(tl.int64) * M + rows, tl.sum(o * do, 1), mask=row_mask)


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
    on 8 warps and 2 stages. Otherwise, on sm_80 the 64-key block spills once the resident query tiles
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
@triton.jit
def cross_attention_bwd_single_pass_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D, keys_per_split,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sbb, sbh, sbm, sbn,
    sdqs, sdqb, sdqm, sdqh, sdqd, sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, splits). dQ partial of split s goes to dq_ptr + s * sdqs (+ batch, row, head, dim)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H

    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q, do, lse2, delta = load_query_rows(q_ptr + b64 * sqb + h * sqh, do_ptr + b64 * sdob + h * sdoh, lse_ptr,
                                         delta_ptr, bh, M, rows, row_mask, sqm, sqd, sdom, sdod, dims, dim_mask)

    kv_start, kv_len = kv_extent(b, lens_ptr, cu_ptr, N, KV_MODE)
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

    dq_base = dq_ptr + split.to(tl.int64) * sdqs + b64 * sdqb + h * sdqh
    store_rows(dq_base, dq * scale, rows, row_mask, sdqm, dims, dim_mask, sdqd)


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


def fa2_fits(kernel: str, config: triton.Config, elem_bytes: int, dropout: bool, block_d: int, arch: int) -> bool:
    """Whether ``config`` compiles without register spills for the dK/dV (``kernel="dkdv"``) or
    dQ (``"dq"``) kernel, as measured with ``python -m deco_ops.aot`` on sm_80 and sm_90 at head
    dims 64 and 128, with triton 3.6 and 3.9.

    dK/dV keeps two BLOCK_N x D accumulators: 16-bit inputs fit 64 keys x 64 queries on 8 warps,
    64 x 32 on 4, and 32 x 32 on 8 warps, the only one left with dropout's in-loop Philox mask;
    fp32 (exact or tf32) fits 32 x 32 on 8 warps. dQ keeps one: 16-bit inputs fit up to 64 queries
    x 128 keys on Hopper's wgmma, 32 queries elsewhere, and with dropout 32 x 64 on 4 warps or
    32 x 32 on 8; fp32 fits 32 queries on 8 warps, and with dropout 16 x 64 on 8 warps at head dim
    64, 16 x 16 on 4 warps above (with tf32 the 16 x 64 tile spills 8 B at head dim 128 since B*H
    moved to grid axis 0; above 128 it needs more shared memory than an A100 has)."""
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
    if kernel == "dkdv":
        if elem_bytes == 4:
            return tile == (32, 32, 8)
        return tile == (32, 32, 8) or (tile in ((32, 64, 4), (64, 64, 8)) and not dropout)
    if elem_bytes == 4:
        if dropout:
            return tile == ((16, 64, 8) if block_d <= 64 else (16, 16, 4))
        return tile in ((32, 32, 8), (32, 64, 8))
    if dropout:
        return tile in ((32, 64, 4), (32, 32, 8))
    if arch >= 90:
        return tile in ((64, 128, 8), (64, 64, 4), (32, 128, 4))
    return tile in ((32, 64, 4), (32, 128, 4))


def _fa2_prune(kernel: str):
    def prune(configs, named_args, **constexprs):
        q = named_args["q_ptr"]
        return [c for c in configs
                if fa2_fits(kernel, c, q.element_size(), constexprs["DROPOUT"], constexprs["BLOCK_D"], device_arch(q.device))]
    return prune


@autotuned(fa2_cuda_configs(), FA2_INTERPRET_CONFIG, key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_fa2_prune("dkdv"))
@triton.jit
def cross_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sbb, sbh, sbm, sbn,
    sdkb, sdkn, sdkh, sdkd, sdvb, sdvn, sdvh, sdvd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(N / BLOCK_N)): one key block's dK, dV, looping over every query block."""
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    kv_start, kv_len = kv_extent(b, lens_ptr, cu_ptr, N, KV_MODE)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < kv_len
    k = load_rows(k_ptr + b64 * skb + kv_start * skn + h * skh, cols, col_mask, skn, dims, dim_mask, skd)
    v = load_rows(v_ptr + b64 * svb + kv_start * svn + h * svh, cols, col_mask, svn, dims, dim_mask, svd)
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)
    bias_base = bias_ptr + b64 * sbb + h.to(tl.int64) * sbh

    q_base = q_ptr + b64 * sqb + h * sqh
    do_base = do_ptr + b64 * sdob + h * sdoh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    m_end = tl.where(tl.program_id(1) * BLOCK_N < kv_len, M, 0)
    for start_m in range(0, m_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        q, do, lse2, delta = load_query_rows(q_base, do_base, lse_ptr, delta_ptr, bh, M, rows, row_mask,
                                             sqm, sqd, sdom, sdod, dims, dim_mask)
        pz_t, ds_t = grad_tile(q, do, lse2, delta, k, v, rows, cols, col_mask[:, None] & row_mask[None, :],
                               seed, rng_offset, bh, M, N, qk_scale, dropout_p, bias_base, sbm, sbn, HAS_BIAS,
                               DROPOUT, ACC, DOT_FP32, INPUT_PRECISION, BLOCK_M, BLOCK_N, True)
        dv = dot(pz_t.to(do.dtype), do, dv, DOT_FP32, INPUT_PRECISION)
        dk = dot(ds_t.to(q.dtype), q, dk, DOT_FP32, INPUT_PRECISION)

    # Written for every key the batch owns: zeros past kv_lens[b]; packed batches own kv_len rows.
    owned = cols < (N if KV_MODE != 2 else kv_len)
    store_rows(dk_ptr + b64 * sdkb + kv_start * sdkn + h * sdkh, dk * scale, cols, owned, sdkn, dims, dim_mask, sdkd)
    store_rows(dv_ptr + b64 * sdvb + kv_start * sdvn + h * sdvh, dv, cols, owned, sdvn, dims, dim_mask, sdvd)


@autotuned(fa2_cuda_configs(), FA2_INTERPRET_CONFIG, key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_fa2_prune("dq"))
@triton.jit
def cross_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdom, sdoh, sdod, sbb, sbh, sbm, sbn,
    sdqb, sdqm, sdqh, sdqd,
    qk_scale, scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(M / BLOCK_M)): one query block's dQ (per batch), looping over the keys."""
    bh = tl.program_id(0)
    b = bh // H
    b64 = b.to(tl.int64)
    h = bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q, do, lse2, delta = load_query_rows(q_ptr + b64 * sqb + h * sqh, do_ptr + b64 * sdob + h * sdoh, lse_ptr,
                                         delta_ptr, bh, M, rows, row_mask, sqm, sqd, sdom, sdod, dims, dim_mask)
    kv_start, kv_len = kv_extent(b, lens_ptr, cu_ptr, N, KV_MODE)
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
    store_rows(dq_ptr + b64 * sdqb + h * sdqh, dq * scale, rows, row_mask, sdqm, dims, dim_mask, sdqd)


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq shaped like q, dk, dv shaped like k, v), None for a gradient not asked for (only the
    FA2 schedule can skip work; the single pass always computes all three).

    Layouts and arguments as ``cross_attention_fwd``; ``dout`` is (B, M, H, D) and ``out``/``lse``
    are the forward's outputs; ``bias`` the forward's additive mask. ``num_splits`` overrides the
    single pass's key-split heuristic.
    """
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
    in_strides = (sqb, *q.stride()[1:], *kv_strides(k), *kv_strides(v), *dout.stride(), *bias_strides)
    scales = (scale * LOG2E, scale, dropout_p)

    delta = torch.empty((B, H, M), device=q.device, dtype=stat_dtype)
    cross_attention_bwd_preprocess_kernel[lambda meta: (B * H, cdiv(M, meta["BLOCK_M"]))](
        out, dout, delta, H, M, D, *out.stride(), *dout.stride(), ACC=ACC, BLOCK_D=BLOCK_D,
    )
    # Gradients are contiguous (as the op's fake implementation says). Packed keys: rows outside
    # every sequence must read as zero gradient, and no program owns them.
    def new_kv(t):
        return (torch.zeros if mode == KV_PACKED else torch.empty)(t.shape, device=t.device, dtype=t.dtype)

    if use_single_pass(M, D, q.element_size()):
        if num_splits is None:
            num_splits = choose_num_splits(B * H, N, q.device)
        keys_per_split, num_splits = split_ranges(N, num_splits)
        dk, dv = new_kv(k), new_kv(v)
        direct = num_splits == 1 and not shared
        dq_part = torch.empty(q.shape, device=q.device, dtype=q.dtype) if direct else \
            torch.empty((num_splits, B, M, H, D), device=q.device, dtype=stat_dtype)
        dq_strides = (0, *dq_part.stride()) if direct else dq_part.stride()
        cross_attention_bwd_single_pass_kernel[(B * H, num_splits)](
            q, k, v, dout, lse, delta, dq_part, dk, dv, *extras,
            H, M, N, D, keys_per_split, *in_strides, *dq_strides, *kv_strides(dk), *kv_strides(dv), *scales,
            BLOCK_M=max(16, next_power_of_2(M)), **aux,
        )
        dq = dq_part if direct else reduce_dq(dq_part.flatten(0, 1) if shared else dq_part, shared, q.dtype)
        return (dq if need_dq else None), (dk if need_dkv else None), (dv if need_dkv else None)

    dq = dk = dv = None
    if need_dkv:
        dk, dv = new_kv(k), new_kv(v)
        cross_attention_bwd_dkdv_kernel[lambda meta: (B * H, cdiv(N, meta["BLOCK_N"]))](
            q, k, v, dout, lse, delta, dk, dv, *extras,
            H, M, N, D, *in_strides, *kv_strides(dk), *kv_strides(dv), *scales, **aux,
        )
    if need_dq:
        dq_part = torch.empty((B, M, H, D), device=q.device, dtype=stat_dtype if shared else q.dtype)
        cross_attention_bwd_dq_kernel[lambda meta: (B * H, cdiv(M, meta["BLOCK_M"]))](
            q, k, v, dout, lse, delta, dq_part, *extras,
            H, M, N, D, *in_strides, *dq_part.stride(), *scales, **aux,
        )
        dq = reduce_dq(dq_part, True, q.dtype) if shared else dq_part
    return dq, dk, dv


def reduce_dq(partials: torch.Tensor, keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    """Sum fp32 dQ partials over their leading dim (key splits and/or batches of a shared q) with
    ``torch.sum``: a fixed reduction order, the same bits every run. Cast to q's dtype."""
    return partials.sum(0, keepdim=keepdim).to(dtype)


def flops(B: int, H: int, M: int, N: int, D: int, elem: int = 2) -> int:
    """Matmul FLOPs of the backward under the schedule ``use_single_pass`` picks."""
    return (10 if use_single_pass(M, D, elem) else 14) * B * H * M * N * D


def bytes_moved(B: int, H: int, M: int, N: int, D: int, elem: int, shared_q: bool = False) -> int:
    """Fewest bytes the backward moves: O and dO read for Delta; Q, dO, K, V read by the gradient
    kernels (FA2 reads K, V twice: once per kernel); dQ, dK, dV written; fp32 LSE and Delta."""
    q_rows = M if shared_q else B * M
    kv_reads = 2 if use_single_pass(M, D, elem) else 4
    tensors = 2 * B * M * H * D + (q_rows + B * M) * H * D + kv_reads * B * N * H * D + q_rows * H * D + 2 * B * N * H * D
    return tensors * elem + 3 * B * H * M * 4
