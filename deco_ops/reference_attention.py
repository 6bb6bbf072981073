"""Plain-PyTorch cross-attention: the default CPU backend of ``deco_ops.cross_attention`` and the
float64 references the tests compare with.

* ``attention_dense``: textbook softmax attention with the full M x N matrix (tests only).
* ``attention_fwd`` / ``attention_bwd``: the reference *backend*. It streams the keys in chunks with
  an online softmax, keeps only O and the log-sum-exp for backward, and recomputes each chunk's
  probabilities from the LSE in backward, so no M x N matrix outlives a chunk (FlashAttention's
  algorithm in PyTorch, in fp32 for half inputs).
* ``dropout_keep``: Triton's Philox ``tl.rand`` in PyTorch, bit for bit, so both backends drop the
  same elements for a given (seed, offset) and gradients compare across backends.
* ``attention_weights``: the probabilities ``softmax(S)`` (``need_weights``), per head or averaged.

An additive mask ``bias`` ((B, H, M, N), broadcast views welcome) enters the scores as in the kernels
(``add_bias``): -inf drops a key exactly, finite values are clamped at ``MIN_BIAS``.

Layouts as in the kernels: q (B or 1, M, H, D), k and v (B, N, H, D); LSE (B, H, M), natural log,
+inf for a row without keys.
"""

from __future__ import annotations

import functools
import math
import struct

import torch

CHUNK = 1024
MIN_BIAS = -1e30  # the kernels' clamp of finite additive biases (kernels/cross_attention_fwd.py)

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10  # tl.rand's (triton.language.random.N_ROUNDS_DEFAULT)
_UNIFORM_SCALE = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit
# tensors with an address and values the host may read; a traced, fake or wrapped one has neither
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


# counters per pass of ``_philox_word``: its seven int64 buffers (3.5 MiB) stay in the cache through
# the rounds, and its ~90 elementwise calls cost little next to their work (a 2-core EPYC, 1 thread:
# 2.5x faster than 2**12, 1.05-1.25x faster than 2**18)
_PHILOX_BLOCK = 1 << 16


def _philox_block(device: torch.device, n: int) -> int:
    """Counters per pass for ``n`` on ``device``: ``_PHILOX_BLOCK`` on the CPU; elsewhere all of them
    in one pass (a GPU pays per launch, ~90 a pass, not for cache misses)."""
    return _PHILOX_BLOCK if device.type == "cpu" else max(1, n)


def _philox_word(seed, counter: torch.Tensor, bufs: list[torch.Tensor]) -> torch.Tensor:
    """Philox4x32's first output word for a 1-d int64 ``counter`` (``tl.rand``'s draw before its float
    conversion) in the low 32 bits of an int64 tensor whose upper bits are garbage.

    Each round's mulhilo (the high and low 32-bit halves of a uint32 constant times a uint32 word)
    is one int64 multiply: the product is below 2**64 and int64's multiply wraps modulo 2**64, so its
    bits are the unsigned product's; its low half is the product itself and its high half ``prod >> 32``,
    garbage above bit 31 (the arithmetic shift's sign, an unmasked low half XORed in) left until
    the word enters the next product, where it is masked. The rounds run in place on ``bufs`` (six
    int64 buffers, each as long as ``counter`` at least). Round 1 starts from c2 = c3 = 0 (no
    product of c2; its c1 is 0), the last round computes c0 alone."""
    n = counter.shape[0]
    c0, c1, c2, c3, t0, t1 = (buf[:n] for buf in bufs)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    torch.bitwise_and(counter, _MASK32, out=c0)
    torch.bitwise_right_shift(counter, 32, out=c1)
    c1 &= _MASK32
    # round 1: c0' = c1 ^ k0, c1' = 0, c2' = hi(A * c0) ^ k1, c3' = lo(A * c0)
    c1 ^= k0
    c0.mul_(_PHILOX_ROUND_A)
    torch.bitwise_right_shift(c0, 32, out=t1)
    t1 ^= k1
    t1 &= _MASK32
    c0, c1, c2, c3, t0, t1 = c1, c2, t1, c0, t0, c3  # c1 (zero) holds a spare buffer
    c1_zero = True
    for r in range(1, _PHILOX_ROUNDS):
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
        # c0' = hi(B * c2) ^ c1 ^ k0, c1' = lo(B * c2)
        c2.mul_(_PHILOX_ROUND_B)
        torch.bitwise_right_shift(c2, 32, out=t0)
        if not c1_zero:
            t0 ^= c1
        t0 ^= k0
        if r == _PHILOX_ROUNDS - 1:  # the last round: c0 alone
            break
        t0 &= _MASK32
        # c2' = hi(A * c0) ^ c3 ^ k1, c3' = lo(A * c0)
        c0.mul_(_PHILOX_ROUND_A)
        torch.bitwise_right_shift(c0, 32, out=t1)
        t1 ^= c3
        t1 ^= k1
        t1 &= _MASK32
        c0, c1, c2, c3, t0, t1 = t0, c2, t1, c0, c1, c3
        c1_zero = False
    return t0


