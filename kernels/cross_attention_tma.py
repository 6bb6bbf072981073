"""Cross-attention forward for Hopper: K/V through TMA tensor descriptors, mask-free key loops.

The same function as ``cross_attention_fwd.py`` (its docstring has the formulas) for the calls
without dropout or an additive mask: O and the LSE ``(B, H, M)`` are written exactly as its
``store_output`` writes them (the same helper), and a split-key call writes the same partial states
for the same ``cross_attention_combine_kernel``, so the existing backward kernels read either
forward's residuals. What differs is how K and V reach the tensor cores:

* **TMA**: each program builds device-side tensor descriptors (``tl.make_tensor_descriptor``)
  over its own keys and values: from its batch's first key row (``cu_seqlens_k[b]`` when packed)
  and its first head, ``hi`` rows long, where ``hi`` is its key range's end (its split's, clipped
  at ``kv_lens[b]``). Rows at or past ``hi`` and head dims past D read as zero (the copy engine
  clips), so the loads carry no masks and no key past ``kv_lens[b]`` is ever read. Queries with one
  head per program come through a descriptor too. The key loop is software-pipelined
  ``num_stages`` deep (2-4 TMA loads in flight, ``fits``).
* **Mask-free main loop**: the key range ``[lo, hi)`` is walked in whole ``BLOCK_N`` tiles
  without any mask; the one partial tile after them (``tail``) is the only one whose scores are
  masked (keys past ``hi`` get -inf; their V rows read as zero, so 0 * NaN cannot occur).
* **Several heads per program** (``HEADS`` > 1: fewer than 64 queries, one query tile holding them
  all): the program loads ``[BLOCK_N, HEADS, D]`` tiles (adjacent heads are adjacent in memory: one
  wider TMA box) and runs the HEADS dots as one batched (3-D) ``tl.dot``, so few-query calls such
  as BLIP-2's (32 queries, 12 heads, d=64) move twice the bytes per program and per TMA message.
  Batched dots lower to mma.sync (HMMA), not wgmma: the memory-bound case does not need wgmma.
* **Warp specialisation** (``WARP_SPECIALIZE``: 128-query tiles, from 128 queries on, dense keys only: ``tile``): the key
  loop is ``tl.range(..., warp_specialize=True, flatten=False)`` with ``num_warps=4``; triton 3.6
  then splits the program into a TMA producer warpgroup and two 64-row wgmma consumer warpgroups
  on sm_90. It does so only when that loop is the program's one place with descriptor loads and
  dots, without a branch inside (measured: a peeled tile before or after the loop, or an ``if`` in
  it, silently turns it off; a pointer-loaded Q makes the pass fail). So this loop masks every
  tile (one select per score) instead of peeling the partial one; ``python -m deco_ops.aot``
  checks the SASS (USETMAXREG, UTMALDG, HGMMA).

Not here (the caller keeps ``cross_attention_fwd.py`` for them): dropout (a Philox tile per key
block) and additive masks (a bias tile per key block: not mask-free). No float64.

Counts: as ``cross_attention_fwd.flops`` / ``bytes_moved``.
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._tuning import INTERPRET, autotuned, device_smem_limit, dot_dtype_workaround, input_precision
from .cross_attention_fwd import (
    LOG2E, choose_num_splits, combine, kv_at, kv_extent, kv_mode, kv_strides, load_rows, partial_states, split_ranges, store_output,
    int32_heads, store_partial,
)
from .dot import dot
from .scalars import fp32_scalar
from .tma_gemm import ensure_allocator, tma_addressable

# A query tile of 128 rows runs warp-specialised: one producer and two 64-row consumer warpgroups.
WS_BLOCK_M = 128
# Few queries: at most this many query rows (heads x queries) per program, and HEADS * BLOCK_D at
# most this wide (the TMA box and the K/V stages stay within shared memory at 4 stages).
MAX_HEAD_ROWS = 128
MAX_HEAD_COLS = 128


def cuda_configs() -> list[triton.Config]:
    """Key-block size, pipelining depth; 4 warps (a warpgroup: wgmma, and triton 3.6's condition
    for warp specialisation). The query tile and the heads per program follow M (``tile``)."""
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=s)
        for bn, s in [(64, 4), (128, 3), (64, 3), (128, 2)]
    ]


def head_block(D: int) -> int:
    """The head-dim block of head dim ``D`` (a power of two, at least 16: the TMA box and the dots)."""
    return max(16, next_power_of_2(D))


def tile(M: int, H: int, D: int, ragged: bool = False) -> tuple[int, int, bool]:
    """(BLOCK_M, HEADS, WARP_SPECIALIZE) for M queries of H heads of dim D: 128-query warp-specialised
    tiles from 128 queries on; 64-query tiles between 64 and 128; below 64 queries one tile holds all
    of them, and as many heads as divide H within ``MAX_HEAD_ROWS`` rows and ``MAX_HEAD_COLS`` dims.
    ``ragged`` keys (``kv_lens`` or ``cu_seqlens_k``) never take the warp-specialised tile: on the
    H200 (triton 3.6, 2026-12-04) it returned NaN for a whole 128-query tile (M=130, kv_lens 75 and
    33, the keys past each length NaN), where the other tiles, with the same descriptors ending at
    each batch's length, were right; the cause needs a GPU to find (docs/aot.md)."""
    if M >= WS_BLOCK_M and not ragged:
        return WS_BLOCK_M, 1, True
    block_m = max(16, next_power_of_2(M))
    if block_m > 64:
        return 64, 1, False
    width = head_block(D)
    heads = 1
    while H % (2 * heads) == 0 and 2 * heads * block_m <= MAX_HEAD_ROWS and 2 * heads * width <= MAX_HEAD_COLS:
        heads *= 2
    return block_m, heads, False


