"""Cross-attention forward, FlashAttention-style, specialised for few queries M over many keys N.

    S = scale * Q K^T    (per batch b, head h: Q is M x D, K and V are N_b x D)
    P = softmax(S) over the first N_b = kv_lens[b] keys (keys >= N_b do not exist)
    O = (P o Z / (1 - p)) V,   Z the dropout keep-mask (all ones when dropout_p == 0)
    LSE = log(sum_j exp(S_j))   (natural log, fp32; +inf for a row with no keys)

Algorithm: one program owns a BLOCK_M x D tile of queries of one (batch, head) and streams the
keys in BLOCK_N blocks (online softmax, base-2 exponentials with the scale folded into
log2(e)): it keeps the running row maximum m, the running sum l and the unnormalised output
accumulator in registers, so nothing of size M x N is ever written. Keys at or past ``kv_lens[b]``
are never loaded (masked loads), and their scores are replaced by -inf with ``tl.where``, so NaN or
garbage in the padding cannot leak. A row with no keys ends with l == 0: its output is written as
zeros and its LSE as +inf, which makes every backward probability exp(S - LSE) zero.

Additive mask (``HAS_BIAS``, a compile-time flag: without it the loop is unchanged): S += bias, with
the bias tile of each key block loaded through four strides (batch, head, query, key), so a mask
broadcast over batch, heads or queries is read through zero strides, never expanded in memory.
A bias of -inf drops the key (S = -inf exactly, whatever the dot gave); finite biases are clamped at
``MIN_BIAS`` before the scale to base 2, so finfo(fp32).min (Hugging Face's "masked") cannot
overflow into -inf: a row whose keys all carry it stays a uniform average, as in PyTorch. A row
whose every key is -inf has no keys (l == 0), as above.

Grids: every kernel puts B * H on grid axis 0, whose limit is 2**31 - 1; axes 1 and 2 (query or
key blocks, key splits) stop at 65535, which B * H passes in BLIP-2 feature extraction (12 heads,
B >= 5462). Program ids are read, never divided: a flattened (head, block) index cost the
forward's 32x128 tile 8 B of spills.

Split keys: when B * H * ceil(M / 64) < 0.8 * SM count (BLIP-2's 32 queries at small batch), the
queries alone cannot fill the GPU, so the key range is cut into ``S`` splits, one program each; each
writes its partial state (unnormalised O, m, l) in fp32, and ``cross_attention_combine_kernel``
merges the splits exactly, in a fixed order (deterministic):
    m = max_s m_s,  l = sum_s l_s 2^(m_s - m),  O = sum_s O_s 2^(m_s - m) / l.

Queries shared by the whole batch (learned queries, ``q`` of shape (1, M, H, D)) are read through
a zero batch stride: every batch's programs read the same rows, never a copied or expanded tensor.

Dropout: the keep-mask is never stored. Element (b, h, i, j) uses the counter
``offset + ((b * H + h) * M + i) * N + j`` of Triton's Philox generator (``tl.rand(seed, counter)``,
kept if ``u >= p``), so the backward kernels regenerate exactly the same mask from ``(seed, offset)``
and ``deco_ops.reference_attention.dropout_keep`` reproduces it bit for bit in PyTorch.

Packed keys (``cu_seqlens_k``): batch b's keys are rows ``cu[b] .. cu[b+1]`` of a (total_N, H, D)
tensor; N is then the longest sequence, used for the split ranges and the dropout counters.

Counts (the benchmarks report TFLOP/s and GB/s from these):
    flops = 4 * B * H * M * N * D                     (QK^T and PV; softmax adds O(B*H*M*N))
    bytes = (Bq*M*H*D + 2*B*N*H*D + B*M*H*D) * elem + B*H*M * 4       (Q, K, V, O, LSE)
            + S > 1: 2 * S*B*H*M*(D + 2) * 4          (the partial states, written then read)
"""

import functools

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._tuning import autotuned, device_arch, dot_dtype_workaround, input_precision
from .dot import dot
from .scalars import fp32_scalar

LOG2E = 1.4426950408889634

# How a batch finds its keys: all N of them, the first kv_lens[b], or rows cu[b]..cu[b+1] (packed).
KV_DENSE, KV_LENS, KV_PACKED = 0, 1, 2