def _philox_blocks(seed, total: int, block: int, counters, finish, out: torch.Tensor, device) -> torch.Tensor:
    """``finish(word, out[lo:hi])`` on ``_philox_word`` of ``counters(lo, hi)`` (the int64 counters
    of elements ``lo .. hi`` of ``out``, flat), ``block`` elements at a time, the rounds' buffers
    allocated once."""
    bufs = [torch.empty(min(block, total), dtype=torch.int64, device=device) for _ in range(6)]
    flat_out = out.view(-1)
    for lo in range(0, total, block):
        hi = min(lo + block, total)
        finish(_philox_word(seed, counters(lo, hi), bufs), flat_out[lo:hi])
    return out


@functools.lru_cache(maxsize=64)
def _keep_threshold(dropout_p: float) -> int:
    """The least x in [0, 2**31] with ``float32(x) * float32(2**-31 scale) >= float32(p)`` (2**31: none):
    the uniform is non-decreasing in x (int -> float32 rounding and a positive product are
    monotone), so ``uniform >= p`` is exactly ``x >= threshold``. float32 arithmetic in Python
    floats: the product of two float32 values is exact in float64, then rounded once to float32."""
    f32 = lambda value: struct.unpack("f", struct.pack("f", value))[0]  # noqa: E731
    scale, p = f32(_UNIFORM_SCALE), f32(dropout_p)
    lo, hi = 0, 2**31  # the threshold lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if f32(f32(float(mid)) * scale) >= p:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _keep_from_word(threshold: int, drop: bool = False):
    """The keep test on the word w as ``tl.rand``'s x (w, or ~w where w's bit 31 is set) >= threshold,
    that is w in [threshold, 2**32 - 1 - threshold]: ((w - threshold) mod 2**32) <= 2**32 - 1 - 2 threshold
    (its negation with ``drop``)."""
    compare = torch.gt if drop else torch.le

    def finish(word: torch.Tensor, out: torch.Tensor) -> None:
        word -= threshold
        word &= _MASK32
        compare(word, _MASK32 - 2 * threshold, out=out)
    return finish