def applies(M: int, H: int, D: int, elem_bytes: int, smem_limit: int, ragged: bool) -> bool:
    """Whether a config fits a call (``tile``, ``fits``): on Hopper's shared memory head dims up to
    128; at 256 neither a 64- nor a 128-query tile fits any stage count, so no config would be left
    to launch (the caller keeps the pointer-load kernels)."""
    block_m, heads, _ = tile(M, H, D, ragged)
    return any(fits(c, block_m, heads, head_block(D), elem_bytes, smem_limit) for c in cuda_configs())


def smem_bytes(config: triton.Config, block_m: int, heads: int, block_d: int, elem_bytes: int) -> int:
    """Shared memory of a config, an upper bound: the K and V stages, the Q tile and a P tile."""
    bn = config.kwargs["BLOCK_N"]
    return (config.num_stages * 2 * bn * block_d + block_m * block_d + block_m * bn) * heads * elem_bytes


def fits(config: triton.Config, block_m: int, heads: int, block_d: int, elem_bytes: int, smem_limit: int) -> bool:
    """Whether ``config`` fits shared memory and compiles without spills (``python -m deco_ops.aot``,
    sm_90 bf16, triton 3.6): the 128-query warp-specialised tile takes 128-key blocks (the issue's
    128 x 128 tile), 2 stages at head dim 128 (3 stages take 247,200 B of shared memory); several
    heads per program take 64-key blocks (128-key blocks spill 0.9 KB); 4-byte operands 64-key blocks.
    fp32 is for the interpreter's parity tests only: compiled with exact (FMA) dots a 32 x 64 tile
    spills 24 KB, so the strategy offers this kernel for fp16/bf16 alone."""
    bn = config.kwargs["BLOCK_N"]
    if block_m == WS_BLOCK_M and bn != 128 or heads > 1 and bn > 64 or elem_bytes == 4 and bn > 64:
        return False
    return smem_bytes(config, block_m, heads, block_d, elem_bytes) <= smem_limit


def _prune(configs, named_args, **constexprs):
    q = named_args["q_ptr"]
    return [c for c in configs if fits(c, constexprs["BLOCK_M"], constexprs["HEADS"], constexprs["BLOCK_D"],
                                       q.element_size(), device_smem_limit(q.device))]


INTERPRET_CONFIG = triton.Config({"BLOCK_N": 32})