# Finite additive biases are clamped here (natural-log units): far below any real score, far above
# fp32's -3.4e38 once scaled by log2(e).
MIN_BIAS = tl.constexpr(-1e30)
LOG2E_JIT = tl.constexpr(LOG2E)  # the same constant, readable inside @triton.jit

H100_SMS = 132
MIN_KEYS_PER_SPLIT = 128
MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; an H100's 132 when there is no GPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def choose_num_splits(work: int, N: int, device: torch.device) -> int:
    """Key splits for ``work`` independent (batch, head, query block) programs over N keys.

    FlashAttention's rule: split only when ``work < 0.8 * SMs``; then as many splits as it takes to
    give every SM a program, but at most ``ceil(N / MIN_KEYS_PER_SPLIT)`` splits (a split must
    amortise its partial-state round trip: BLIP-2's 257 keys make 3 splits of 96, 96 and 65) and at
    most ``MAX_SPLITS``.
    """
    sms = sm_count(device)
    if work >= 0.8 * sms:
        return 1
    return max(1, min(cdiv(sms, work), cdiv(N, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def split_ranges(N: int, num_splits: int) -> tuple[int, int]:
    """(keys per split, effective number of splits): splits cover whole 16-key groups."""
    per_split = cdiv(cdiv(N, num_splits), 16) * 16
    return per_split, cdiv(N, per_split)


# ----------------------------------------------------------------------------------------------
# helpers shared with the backward kernels


@triton.jit
def kv_at(b, lens_ptr, cu_ptr, KV_MODE: tl.constexpr):
    """Where ``kv_extent``'s int32 reads of batch b are: ``kv_lens[b]`` (KV_LENS), or
    ``cu_seqlens_k[b]`` and the next one (KV_PACKED); dense keys read nothing. Each kernel loads them
    itself (``tl.load(at, mask=KV_MODE != 0, other=0)`` and ``tl.load(at + 1, mask=KV_MODE == 2,
    other=0)``): torch.compile reads which tensors a kernel writes from its Triton IR, and a store
    whose address came out of a helper that loads counts as a write through every pointer the helper
    got (kv_lens, or the LSE standing in for it, were cloned before the backward kernels and the
    caller's kv_lens written by the graph)."""
    if KV_MODE == 2:
        return cu_ptr + b
    else:
        return lens_ptr + b


@triton.jit
def kv_extent(b, first, second, N, KV_MODE: tl.constexpr):
    """(first key row of batch b within its (packed) key tensor, number of valid keys in [0, N])
    from what the kernel loaded at ``kv_at`` (``first``) and after it (``second``).
    KV_MODE: 0 = KV_DENSE (all N keys), 1 = KV_LENS (kv_lens[b]), 2 = KV_PACKED (cu_seqlens_k)."""
    if KV_MODE == 2:
        start = first.to(tl.int64)
        length = second.to(tl.int64) - start
    else:
        start = b.to(tl.int64) * 0
        if KV_MODE == 1:
            length = first.to(tl.int64)
        else:
            length = start + N
    return start, tl.minimum(tl.maximum(length, 0), N)


@triton.jit
def dropout_keep(seed, rng_offset, bh, M, N, rows, cols, dropout_p):
    """Keep-mask of a tile of (batch * H + head) ``bh``: Philox counter ``offset + (bh * M + row) * N
    + col``, kept where the uniform draw is >= dropout_p. ``rows`` and ``cols`` (query and key
    indices) come shaped for the tile: ``rows[:, None], cols[None, :]`` for a queries x keys tile,
    ``rows[None, :], cols[:, None]`` for its transpose."""
    counter = rng_offset + (bh.to(tl.int64) * M + rows.to(tl.int64)) * N + cols.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def dropout_stream(rng_ptr, DROPOUT: tl.constexpr):
    """(seed, offset) of the Philox stream drawn for this call; (0, 0) without dropout."""
    seed = 0
    rng_offset = 0
    if DROPOUT:
        seed = tl.load(rng_ptr)
        rng_offset = tl.load(rng_ptr + 1)
    return seed, rng_offset


@triton.jit
def load_bias(base, rows, cols, valid, stride_row, stride_col):
    """The additive-mask tile at query ``rows`` and key ``cols`` (shaped for the tile, as in
    ``dropout_keep``); ``base`` is at the (batch, head). Positions outside ``valid`` read 0."""
    ptrs = base + rows.to(tl.int64) * stride_row + cols.to(tl.int64) * stride_col
    return tl.load(ptrs, mask=valid, other=0.0)


@triton.jit
def add_bias(s, bias):
    """Scores ``s`` (base-2 units, scale folded in) plus an additive mask in natural units: -inf
    drops the key exactly (even where the dot gave NaN); NaN is added as NaN (the row's output is
    NaN, as SDPA's; a plain maximum would clamp it to MIN_BIAS); finite values are clamped at MIN_BIAS,
    an fp64 mask in its own dtype before the cast to the scores' (its lowest finite value would
    become -inf in fp32 and drop a row that PyTorch averages), a 16-bit one after its exact cast
    to fp32 (Triton's interpreter keeps bf16 as raw 16-bit integers, whose maximum with MIN_BIAS
    is MIN_BIAS: every key of a bf16 mask read as dropped there)."""
    dropped = bias == float("-inf")
    if bias.dtype != tl.float64:
        bias = bias.to(tl.float32)
    bias = tl.maximum(bias, MIN_BIAS, propagate_nan=tl.PropagateNan.ALL).to(s.dtype)  # a NaN stays NaN, as SDPA adds it
    return tl.where(dropped, float("-inf"), s + bias * LOG2E_JIT)


@triton.jit
def load_rows(base, rows, row_mask, stride_row, dims, dim_mask, stride_dim):
    """A (rows x dims) tile; masked rows/dims read as 0 and are never touched in memory."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + dims[None, :] * stride_dim
    return tl.load(ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)


# ----------------------------------------------------------------------------------------------
# forward


def cuda_configs() -> list[triton.Config]:
    """Key-block sizes and pipelining for Hopper/Ampere; BLOCK_M follows M (few queries)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (32, 128, 4, 3),
            (16, 128, 4, 3),
            (32, 64, 4, 2),
            (16, 16, 4, 2),
            (32, 64, 8, 2),
            (16, 16, 8, 2),
        ]
    ]


def fits(config: triton.Config, elem_bytes: int, ieee: bool, dropout: bool, arch: int, bias: bool = False,
         block_d: int = 64) -> bool:
    """Whether ``config`` compiles without register spills (measured with ``python -m deco_ops.aot``
    on sm_80 and sm_90 at head dims 64 and 128, split or not, with triton 3.6 and 3.9): 16-bit inputs
    take up to 64 queries a tile (128-query tiles spill at D=128; without wgmma, on sm_80, 64x128
    tiles on 4 warps spill 40 B at D=128), and with dropout's Philox mask tiles of at most 32x64.
    fp32 operands take 16x16 tiles on 8 warps: clean (at most 128 registers) in all 54 fp32
    variants of ``--full`` on both targets and versions, where on 4 warps exact-fp32 dots spilled
    4-8 B in three under 3.6 (its sm_90 default variant among them) and two under 3.9
    (2026-12-07); with tf32, 32x64 on 8 warps spills at D=128 under triton 3.6 and with dropout
    under 3.9 since B*H moved to grid axis 0; exact fp32 dots (``ieee``: FMA, no tensor cores)
    spill somewhere in every larger shape tried (16x32 to 32x64 tiles on 4 or 8 warps). An
    additive mask (``bias``: one more tile per key block) was measured together with dropout and
    kv_lens: it keeps dropout's tile limit, and on sm_80 the 16x128 tile spills 16 B at D=128, so
    128-key blocks are left out there.

    Every combination of dropout, kv_lens and a mask, compiled apart (``--full``, both triton
    versions: ptxas's allocation is not monotone in them), left more 16-bit tiles spilling 4-36 B
    at head dims above 64 (``block_d``): a mask alone fits only 16-query tiles there (32x64 spills
    on 4 and 8 warps), dropout no 16x128 tile, dropout with a mask no 4-warp tile above 16x16
    (also at head dim 64 on sm_80); on sm_80 the 32x128 tile spills above head dim 64."""
    bm, bn, warps = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps
    if elem_bytes == 2:
        if (bm, bn, warps) == (16, 16, 8):  # fp32's tile: 16-bit keeps its own list
            return False
        wide = block_d > 64
        if arch < 90 and (bm * bn > 64 * 64 and warps == 4 or bias and bn >= 128 or wide and (bm, bn, warps) == (32, 128, 4)):
            return False
        if wide and bias and not dropout:
            return bm == 16
        if dropout and (wide and (bn >= 128 or bias) or arch < 90 and bias) and warps == 4 and bm * bn > 16 * 16:
            return False
        return bm <= 64 and (bm * bn <= 32 * 64 or not (dropout or bias))
    return (bm, bn, warps) == (16, 16, 8)


def _prune(configs, named_args, **constexprs):
    ieee = constexprs["INPUT_PRECISION"] == "ieee"
    q = named_args["q_ptr"]
    return [c for c in configs
            if fits(c, q.element_size(), ieee, constexprs["DROPOUT"], device_arch(q.device), constexprs["HAS_BIAS"],
                    constexprs["BLOCK_D"])]


INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32})


