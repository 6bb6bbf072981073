"""FLOPs and fewest bytes of a whole op, forward ("fwd") and forward + backward ("fwd_bwd"),
composed from the per-kernel formulas that live next to each launcher in ``kernels/``.

Conventions (the same counts credit deco_ops and every baseline, so TFLOP/s and GB/s compare):

* FLOPs are matrix-multiply FLOPs, 2 per multiply-add. Pooling sums, bias adds, activations and
  softmax exponentials are not counted (they are < 1% of the GEMM FLOPs at every named shape).
* Attention (FlashAttention's convention): forward ``4*B*M*N*H*D`` (QK^T and PV, the formula of
  ``kernels/cross_attention_fwd.py``), backward ``10*B*M*N*H*D`` (recomputed QK^T, dV, dP, dQ, dK,
  whatever schedule the kernel picks); with ``kv_lens`` only valid keys count
  (``N`` -> ``sum(kv_lens) / B``), i.e. the useful work.
* pool+MLP backward: dZ = dY W2, dW2 = dY^T act, dW1 = dZ^T pooled, and when the tokens need a
  gradient d(pooled) = dZ W1: ``2 * fwd`` with the token gradient, ``2*fwd - 2*M*C*hidden`` with
  a frozen vision tower (the default here, as in LLaVA training).
* Bytes are the fewest any implementation must move through device memory: every input read
  once, every output written once, nothing intermediate (a fully fused op keeps the hidden
  activations and the attention matrix on chip). Forward+backward counts the op as one: inputs
  (and the output gradient) read once, outputs (and the gradients) written once. Achieved GB/s
  from these is therefore a lower bound on the traffic the code really generates.
"""

from __future__ import annotations

from deco_ops.kernels import adaptive_pool, gemm_act_grad, merge_gemm, pool_gemm

from deco_ops.kernels.cross_attention_fwd import flops as _attention_fwd_flops

ATTENTION_BWD_FACTOR = 10


def _bias_bytes(n: int, bias: bool) -> int:
    return n if bias else 0


# ----------------------------------------------------------------------------------------------
# pool -> Linear -> act -> Linear


def pool_tokens_shape(s, elem: int, direction: str) -> int:
    """Fewest bytes of ``adaptive_avg_pool_tokens`` at shape ``s`` (a pool+MLP shape's batch, grids
    and ``in_features``): pooling reads the tokens and writes the pooled cells; with the backward,
    un-pooling reads the pooled gradient and writes the tokens' gradient, the same count again."""
    one_way = adaptive_pool.pool_bytes(s.batch, s.tokens, s.pooled, s.in_features, elem)
    return one_way if direction == "fwd" else 2 * one_way


def pool_mlp(B: int, tokens: int, pooled: int, C: int, hidden: int, out: int, elem: int, *,
             direction: str, tokens_grad: bool = False, bias: bool = True) -> tuple[int, int]:
    """(flops, bytes) of ``Linear2(act(Linear1(pool(x))))`` on ``x`` of ``(B, tokens, C)``."""
    M = B * pooled
    fwd_flops = pool_gemm.flops(M, hidden, C) + 2 * M * hidden * out
    weights = hidden * C + _bias_bytes(hidden, bias) + out * hidden + _bias_bytes(out, bias)
    x_and_pool = adaptive_pool.pool_bytes(B, tokens, 0, C, elem)  # read the tokens once
    fwd_bytes = x_and_pool + (weights + M * out) * elem
    if direction == "fwd":
        return fwd_flops, fwd_bytes
    if direction != "fwd_bwd":
        raise ValueError(direction)
    bwd_flops = (
        gemm_act_grad.flops(M, hidden, out)  # dZ = (dY @ W2) * act'(Z), act(Z) rebuilt
        + 2 * M * out * hidden  # dW2 = dY^T act(Z)
        + 2 * M * hidden * C  # dW1 = dZ^T pooled
        + (2 * M * hidden * C if tokens_grad else 0)  # d(pooled) = dZ W1, then un-pooled
    )
    # read dY; write dW1, db1, dW2, db2 (and dX)
    bwd_bytes = (M * out + weights + (B * tokens * C if tokens_grad else 0)) * elem
    return fwd_flops + bwd_flops, fwd_bytes + bwd_bytes


def mlp_pool(B: int, tokens: int, pooled: int, C: int, hidden: int, out: int, elem: int, *,
             direction: str, tokens_grad: bool = False, bias: bool = True, fused: bool = True) -> tuple[int, int]:
    """Project-then-pool. ``fused=True``: the second GEMM runs on pooled rows only (the pool
    weights sum to one, so pool(Linear2(h)) == Linear2(pool(h))) -- deco_ops' algorithm.
    ``fused=False``: the eager order (both GEMMs on every token), for the FLOP saving."""
    rows1 = B * tokens
    rows2 = B * pooled if fused else B * tokens
    fwd_flops = 2 * rows1 * hidden * C + 2 * rows2 * out * hidden
    weights = hidden * C + _bias_bytes(hidden, bias) + out * hidden + _bias_bytes(out, bias)
    fwd_bytes = (B * tokens * C + weights + B * pooled * out) * elem
    if direction == "fwd":
        return fwd_flops, fwd_bytes
    bwd_flops = 2 * rows2 * out * hidden * 2 + 2 * rows1 * hidden * C + (2 * rows1 * hidden * C if tokens_grad else 0)
    bwd_bytes = (B * pooled * out + weights + (B * tokens * C if tokens_grad else 0)) * elem
    return fwd_flops + bwd_flops, fwd_bytes + bwd_bytes