@triton.jit
def kv_descriptor(base, rows, stride_row, stride_head, D, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """A descriptor over one program's keys (or values): ``rows`` rows from ``base`` (its batch, its
    first head), (rows, D) for one head, (rows, HEADS, D) for several; rows past ``rows`` and dims
    past D read as zero."""
    if HEADS == 1:
        desc = tl.make_tensor_descriptor(base, shape=[rows, D], strides=[stride_row, 1], block_shape=[BLOCK_N, BLOCK_D])
    else:
        desc = tl.make_tensor_descriptor(base, shape=[rows, HEADS, D], strides=[stride_row, stride_head, 1],
                                         block_shape=[BLOCK_N, HEADS, BLOCK_D])
    return desc


@triton.jit
def kv_tile(desc, row, HEADS: tl.constexpr):
    """Rows ``row .. row + BLOCK_N``: (BLOCK_N, BLOCK_D) for one head, (HEADS, BLOCK_N, BLOCK_D) for several."""
    if HEADS == 1:
        t = desc.load([row, 0])
    else:
        t = tl.permute(desc.load([row, 0, 0]), (1, 0, 2))
    return t


@triton.jit
def online_step(q, k, v, m_i, l_i, acc, qk_scale, valid, TAIL: tl.constexpr, HEADS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (base 2, scale folded in; statistics on the last axis).
    ``TAIL``: the last, partial tile, whose keys outside ``valid`` (a BLOCK_N vector) get score -inf."""
    if HEADS == 1:
        s = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=acc.dtype), DOT_FP32, INPUT_PRECISION)
    else:
        s = dot(q, tl.permute(k, (0, 2, 1)), tl.zeros([HEADS, BLOCK_M, BLOCK_N], dtype=acc.dtype), DOT_FP32, INPUT_PRECISION)
    s = s * qk_scale
    if TAIL:
        if HEADS == 1:
            s = tl.where(valid[None, :], s, float("-inf"))
        else:
            s = tl.where(valid[None, None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, -1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - tl.expand_dims(m_safe, -1))
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, -1)
    acc = dot(p.to(v.dtype), v, acc * tl.expand_dims(alpha, -1), DOT_FP32, INPUT_PRECISION)
    return m_new, l_i, acc


@autotuned(cuda_configs(), INTERPRET_CONFIG, key=["M", "N", "H", "BLOCK_D", "KV_MODE", "SPLIT", "BLOCK_M", "HEADS"],
           buckets=("M", "N"), prune=_prune)
@triton.jit
def cross_attention_tma_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, m_ptr, l_ptr, lens_ptr, cu_ptr,
    B, H, M, N, D, keys_per_split,
    sqb, sqm, sqh, sqd, skb, skn, skh, svb, svn, svh, sob, som, soh, sod,
    qk_scale,
    KV_MODE: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, HEADS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B * H / HEADS, ceil(M / BLOCK_M), splits). K and V (B, N, H, D), or packed (total_N, H, D),
    with unit dim stride; outputs as ``cross_attention_fwd_kernel``."""
    qk_scale = fp32_scalar(qk_scale)
    bg = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = bg // (H // HEADS)
    h0 = bg % (H // HEADS) * HEADS

    # Query rows of the program, heads-major: row r is query pid_m * BLOCK_M + r % BLOCK_M of head h0 + r // BLOCK_M.
    r = tl.arange(0, HEADS * BLOCK_M)
    rows = pid_m * BLOCK_M + r % BLOCK_M
    heads = h0 + r // BLOCK_M
    row_mask = rows < M
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    if HEADS == 1:  # through TMA too: triton 3.6's warp specialisation fails on a pointer-loaded Q
        q_desc = kv_descriptor(q_ptr + b.to(tl.int64) * sqb + h0 * sqh, M, sqm, sqh, D, 1, BLOCK_M, BLOCK_D)
        q = q_desc.load([pid_m * BLOCK_M, 0])
    else:
        q = load_rows(q_ptr + b.to(tl.int64) * sqb + (heads * sqh)[:, None], rows, row_mask, sqm, dims, dim_mask, sqd)
        q = tl.reshape(q, [HEADS, BLOCK_M, BLOCK_D])

    # The program's key range [lo, hi): its split, clipped at the batch's length. The descriptors end
    # at hi, so the partial last tile reads zeros past it (finite V rows: 0 * NaN cannot occur).
    at = kv_at(b, lens_ptr, cu_ptr, KV_MODE)
    kv_start, kv_len = kv_extent(b, tl.load(at, mask=KV_MODE != 0, other=0), tl.load(at + 1, mask=KV_MODE == 2, other=0), N, KV_MODE)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len.to(tl.int32))
    k_desc = kv_descriptor(k_ptr + b.to(tl.int64) * skb + kv_start * skn + h0 * skh, tl.maximum(hi, 1), skn, skh, D, HEADS, BLOCK_N, BLOCK_D)
    v_desc = kv_descriptor(v_ptr + b.to(tl.int64) * svb + kv_start * svn + h0 * svh, tl.maximum(hi, 1), svn, svh, D, HEADS, BLOCK_N, BLOCK_D)
    full_tiles = tl.maximum(hi - lo, 0) // BLOCK_N
    tail = lo + full_tiles * BLOCK_N

    if HEADS == 1:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    else:
        m_i = tl.full([HEADS, BLOCK_M], float("-inf"), dtype=ACC)
        acc = tl.zeros([HEADS, BLOCK_M, BLOCK_D], dtype=ACC)
    l_i = tl.zeros_like(m_i)
    if WARP_SPECIALIZE:
        # Triton 3.6 specialises warps only when this loop is the program's one place with descriptor
        # loads and dots, without branches in it: no peeled tile before or after it, no `if` inside
        # (each turns it silently off, measured). So every tile takes the key mask here, a select per score.
        for t in tl.range(0, tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), flatten=False, warp_specialize=True):
            start = lo + t * BLOCK_N
            k = kv_tile(k_desc, start, HEADS)
            v = kv_tile(v_desc, start, HEADS)
            valid = start + tl.arange(0, BLOCK_N) < hi
            m_i, l_i, acc = online_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, HEADS, BLOCK_M, BLOCK_N, DOT_FP32,
                                        INPUT_PRECISION)
    else:
        no_mask = tl.full([BLOCK_N], True, tl.int1)
        for t in tl.range(0, full_tiles):
            start = lo + t * BLOCK_N
            k = kv_tile(k_desc, start, HEADS)
            v = kv_tile(v_desc, start, HEADS)
            m_i, l_i, acc = online_step(q, k, v, m_i, l_i, acc, qk_scale, no_mask, False, HEADS, BLOCK_M, BLOCK_N, DOT_FP32,
                                        INPUT_PRECISION)
    if not WARP_SPECIALIZE and tail < hi:
        k = kv_tile(k_desc, tail, HEADS)
        v = kv_tile(v_desc, tail, HEADS)
        valid = tail + tl.arange(0, BLOCK_N) < hi
        m_i, l_i, acc = online_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, HEADS, BLOCK_M, BLOCK_N, DOT_FP32, INPUT_PRECISION)

    acc = tl.reshape(acc, [HEADS * BLOCK_M, BLOCK_D])
    m_i = tl.reshape(m_i, [HEADS * BLOCK_M])
    l_i = tl.reshape(l_i, [HEADS * BLOCK_M])
    bh = b * H + heads
    if SPLIT:
        store_partial(o_ptr, m_ptr, l_ptr, acc, m_i, l_i, (split * B * H + bh).to(tl.int64) * M + rows,
                      row_mask, dims, dim_mask, D)
    else:
        store_output(o_ptr, lse_ptr, acc, m_i, l_i, b, heads[:, None], bh, M, rows, row_mask, dims, dim_mask,
                     sob, som, soh, sod)