@autotuned(cuda_configs(), INTERPRET_CONFIG, key=["M", "N", "BLOCK_D", "KV_MODE", "HAS_BIAS", "DROPOUT", "SPLIT", "INPUT_PRECISION"],
           buckets=("M", "N"), prune=_prune)
@triton.jit
def cross_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, m_ptr, l_ptr, lens_ptr, cu_ptr, rng_ptr, bias_ptr,
    H, M, N, D, keys_per_split,
    sqb, sqm, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, som, soh, sod, sbb, sbh, sbm, sbn,
    qk_scale, dropout_p,
    KV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(M / BLOCK_M), splits). ``qk_scale`` = softmax scale * log2(e).

    SPLIT: write the fp32 partial state (unnormalised O at o_ptr, laid out (S, B, H, M, D), and m,
    l at m_ptr/l_ptr, (S, B, H, M)); otherwise O (strided, input dtype) and the LSE (B, H, M)."""
    qk_scale, dropout_p = fp32_scalar(qk_scale), fp32_scalar(dropout_p)
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    q = load_rows(q_ptr + b.to(tl.int64) * sqb + h * sqh, rows, row_mask, sqm, dims, dim_mask, sqd)

    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    k_base = k_ptr + b.to(tl.int64) * skb + kv_start * skn + h * skh
    v_base = v_ptr + b.to(tl.int64) * svb + kv_start * svn + h * svh
    bias_base = bias_ptr + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    lo = split.to(tl.int64) * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len)
    seed, rng_offset = dropout_stream(rng_ptr, DROPOUT)
    inv_keep = 1.0 / (1.0 - dropout_p)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < hi
        k = load_rows(k_base, cols, col_mask, skn, dims, dim_mask, skd)
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC), DOT_FP32, INPUT_PRECISION) * qk_scale
        if HAS_BIAS:
            s = add_bias(s, load_bias(bias_base, rows[:, None], cols[None, :], row_mask[:, None] & col_mask[None, :], sbm, sbn))
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, rng_offset, bh, M, N, rows[:, None], cols[None, :], dropout_p)
            p = tl.where(keep, p * inv_keep, 0.0)
        v = load_rows(v_base, cols, col_mask, svn, dims, dim_mask, svd)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, INPUT_PRECISION)
        m_i = m_new

    if SPLIT:
        state = (split * tl.num_programs(0) + bh).to(tl.int64) * M + rows
        store_partial(o_ptr, m_ptr, l_ptr, acc, m_i, l_i, state, row_mask, dims, dim_mask, D)
    else:
        store_output(o_ptr, lse_ptr, acc, m_i, l_i, b, h, bh, M, rows, row_mask, dims, dim_mask, sob, som, soh, sod)


@triton.jit
def store_partial(o_ptr, m_ptr, l_ptr, acc, m_i, l_i, state, row_mask, dims, dim_mask, D):
    """A key split's fp32 partial state of rows ``state`` (index into (S, B, H, M)): unnormalised O, m, l."""
    tl.store(o_ptr + state[:, None] * D + dims[None, :], acc, mask=row_mask[:, None] & dim_mask[None, :])
    tl.store(m_ptr + state, m_i, mask=row_mask)
    tl.store(l_ptr + state, l_i, mask=row_mask)


