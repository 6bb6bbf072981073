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

import math

import torch

CHUNK = 1024
MIN_BIAS = -1e30  # the kernels' clamp of finite additive biases (kernels/cross_attention_fwd.py)

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * b for a uint32 constant and uint32 values held in int64,
    splitting b in 16-bit halves so no product overflows int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo, p_hi = a * b_lo, a * b_hi
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return high, low


def philox_uniform(seed: int, counter: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """``tl.rand(seed, counter)`` for an int64 ``counter`` tensor: float32 uniforms in [0, 1)."""
    c0, c1 = counter & _MASK32, (counter >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_keep(rng: tuple[int, int], H: int, M: int, N: int, b: torch.Tensor, h: torch.Tensor,
                 rows: torch.Tensor, cols: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """The kernels' keep-mask at broadcastable index tensors (batch, head, query, key): counter
    ``offset + ((b * H + h) * M + row) * N + col``, kept where the uniform draw is >= p (fp32)."""
    seed, offset = rng
    counter = offset + ((b * H + h) * M + rows) * N + cols
    return philox_uniform(seed, counter) >= torch.tensor(dropout_p, dtype=torch.float32)


def _chunk_keep(rng, B, H, M, N, start, stop, dropout_p, device) -> torch.Tensor:
    """Keep-mask (B, H, M, stop - start) of keys start..stop."""
    ar = lambda n: torch.arange(n, device=device, dtype=torch.int64)  # noqa: E731
    cols = torch.arange(start, stop, device=device, dtype=torch.int64)
    return dropout_keep(rng, H, M, N, ar(B)[:, None, None, None], ar(H)[None, :, None, None],
                        ar(M)[None, None, :, None], cols[None, None, None, :], dropout_p)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
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
    return torch.where(bias == float("-inf"), bias, bias.clamp(min=floor)).to(dtype)


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
    ct = _compute_dtype(q.dtype)
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
        if dropout_p > 0:
            p = torch.where(_chunk_keep(rng, B, H, M, N, start, stop, dropout_p, q.device), p / (1.0 - dropout_p), 0.0)
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
    ct = _compute_dtype(q.dtype)
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
        if dropout_p > 0:
            keep = _chunk_keep(rng, B, H, M, N, start, stop, dropout_p, q.device)
            pz = torch.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = torch.where(keep, dp / (1.0 - dropout_p), 0.0)
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
    ct = _compute_dtype(q.dtype)
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
    ct = _compute_dtype(q.dtype)
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
    if k.device.type == "cpu" and type(k) in (torch.Tensor, torch.nn.Parameter) and type(cu) is torch.Tensor:
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