# ----------------------------------------------------------------------------------------------
# launcher


@on_input_device
def cross_attention_tma_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    B: int,
    N: int,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O (B, M, H, D) in q's dtype, LSE (B, H, M) fp32), as ``cross_attention_fwd.cross_attention_fwd``
    without dropout or an additive mask; ``k``/``v`` must be ``tma_addressable`` (fp16, bf16 or fp32)."""
    q, k, v = int32_heads(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not tma_addressable(t) or t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"cross_attention_tma_fwd: {name} must be fp16/bf16/fp32 with unit dim stride and 16-byte "
                             f"aligned base and strides (TMA descriptors), got {t.dtype} strides {t.stride()}")
    _, M, H, D = q.shape
    out = torch.empty((B, M, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, M), device=q.device, dtype=torch.float32)
    if B == 0:
        return out, lse
    block_m, heads, warp_specialize = tile(M, H, D, ragged=kv_lens is not None or cu_seqlens_k is not None)
    if num_splits is None:
        num_splits = choose_num_splits(B * H // heads * cdiv(M, block_m), N, q.device)
    keys_per_split, num_splits = split_ranges(N, num_splits)
    split = num_splits > 1
    if split:
        part_o, part_m, part_l = partial_states(num_splits, B, H, M, D, q.device, torch.float32)
    if not INTERPRET:
        ensure_allocator()
    cross_attention_tma_kernel[(B * H // heads, cdiv(M, block_m), num_splits)](
        q, k, v, part_o if split else out, lse, part_m if split else lse, part_l if split else lse,
        kv_lens if kv_lens is not None else lse, cu_seqlens_k if cu_seqlens_k is not None else lse,
        B, H, M, N, D, keys_per_split,
        0 if q.shape[0] == 1 else q.stride(0), *q.stride()[1:], *kv_strides(k)[:3], *kv_strides(v)[:3], *out.stride(),
        scale * LOG2E,
        KV_MODE=kv_mode(kv_lens, cu_seqlens_k), SPLIT=split, ACC=tl.float32,
        DOT_FP32=dot_dtype_workaround(q.dtype == torch.bfloat16), INPUT_PRECISION=input_precision(q.dtype),
        HEADS=heads, WARP_SPECIALIZE=warp_specialize, BLOCK_M=block_m, BLOCK_D=head_block(D),
    )
    if split:
        combine(part_o, part_m, part_l, out, lse)
    return out, lse