@triton.jit
def store_output(o_ptr, lse_ptr, acc, m_i, l_i, b, h, bh, M, rows, row_mask, dims, dim_mask, sob, som, soh, sod):
    """O = acc / l (zero rows where l == 0) and LSE = (m + log2 l) * ln 2 (+inf where l == 0). ``h``
    and ``bh`` may be per row (``h`` shaped (rows, 1)) for a program over several heads. A NaN l
    (a NaN in the mask) is a row with keys: its output and LSE are NaN, so are its weights, as SDPA's."""
    has_keys = l_i != 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h * soh + rows.to(tl.int64)[:, None] * som + dims[None, :] * sod
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * M + rows, lse, mask=row_mask)


def combine_cuda_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in [(16, 4), (32, 4), (64, 8)]]


COMBINE_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32})


@autotuned(combine_cuda_configs(), COMBINE_INTERPRET_CONFIG, key=["M", "BLOCK_D", "S"], buckets=("M",))
@triton.jit
def cross_attention_combine_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, o_ptr, lse_ptr,
    BH, H, M, D, S,
    sob, som, soh, sod,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H, ceil(M / BLOCK_M)): exact merge of the S partial softmax states, splits in order."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D

    m_tot = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    for s in range(0, S):
        state = (s * BH + bh).to(tl.int64) * M + rows
        m_tot = tl.maximum(m_tot, tl.load(part_m_ptr + state, mask=row_mask, other=float("-inf")))
    m_safe = tl.where(m_tot == float("-inf"), 0.0, m_tot)
    l_tot = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for s in range(0, S):
        state = (s * BH + bh).to(tl.int64) * M + rows
        w = tl.exp2(tl.load(part_m_ptr + state, mask=row_mask, other=float("-inf")) - m_safe)
        l_tot += w * tl.load(part_l_ptr + state, mask=row_mask, other=0.0)
        part = tl.load(part_o_ptr + state[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        acc += w[:, None] * part
    store_output(o_ptr, lse_ptr, acc, m_tot, l_tot, bh // H, bh % H, bh, M, rows, row_mask, dims, dim_mask, sob, som, soh, sod)


# ----------------------------------------------------------------------------------------------
# launcher


def acc_dtype(dtype: torch.dtype):
    """Accumulator / statistics dtype: fp32, fp64 for float64 inputs (interpreter gradchecks)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float64 else input_precision(dtype)


def kv_mode(kv_lens: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None) -> int:
    if cu_seqlens_k is not None:
        return KV_PACKED
    return KV_DENSE if kv_lens is None else KV_LENS


def bias_args(bias: torch.Tensor | None, fallback: torch.Tensor) -> tuple:
    """(pointer, batch, head, query, key strides) of the additive mask, a (B, H, M, N) view whose
    broadcast dims have stride 0; ``fallback`` and zero strides without one (never read)."""
    return (fallback, 0, 0, 0, 0) if bias is None else (bias, *bias.stride())


INT32_SPAN = 2**31  # offsets the kernels compute as int32 products stay below this


def int32_heads(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (..., H, D) tensors as the kernels can address them: a head's and a dim's offsets are
    int32 products there (int64 casts cost the forward's 16x128 tile 53 registers and a 20 B spill),
    so a view whose last head and dim lie ``INT32_SPAN`` elements or more from its first (a
    head-major view of about 1M packed keys) is copied contiguous first; every other tensor is
    passed as it is."""
    return tuple(t if (t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) < INT32_SPAN
                 else t.contiguous() for t in tensors)


def kv_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, key, head, dim) strides of a (B, N, H, D) or packed (total_N, H, D) tensor."""
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


@on_input_device
def cross_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    B: int,
    N: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, M, H, D) in q's dtype, LSE (B, H, M) fp32 (fp64 for float64)).

    ``q`` is (B, M, H, D) or (1, M, H, D) (shared, zero batch stride); ``k``/``v`` are (B, N, H, D),
    or packed (total_N, H, D) with ``cu_seqlens_k`` (B + 1,) and N the longest sequence.
    ``kv_lens``/``cu_seqlens_k`` are int32 on q's device; ``rng`` is int64 (seed, offset) when
    ``dropout_p > 0``. ``bias`` is an optional additive mask, a floating (B, H, M, N) view (zero
    strides where broadcast). ``num_splits`` overrides ``choose_num_splits``.
    """
    q, k, v = int32_heads(q, k, v)
    _, M, H, D = q.shape
    out = torch.empty((B, M, H, D), device=q.device, dtype=q.dtype)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, H, M), device=q.device, dtype=stat_dtype)
    if B == 0:
        return out, lse
    if num_splits is None:
        num_splits = choose_num_splits(B * H * cdiv(M, 64), N, q.device)
    keys_per_split, num_splits = split_ranges(N, num_splits)
    split = num_splits > 1
    if split:
        part_o, part_m, part_l = partial_states(num_splits, B, H, M, D, q.device, stat_dtype)
    BLOCK_D = max(16, next_power_of_2(D))
    mode = kv_mode(kv_lens, cu_seqlens_k)
    sqb = 0 if q.shape[0] == 1 else q.stride(0)
    bias_ptr, *bias_strides = bias_args(bias, lse)

    def grid(meta):
        return (B * H, cdiv(M, meta["BLOCK_M"]), num_splits)

    cross_attention_fwd_kernel[grid](
        q, k, v, part_o if split else out, lse, part_m if split else lse, part_l if split else lse,
        kv_lens if kv_lens is not None else lse, cu_seqlens_k if cu_seqlens_k is not None else lse,
        rng if rng is not None else lse, bias_ptr,
        H, M, N, D, keys_per_split,
        sqb, *q.stride()[1:], *kv_strides(k), *kv_strides(v), *out.stride(), *bias_strides,
        scale * LOG2E, dropout_p,
        KV_MODE=mode, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0, SPLIT=split, ACC=acc_dtype(q.dtype),
        DOT_FP32=dot_dtype_workaround(q.dtype == torch.bfloat16), INPUT_PRECISION=dot_precision(q.dtype),
        BLOCK_D=BLOCK_D,
    )
    if split:
        combine(part_o, part_m, part_l, out, lse)
    return out, lse