def dropout_keep(rng: tuple[int, int], H: int, M: int, N: int, b: torch.Tensor, h: torch.Tensor,
                 rows: torch.Tensor, cols: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The kernels' keep-mask at broadcastable index tensors (batch, head, query, key): counter
    ``offset + ((b * H + h) * M + row) * N + col``, kept where the uniform draw is >= p (fp32)."""
    seed, offset = rng
    counter = offset + ((b * H + h) * M + rows) * N + cols
    out = torch.empty(counter.shape, dtype=torch.bool, device=counter.device)
    flat = counter.reshape(-1)
    return _philox_blocks(seed, flat.shape[0], _philox_block(counter.device, flat.shape[0]), lambda lo, hi: flat[lo:hi],
                          _keep_from_word(_keep_threshold(float(dropout_p))), out, counter.device)


def _chunk_keep(rng, B, H, M, N, start, stop, dropout_p, device, drop: bool = False) -> torch.Tensor:
    """Keep-mask (B, H, M, stop - start) of keys start..stop (its negation with ``drop``): the counters
    of a block of rows at a time."""
    seed, offset = rng
    cols = torch.arange(start, stop, device=device, dtype=torch.int64)
    width = stop - start
    out = torch.empty((B * H * M, width), dtype=torch.bool, device=device)
    if width == 0 or B * H * M == 0:
        return out.view(B, H, M, width)
    rows_per_block = max(1, _philox_block(torch.device(device), B * H * M * width) // width)
    row_base = offset + torch.arange(B * H * M, device=device, dtype=torch.int64) * N
    spare = torch.empty(min(rows_per_block, B * H * M) * width, dtype=torch.int64, device=device)

    def counters(lo, hi):  # built in ``spare``, whole rows: a block holds rows_per_block of them
        return torch.add(row_base[lo // width: hi // width, None], cols[None, :], out=spare[: hi - lo].view(-1, width)).view(-1)

    return _philox_blocks(seed, B * H * M * width, rows_per_block * width, counters,
                          _keep_from_word(_keep_threshold(float(dropout_p)), drop), out, device).view(B, H, M, width)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the PyTorch paths compute (and their LSE is) in for ``dtype`` inputs: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_keys(kv_lens: torch.Tensor | None, B: int, start: int, stop: int, device) -> torch.Tensor | None:
    """(B, 1, 1, chunk) bool: key j of batch b exists."""
    if kv_lens is None:
        return None
    cols = torch.arange(start, stop, device=device)
    return (cols[None, :] < kv_lens.to(device=device, dtype=torch.int64)[:, None])[:, None, None, :]


def clamped_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask in ``dtype`` as every path adds it: finite values clamped at ``MIN_BIAS``
    (or at the lowest finite value of ``dtype`` or of the mask's own dtype, if higher) in the mask's
    own dtype, before the cast (fp64's lowest finite value would become -inf in fp32, and drop a row
    that PyTorch averages); -inf stays -inf."""
    floor = max(MIN_BIAS, torch.finfo(dtype).min, torch.finfo(bias.dtype).min)
    return bias.clamp(min=floor).masked_fill_(bias == float("-inf"), float("-inf")).to(dtype)  # in place: one copy of the mask, not two


def add_bias(s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scores plus an additive mask as the kernels add it: -inf drops the key (even a NaN score),
    finite values are clamped (``clamped_bias``)."""
    if bias is None:
        return s
    bias = clamped_bias(bias, s.dtype)
    return torch.where(bias == float("-inf"), float("-inf"), s + bias)


def attention_dense(q, k, v, kv_lens=None, scale=None, keep=None, dropout_p=0.0, bias=None):
    """Softmax attention with the whole (B, H, M, N) matrix, in the inputs' dtype (tests pass
    float64). ``keep`` (B, H, M, N) bool applies dropout, ``bias`` is an additive mask. Rows
    without keys give zeros."""
    B, N, H, D = k.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    valid = _valid_keys(kv_lens, B, 0, N, k.device)
    if valid is not None:
        real = valid[:, 0, 0, :, None, None]
        k, v = torch.where(real, k, 0.0), torch.where(real, v, 0.0)
    s = add_bias(torch.einsum("bmhd,bnhd->bhmn", q.expand(B, -1, -1, -1), k) * scale, bias)
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(s == float("-inf"), 0.0)
    if keep is not None:
        p = torch.where(keep, p / (1.0 - dropout_p), 0.0)
    return torch.einsum("bhmn,bnhd->bmhd", p, v)


def _chunks(N: int):
    return ((start, min(start + CHUNK, N)) for start in range(0, N, CHUNK))


def _chunk_scores(qc, k, valid, bias, start, stop, scale):
    s = torch.einsum("bmhd,bnhd->bhmn", qc, k[:, start:stop].to(qc.dtype)) * scale
    s = add_bias(s, None if bias is None else bias[..., start:stop])
    return s if valid is None else s.masked_fill(~valid, float("-inf"))


def _chunk_values(v, valid, start, stop, dtype):
    vc = v[:, start:stop].to(dtype)
    return vc if valid is None else vc.masked_fill(~valid[:, 0, 0, :, None, None], 0.0)


def attention_fwd(q, k, v, kv_lens, scale, dropout_p, rng, bias=None):
    """(O in q's dtype, LSE (B, H, M)): online softmax over key chunks of ``CHUNK`` keys."""
    B, N, H, D = k.shape
    M = q.shape[1]
    ct = compute_dtype(q.dtype)
    qc = q.to(ct).expand(B, -1, -1, -1)
    m = torch.full((B, H, M), float("-inf"), dtype=ct, device=q.device)
    l = torch.zeros((B, H, M), dtype=ct, device=q.device)
    acc = torch.zeros((B, H, M, D), dtype=ct, device=q.device)
    for start, stop in _chunks(N):
        valid = _valid_keys(kv_lens, B, start, stop, q.device)
        s = _chunk_scores(qc, k, valid, bias, start, stop, scale)
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        l = l * alpha + p.sum(-1)
        if dropout_p > 0:  # in place: torch.where(keep, p / (1 - dropout_p), 0.0), bit for bit
            p.div_(1.0 - dropout_p).masked_fill_(_chunk_keep(rng, B, H, M, N, start, stop, dropout_p, q.device, drop=True), 0.0)
        acc = acc * alpha[..., None] + p @ _chunk_values(v, valid, start, stop, ct).permute(0, 2, 1, 3)
        m = m_new
    has_keys = l != 0  # NaN (a NaN in the mask) too, as the kernels' ``store_output``
    out = acc / torch.where(has_keys, l, 1.0)[..., None]
    lse = torch.where(has_keys, m + torch.log(torch.where(has_keys, l, 1.0)), float("inf"))
    return out.permute(0, 2, 1, 3).to(q.dtype).contiguous(), lse


def keys_without_nan(k: torch.Tensor) -> torch.Tensor:
    """K as a masked backward reads it, NaN as zero (this path's dQ, and the kernels' whole backward,
    ``attention._backward_on_kernels``): a key a mask drops has P = dS = 0 and NaN in its k is
    ignored (docs/masks.md), but dQ = dS K would give 0 * NaN = NaN; a row that attends a key with
    NaN in k has a NaN LSE from the forward, so its P and dS stay NaN whatever S is recomputed from."""
    return torch.where(k == k, k, 0.0)


def attention_bwd(dout, q, k, v, out, lse, kv_lens, scale, dropout_p, rng, bias=None):
    """(dq, dk, dv): each key chunk's probabilities recomputed from the LSE,
    dS = P o (dP - rowsum(dO o O)). dq of a shared (1, M, H, D) q is summed over the batch."""
    B, N, H, D = k.shape
    M = q.shape[1]
    ct = compute_dtype(q.dtype)
    qc = q.to(ct).expand(B, -1, -1, -1)
    do = dout.to(ct).permute(0, 2, 1, 3)
    delta = (do * out.to(ct).permute(0, 2, 1, 3)).sum(-1)
    dq = torch.zeros((B, H, M, D), dtype=ct, device=q.device)
    dk = torch.zeros((B, N, H, D), dtype=ct, device=q.device)
    dv = torch.zeros((B, N, H, D), dtype=ct, device=q.device)
    for start, stop in _chunks(N):
        valid = _valid_keys(kv_lens, B, start, stop, q.device)
        p = torch.exp(_chunk_scores(qc, k, valid, bias, start, stop, scale) - lse.to(ct)[..., None])
        vc = _chunk_values(v, valid, start, stop, ct).permute(0, 2, 1, 3)
        dp = do @ vc.transpose(-1, -2)
        pz = p
        if dropout_p > 0:  # torch.where(keep, x / (1 - dropout_p), 0.0), bit for bit
            drop = _chunk_keep(rng, B, H, M, N, start, stop, dropout_p, q.device, drop=True)
            pz = (p / (1.0 - dropout_p)).masked_fill_(drop, 0.0)
            dp.div_(1.0 - dropout_p).masked_fill_(drop, 0.0)
        ds = p * (dp - delta[..., None]) * scale
        kc = k[:, start:stop].to(ct).permute(0, 2, 1, 3)
        if valid is not None:
            kc = kc.masked_fill(~valid[:, :, 0, :, None], 0.0)
        dq += ds @ (kc if bias is None else keys_without_nan(kc))
        dk[:, start:stop] = (ds.transpose(-1, -2) @ qc.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        dv[:, start:stop] = (pz.transpose(-1, -2) @ do).permute(0, 2, 1, 3)
    dq = dq.permute(0, 2, 1, 3)
    if q.shape[0] == 1 and B > 1:
        dq = dq.sum(0, keepdim=True)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype), dv.to(v.dtype)


def attention_weights(q, k, lse, kv_lens, scale, dropout_p, rng, bias, average: bool) -> torch.Tensor:
    """The forward's probabilities ``softmax(S + bias)`` (with its dropout mask) in q's dtype:
    (B, M, N) averaged over the heads, or (B, H, M, N). Rows without keys (an infinite LSE) are
    zeros. Each row is normalised by its own sum, as eager softmax is, not as ``exp(S - LSE)``: an
    fp32 LSE is off by up to half its ulp, 4e-6 of every weight at logits near 100, and the
    softmax backward through the weights turns a row sum off 1 into gradient error."""
    B, N, H, _ = k.shape
    M = q.shape[1]
    ct = compute_dtype(q.dtype)
    valid = _valid_keys(kv_lens, B, 0, N, q.device)
    s = _chunk_scores(q.to(ct).expand(B, -1, -1, -1), k, valid, bias, 0, N, scale)
    w = torch.where(torch.isposinf(lse.to(ct))[..., None], 0.0, torch.softmax(s, -1))
    if dropout_p > 0:
        w = torch.where(_chunk_keep(rng, B, H, M, N, 0, N, dropout_p, q.device), w / (1.0 - dropout_p), 0.0)
    return (w.mean(1) if average else w).to(q.dtype)


def weights_backward(dw, p, q, k, kv_lens, scale, dropout_p, rng, average: bool):
    """(dq, dk) through ``attention_weights``: softmax's backward dS = P o (dP - rowsum(dP o P)) from
    the per-head probabilities ``p`` (B, H, M, N) without dropout, dP = dW (spread over the heads
    when averaged) through the dropout mask. dq of a shared (1, M, H, D) q is summed over the batch."""
    B, N, H, _ = k.shape
    M = q.shape[1]
    ct = compute_dtype(q.dtype)
    p = p.to(ct)
    dp = (dw.to(ct)[:, None] / H) if average else dw.to(ct)
    if dropout_p > 0:
        dp = torch.where(_chunk_keep(rng, B, H, M, N, 0, N, dropout_p, q.device), dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    valid = _valid_keys(kv_lens, B, 0, N, q.device)
    kc = k.to(ct) if valid is None else k.to(ct).masked_fill(~valid[:, 0, 0, :, None, None], 0.0)  # padding may hold NaN
    dq = torch.einsum("bhmn,bnhd->bmhd", ds, keys_without_nan(kc))
    if q.shape[0] == 1 and B > 1:
        dq = dq.sum(0, keepdim=True)
    dk = torch.einsum("bhmn,bmhd->bnhd", ds, q.to(ct).expand(B, -1, -1, -1))
    # einsum lays its results out in its own order; the op promises contiguous gradients (its fake
    # implementation, from which Inductor plans and asserts the strides)
    return dq.contiguous().to(q.dtype), dk.contiguous().to(k.dtype)


def unpack_keys(k: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (total_N, H, D) keys -> padded (B, max_seqlen, H, D), their lengths (B,) and the
    (B, max_seqlen) bool mask of real positions (padding rows are zeros)."""
    cu = cu_seqlens_k.to(device=k.device, dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    pos = torch.arange(max_seqlen, device=k.device)
    real = pos[None, :] < lens[:, None]
    if k.device.type == "cpu" and type(k) in PLAIN_TENSORS and type(cu) is torch.Tensor:
        # the offsets read on the host (no sync on the CPU): one slice copy per sequence into zeros,
        # the same tensor as the gather below, ~4x faster than it (its index op plus a ``where`` pass)
        padded = k.new_zeros((lens.shape[0], max_seqlen, *k.shape[1:]))
        for b, (start, stop) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            padded[b, : stop - start] = k[start:stop]
        return padded, lens, real
    index = torch.where(real, cu[:-1, None] + pos[None, :], 0)
    padded = torch.where(real[..., None, None], k[index], 0.0)
    return padded, lens, real


def pack_keys(padded: torch.Tensor, cu_seqlens_k: torch.Tensor, real: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of ``unpack_keys`` for gradients: rows of no sequence get zeros."""
    cu = cu_seqlens_k.to(device=padded.device, dtype=torch.int64)
    pos = torch.arange(padded.shape[1], device=padded.device)
    packed = padded.new_zeros((total, *padded.shape[2:]))
    packed[(cu[:-1, None] + pos[None, :])[real]] = padded[real]
    return packed