def pool_mlp_shape(shape, elem: int, direction: str, tokens_grad: bool = False) -> tuple[int, int]:
    return pool_mlp(shape.batch, shape.tokens, shape.pooled, shape.in_features, shape.hidden, shape.out_features,
                    elem, direction=direction, tokens_grad=tokens_grad)


def packed_shape(shape, elem: int, direction: str, tokens_grad: bool = False) -> tuple[int, int]:
    """A packed batch is one B=1 pool_mlp over all tokens (the window structure does not change the counts)."""
    return pool_mlp(1, shape.tokens, shape.pooled, shape.in_features, shape.hidden, shape.out_features,
                    elem, direction=direction, tokens_grad=tokens_grad)


def mlp_pool_shape(shape, elem: int, direction: str, tokens_grad: bool = False, fused: bool = True) -> tuple[int, int]:
    return mlp_pool(shape.batch, shape.tokens, shape.pooled, shape.in_features, shape.hidden, shape.out_features,
                    elem, direction=direction, tokens_grad=tokens_grad, fused=fused)


def merge_mlp_shape(shape, elem: int, direction: str, tokens_grad: bool = False) -> tuple[int, int]:
    """(flops, bytes) of ``Linear2(act(Linear1(norm(merge(x)))))``. The norm's arithmetic is not
    counted (as pooling's is not); its parameters are trained, so backward always computes
    d(norm output) = dZ W1, the token gradient only with ``tokens_grad``."""
    M, K = shape.merged, shape.merge * shape.merge * shape.in_features
    hidden, out = shape.hidden, shape.out_features
    norm_params = 2 * (shape.in_features if shape.norm_position == "pre" else K)
    weights = norm_params + hidden * K + hidden + out * hidden + out
    fwd_flops = merge_gemm.flops(M, hidden, K) + 2 * M * hidden * out
    fwd_bytes = (M * K + weights + M * out) * elem
    if direction == "fwd":
        return fwd_flops, fwd_bytes
    if direction != "fwd_bwd":
        raise ValueError(direction)
    bwd_flops = gemm_act_grad.flops(M, hidden, out) + 2 * M * out * hidden + 2 * M * hidden * K * 2
    bwd_bytes = (M * out + weights + (M * K if tokens_grad else 0)) * elem
    return fwd_flops + bwd_flops, fwd_bytes + bwd_bytes


# ----------------------------------------------------------------------------------------------
# cross-attention


def cross_attention(B: int, M: int, N: int, H: int, D: int, elem: int, *, direction: str,
                    shared_q: bool = False, kv_lens=None) -> tuple[int, int]:
    """(flops, bytes) of softmax(Q K^T * scale) V with ``M`` queries over ``N`` keys per batch entry.

    Bytes: read Q (once if shared), the valid part of K and V; write O and the fp32 log-sum-exp.
    Backward reads Q, K, V, O, dO and the LSE and writes dQ, dK, dV.
    """
    n_total = sum(int(n) for n in kv_lens) if kv_lens is not None else B * N
    qB = 1 if shared_q else B
    fwd_flops = _attention_fwd_flops(1, H, M, n_total, D)  # = 4 * sum_b(valid keys_b) * M * H * D
    q = qB * M * H * D
    kv = 2 * n_total * H * D
    o = B * M * H * D
    lse = B * H * M * 4
    fwd_bytes = (q + kv + o) * elem + lse
    if direction == "fwd":
        return fwd_flops, fwd_bytes
    if direction != "fwd_bwd":
        raise ValueError(direction)
    # the op's minimal backward (one pass: recomputed S, dV, dP, dQ, dK). The two-pass schedule of
    # kernels/cross_attention_bwd.py recomputes S once more (14x) for large M; it is not credited.
    bwd_flops = ATTENTION_BWD_FACTOR * M * n_total * H * D
    bwd_bytes = (q + kv + o + o) * elem + lse + (q + kv) * elem  # read q,k,v,o,dO,lse; write dq,dk,dv
    return fwd_flops + bwd_flops, fwd_bytes + bwd_bytes


def cross_attention_shape(shape, elem: int, direction: str) -> tuple[int, int]:
    return cross_attention(shape.batch, shape.M, shape.N, shape.heads, shape.head_dim, elem, direction=direction,
                           shared_q=shape.shared_q, kv_lens=shape.kv_lens)


def saved_bytes_eager_attention(B: int, M: int, N: int, H: int, elem: int) -> int:
    """What eager softmax attention keeps for backward beyond its inputs: the M x N probabilities."""
    return B * H * M * N * elem