def partial_states(num_splits: int, B: int, H: int, M: int, D: int, device: torch.device, dtype: torch.dtype):
    """Buffers of the split-key partial states: unnormalised O (S, B, H, M, D), m and l (S, B, H, M)."""
    part_m = torch.empty((num_splits, B, H, M), device=device, dtype=dtype)
    return torch.empty((num_splits, B, H, M, D), device=device, dtype=dtype), part_m, torch.empty_like(part_m)


def combine(part_o: torch.Tensor, part_m: torch.Tensor, part_l: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merges the partial states into O (B, M, H, D) and the LSE (``cross_attention_combine_kernel``)."""
    num_splits, B, H, M, D = part_o.shape
    cross_attention_combine_kernel[lambda meta: (B * H, cdiv(M, meta["BLOCK_M"]))](
        part_o, part_m, part_l, out, lse,
        B * H, H, M, D, num_splits, *out.stride(),
        ACC=acc_dtype(out.dtype), BLOCK_D=max(16, next_power_of_2(D)),
    )


def flops(B: int, H: int, M: int, N: int, D: int) -> int:
    """Matmul FLOPs of the forward: QK^T and PV, 2*M*N*D each per (batch, head)."""
    return 4 * B * H * M * N * D


def bytes_moved(B: int, H: int, M: int, N: int, D: int, elem: int, shared_q: bool = False, num_splits: int = 1) -> int:
    """Fewest bytes the forward moves: read Q (once if shared), K, V; write O and the fp32 LSE;
    plus the fp32 partial states written and read back when the keys are split."""
    q_rows = M if shared_q else B * M
    partial = 2 * num_splits * B * H * M * (D + 2) * 4 if num_splits > 1 else 0
    return (q_rows * H * D + 2 * B * N * H * D + B * M * H * D) * elem + B * H * M * 4 + partial
