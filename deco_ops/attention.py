"""``cross_attention``: FlashAttention-style cross-attention for few queries over many keys
(Q-Former / resampler), forward and deterministic backward.

Registered as ``torch.ops.deco.cross_attention`` (returns the output and the log-sum-exp) with its
backward as its own op, ``torch.ops.deco.cross_attention_backward``, so both are opaque,
graph-break-free nodes under ``torch.compile``. What autograd keeps: q, k, v, the output and the
fp32 LSE (B, H, M), plus the int lengths and the (seed, offset) of the dropout RNG. Never the
M x N attention matrix, never the dropout mask: backward recomputes both.

Masks: ``attn_mask`` (SDPA's convention) reaches every path as one additive bias, a (B, H, M, N)
view whose broadcast dims have stride 0 (a bool mask becomes a 0 / -inf float tensor at its own
size first); the kernels add it per key block (``HAS_BIAS``), the reference path per key chunk,
SDPA as its ``attn_mask``. ``need_weights``: the probabilities ``exp(S + bias - LSE)`` from the
saved LSE, each row divided by its sum (``kernels/cross_attention_weights.py``), op
``torch.ops.deco.cross_attention_weights``.

Strategies (``deco_ops.strategy``): the kernels below, or the composed twin on SDPA's own kernels
(``deco_ops.composed_attention``), which returns the same O and LSE, so either backward follows
either forward; on the PyTorch backend ``auto`` runs the twin. The forward has one more candidate,
``fused_tma`` (``kernels/cross_attention_tma.py``: TMA descriptors, warp-specialised 128-query
tiles; Hopper, 16-bit, no dropout or mask, ``_tma_applies``), opt-in until a GPU has measured it:
it runs only under ``use_strategy("fused_tma")`` / ``DECO_OPS_STRATEGY=fused_tma``.

Backends (``deco_ops._backend``): the Triton kernels in ``kernels/cross_attention_fwd.py`` and
``kernels/cross_attention_bwd.py``, or the PyTorch reference path of
``deco_ops.reference_attention`` (key chunks with an online softmax), which reproduces the kernels'
dropout mask bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from . import _autocast, _backend, _checkpoint, _plan, composed_attention, strategy
from ._direct import custom_op, deco, register_autograd
from . import _validate_attention as _check
from . import reference_attention as reference
from ._transfer import to_device
from ._validate import tracing_state as _tracing_state  # None outside ``torch.jit.trace``
from .kernels import _tuning, cross_attention_bwd, cross_attention_fwd, cross_attention_tma, cross_attention_weights


def _batch_and_keys(k: torch.Tensor, cu_seqlens_k: torch.Tensor | None, max_seqlen_k: int) -> tuple[int, int]:
    if cu_seqlens_k is None:
        return k.shape[0], k.shape[1]
    return cu_seqlens_k.shape[0] - 1, max_seqlen_k


def _rng_pair(rng: torch.Tensor | None) -> tuple[int, int] | tuple[torch.Tensor, torch.Tensor] | None:
    """The dropout stream (seed, offset) for the PyTorch paths: Python ints, or 0-d tensors where
    ``rng`` has no values to read (a FakeTensor while torch.compile or opcheck traces the op, which
    failed on the H200 as a data-dependent read, or a meta draw: meta tensors have no values); the
    reference's Philox draws the same from either."""
    if rng is None:
        return None
    if type(rng) is not torch.Tensor or rng.is_meta:
        return rng[0], rng[1]
    return tuple(int(x) for x in rng.tolist())


def _padded(k, v, kv_lens, cu_seqlens_k, N):
    """Keys for the PyTorch paths: packed keys become (B, N, H, D) with zeros past each length;
    (k, v, lengths, real-position mask or None)."""
    if cu_seqlens_k is None:
        return k, v, kv_lens, None
    kp, lens, real = reference.unpack_keys(k, cu_seqlens_k, N)
    vp, _, _ = reference.unpack_keys(v, cu_seqlens_k, N)
    return kp, vp, lens, real


def _key(op, q, B, N, kv_lens, cu_seqlens_k, attn_bias, needs_grad, **more) -> str:
    _, M, H, D = q.shape
    mask = "packed" if cu_seqlens_k is not None else "lens" if kv_lens is not None else "none"
    mask += "+bias" if attn_bias is not None else ""
    return strategy.make_key(op, q.device, q.dtype, needs_grad, batch=strategy.bucket(B), M=strategy.bucket(M),
                             N=strategy.bucket(N), H=H, D=D, q="shared" if q.shape[0] == 1 else "per-batch", mask=mask, **more)


def _composed_candidates(q, kv_lens, cu_seqlens_k, attn_bias, dropout_p, runs, deterministic=lambda kernel: True):
    """The strategy's candidates for the composed kernels that express this call (see
    ``composed_attention.kernels``): ``runs[kernel]`` computes the call with that kernel."""
    masked = kv_lens is not None or cu_seqlens_k is not None or attn_bias is not None
    return {kernel: strategy.Candidate(runs[kernel], deterministic(kernel))
            for kernel in composed_attention.kernels(q, masked, dropout_p)}


def _cross_attention_kernels(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    return cross_attention_fwd.cross_attention_fwd(q, k, v, kv_lens, cu_seqlens_k, B, N, scale, dropout_p, rng, attn_bias)


def _cross_attention_tma(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
    """The TMA forward, or the pointer kernels for tensors a descriptor cannot read: a plan keeps
    the choice made for its first call, and its key holds no strides or addresses (a later call
    of the same signature may pass a misaligned view)."""
    if not all(map(cross_attention_tma.tma_addressable, (q, k, v))):
        return _cross_attention_kernels(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse)
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    return cross_attention_tma.cross_attention_tma_fwd(q, k, v, kv_lens, cu_seqlens_k, B, N, scale)


def _tma_applies(q, k, v, kv_lens, cu_seqlens_k, dropout_p, attn_bias) -> bool:
    """Whether the ``fused_tma`` forward can run the call: the Triton backend on an sm_90 GPU (or its
    interpreter), fp16/bf16, no dropout and no additive mask (per-tile work its mask-free key loop
    leaves out), every tensor readable through TMA descriptors (16-byte aligned, unit dim stride), a
    tile that fits the GPU's shared memory (head dims up to 128: ``cross_attention_tma.applies``)."""
    _, M, H, D = q.shape
    return (_tuning.device_arch(q.device) == 90 and q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
            and attn_bias is None and all(map(cross_attention_tma.tma_addressable, (q, k, v)))
            and cross_attention_tma.applies(M, H, D, q.element_size(), _tuning.device_smem_limit(q.device),
                                            ragged=kv_lens is not None or cu_seqlens_k is not None))


def _cross_attention_reference(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
    kp, vp, lens, _ = _padded(k, v, kv_lens, cu_seqlens_k, max_seqlen_k)
    return reference.attention_fwd(q, kp, vp, lens, scale, dropout_p, _rng_pair(rng), attn_bias)


def _composed_forward(kernel: str):
    """``deco::cross_attention`` by the composed ``kernel``; the LSE only where ``need_lse``."""

    def composed_forward(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
        if cu_seqlens_k is not None and kernel == "composed" and composed_attention.per_sequence(k, None, cu_seqlens_k, max_seqlen_k):
            return composed_attention.ragged_forward(q, k, v, None, cu_seqlens_k, scale, attn_bias, need_lse)
        if cu_seqlens_k is not None:
            k, v, kv_lens, _ = _padded(k, v, kv_lens, cu_seqlens_k, max_seqlen_k)
        return composed_attention.forward(q, k, v, kv_lens, scale, kernel=kernel, bias=attn_bias, need_lse=need_lse)

    return composed_forward


_COMPOSED_FORWARD = {kernel: _composed_forward(kernel) for kernel in composed_attention.KERNELS}


def _cross_attention_implementation(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
    """The function that runs ``deco::cross_attention`` on these arguments (the strategy's choice):
    the kernels (the reference path on the PyTorch backend) or a composed twin on SDPA. It returns
    (out, lse) where ``need_lse``, else out and anything (the op's body puts the schema's empty
    tensor in its place)."""
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    on_triton = _backend.use_triton(q.device)
    return strategy.implementation(
        (q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse), on_triton=on_triton,
        key=lambda: _key("cross_attention", q, B, N, kv_lens, cu_seqlens_k, attn_bias, need_lse),
        fused=_cross_attention_kernels if on_triton else _cross_attention_reference,
        composed_kernels={
            **({"fused_tma": strategy.Candidate(_cross_attention_tma, opt_in=True)}
               if on_triton and _tma_applies(q, k, v, kv_lens, cu_seqlens_k, dropout_p, attn_bias) else {}),
            **_composed_candidates(q, kv_lens, cu_seqlens_k, attn_bias, dropout_p, _COMPOSED_FORWARD),
        },
    )


@custom_op("cross_attention")
def _cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); ``need_lse``: whether anything reads the LSE (a backward, the weights), decided
    by the caller, where grad mode and ``requires_grad`` are known (under torch.compile this body
    runs on detached inputs inside a graph that has a backward). Without it the LSE is an empty
    (0,) tensor and the composed twins make the cheapest SDPA call."""
    args = (q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse)
    out, lse = _cross_attention_implementation(*args)(*args)
    return out, lse if need_lse else q.new_empty((0,))


@_cross_attention.register_fake
def _(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse):
    B, _ = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    _, M, H, D = q.shape
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((B, M, H, D)), q.new_empty((B, H, M) if need_lse else (0,), dtype=stat_dtype if need_lse else q.dtype)


def _or_empty(grad: torch.Tensor | None, needed: bool, like: torch.Tensor) -> torch.Tensor:
    """A gradient that was asked for, else a fresh empty (0,) tensor (outputs may not alias)."""
    return grad if needed else like.new_empty((0,))


def _returned(grads, need_dq: bool, need_dkv: bool, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``deco::cross_attention_backward``'s outputs from (dq, dk, dv): a gradient not asked for
    comes back as an empty (0,) tensor."""
    dq, dk, dv = grads
    return _or_empty(dq, need_dq, q), _or_empty(dk, need_dkv, q), _or_empty(dv, need_dkv, q)


def _packed_grads(grads, k, v, cu_seqlens_k, real):
    """(dq, dk, dv) computed on keys padded by ``_padded``, with dk and dv packed back where the keys were packed."""
    dq, dk, dv = grads
    if cu_seqlens_k is None or dk is None:
        return grads
    return dq, reference.pack_keys(dk, cu_seqlens_k, real, k.shape[0]), reference.pack_keys(dv, cu_seqlens_k, real, v.shape[0])


def _backward_on_kernels(one_kernel: bool):
    """``deco::cross_attention_backward`` on the gradient kernels; ``one_kernel``: many queries'
    dQ added up by float atomics inside the dK/dV kernel (``fused_one_kernel``) instead of the FA2
    dQ kernel."""

    def backward_kernels(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv,
                         attn_bias):
        B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
        if attn_bias is not None and need_dq:  # one elementwise pass over K: NaN at masked keys must not reach dQ
            k = reference.keys_without_nan(k)
        grads = cross_attention_bwd.cross_attention_bwd(
            dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, B, N, scale, dropout_p, rng, need_dq, need_dkv, attn_bias,
            one_kernel=one_kernel)
        return _returned(grads, need_dq, need_dkv, q)

    return backward_kernels


_backward_kernels, _backward_one_kernel = _backward_on_kernels(False), _backward_on_kernels(True)


def _backward_reference(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv, attn_bias):
    kp, vp, lens, real = _padded(k, v, kv_lens, cu_seqlens_k, max_seqlen_k)
    grads = reference.attention_bwd(dout, q, kp, vp, out, lse, lens, scale, dropout_p, _rng_pair(rng), attn_bias)
    return _returned(_packed_grads(grads, k, v, cu_seqlens_k, real), need_dq, need_dkv, q)


def _composed_backward(kernel: str):
    """``deco::cross_attention_backward`` by the composed ``kernel``."""

    def composed_backward(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv,
                          attn_bias):
        if cu_seqlens_k is not None and kernel == "composed" and composed_attention.per_sequence(k, None, cu_seqlens_k, max_seqlen_k):
            grads = composed_attention.ragged_backward(dout, q, k, v, out, lse, None, cu_seqlens_k, scale, need_dq, need_dkv, attn_bias)
            return _returned(grads, need_dq, need_dkv, q)
        kp, vp, lens, real = _padded(k, v, kv_lens, cu_seqlens_k, max_seqlen_k)
        grads = composed_attention.backward(dout, q, kp, vp, out, lse, lens, scale, need_dq, need_dkv, kernel=kernel, bias=attn_bias)
        return _returned(_packed_grads(grads, k, v, cu_seqlens_k, real), need_dq, need_dkv, q)

    return composed_backward


_COMPOSED_BACKWARD = {kernel: _composed_backward(kernel) for kernel in composed_attention.KERNELS}


def _backward_implementation(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv,
                             attn_bias):
    """The function that runs ``deco::cross_attention_backward`` on these arguments (the strategy's choice)."""
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    on_triton = _backend.use_triton(q.device)
    return strategy.implementation(
        (dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv, attn_bias),
        on_triton=on_triton,
        key=lambda: _key("cross_attention_backward", q, B, N, kv_lens, cu_seqlens_k, attn_bias, True,
                         need=f"{'q' * need_dq}{'kv' * need_dkv}"),
        fused=_backward_kernels if on_triton else _backward_reference,
        composed_kernels={
            # not deterministic: never run in deterministic mode, forced or not (strategy.choose)
            **({"fused_one_kernel": strategy.Candidate(_backward_one_kernel, deterministic=False, opt_in=True)}
               if on_triton and cross_attention_bwd.one_kernel_applies(q.shape[1], q.shape[3], q.element_size(), need_dq, need_dkv)
               else {}),
            **_composed_candidates(q, kv_lens, cu_seqlens_k, attn_bias, dropout_p, _COMPOSED_BACKWARD,
                                   composed_attention.deterministic_backward),
        },
    )


@custom_op("cross_attention_backward", plan=_backward_implementation)
def _cross_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    need_dq: bool,
    need_dkv: bool,
    attn_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv); a gradient not asked for comes back as an empty (0,) tensor."""
    args = (dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv, attn_bias)
    return _backward_implementation(*args)(*args)


@_cross_attention_backward.register_fake
def _(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, need_dq, need_dkv, attn_bias):
    dq = _or_empty(q.new_empty(q.shape), need_dq, q)
    return dq, _or_empty(k.new_empty(k.shape), need_dkv, q), _or_empty(v.new_empty(v.shape), need_dkv, q)


def _setup(ctx, inputs, output):
    q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_lens, cu_seqlens_k, rng, attn_bias)
    ctx.max_seqlen_k, ctx.scale, ctx.dropout_p, ctx.need_lse = max_seqlen_k, scale, dropout_p, need_lse
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    """The LSE output is an auxiliary statistic: its gradient is not propagated. Gradients that
    nothing produced arrive as None (no zero-filled tensors). The additive mask gets none (the
    public function refuses one that requires grad)."""
    need_dq = ctx.needs_input_grad[0]
    need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if dout is None or not (need_dq or need_dkv):  # before the unpack, which checks the saved tensors' versions:
        return (None,) * 11  # the output changed in place, then only the weights differentiated (eager MHA runs it)
    q, k, v, out, lse, kv_lens, cu_seqlens_k, rng, attn_bias = ctx.saved_tensors
    if not ctx.need_lse:
        raise RuntimeError("deco::cross_attention ran with need_lse=False; call deco_ops.cross_attention to differentiate it")
    dq, dk, dv = deco.cross_attention_backward(
        dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, ctx.max_seqlen_k, ctx.scale, ctx.dropout_p, rng, need_dq, need_dkv,
        attn_bias,
    )
    return (dq if need_dq else None), (dk if need_dkv else None), (dv if need_dkv else None), *(None,) * 8


register_autograd(_cross_attention, _backward, _setup)


@custom_op("cross_attention_weights")
def _cross_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    average: bool,
) -> torch.Tensor:
    """The forward's attention probabilities from its LSE: (B, M, N) averaged over heads or (B, H, M, N)."""
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    if _backend.use_triton(q.device):
        return cross_attention_weights.cross_attention_weights(
            q, k, lse, kv_lens, cu_seqlens_k, B, N, scale, dropout_p, rng, attn_bias, average)
    kp, _, lens, _ = _padded(k, k, kv_lens, cu_seqlens_k, N)
    return reference.attention_weights(q, kp, lse, lens, scale, dropout_p, _rng_pair(rng), attn_bias, average)


@_cross_attention_weights.register_fake
def _(q, k, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, average):
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    _, M, H, _ = q.shape
    return q.new_empty((B, M, N) if average else (B, H, M, N))


def _weights_setup(ctx, inputs, output):
    q, k, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, average = inputs
    ctx.save_for_backward(q, k, lse, kv_lens, cu_seqlens_k, rng, attn_bias)
    ctx.max_seqlen_k, ctx.scale, ctx.dropout_p, ctx.average = max_seqlen_k, scale, dropout_p, average


@custom_op("cross_attention_weights_backward")
def _cross_attention_weights_backward(
    dw: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    kv_lens: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_k: int,
    scale: float,
    dropout_p: float,
    rng: torch.Tensor | None,
    attn_bias: torch.Tensor | None,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq, dk) through the weights: softmax's backward (``reference.weights_backward``, PyTorch on
    the M x N matrix the weights already are) from the per-head probabilities, recomputed."""
    B, N = _batch_and_keys(k, cu_seqlens_k, max_seqlen_k)
    kp, _, lens, real = _padded(k, k, kv_lens, cu_seqlens_k, N)
    p = deco.cross_attention_weights.body(q, k, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, 0.0, None, attn_bias, False)
    dq, dk = reference.weights_backward(dw, p, q, kp, lens, scale, dropout_p, _rng_pair(rng), average)
    if cu_seqlens_k is not None:
        dk = reference.pack_keys(dk, cu_seqlens_k, real, k.shape[0])
    return dq, dk


@_cross_attention_weights_backward.register_fake
def _(dw, q, k, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, average):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _weights_backward(ctx, dw):
    """Gradients for q and k through the weights; none for the LSE, whose dependence on q and k
    softmax's backward formula already includes."""
    q, k, lse, kv_lens, cu_seqlens_k, rng, attn_bias = ctx.saved_tensors
    need_dq, need_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if dw is None or not (need_dq or need_dk):
        return (None,) * 11
    dq, dk = deco.cross_attention_weights_backward(
        dw, q, k, lse, kv_lens, cu_seqlens_k, ctx.max_seqlen_k, ctx.scale, ctx.dropout_p, rng, attn_bias, ctx.average)
    return (dq if need_dq else None), (dk if need_dk else None), *(None,) * 9


register_autograd(_cross_attention_weights, _weights_backward, _weights_setup)


def _draw_rng(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(seed, offset) for the kernels' Philox counters, drawn from ``generator`` (or torch's
    default generator of ``device``) on the generator's device: with a generator on the inputs'
    device (or none) the draw never leaves it; a CPU generator's draw goes over without blocking."""
    gen_device = generator.device if generator is not None else device
    return to_device(torch.randint(0, 2**62, (2,), generator=generator, device=gen_device, dtype=torch.int64), device)


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    need_weights: bool = False,
    average_attn_weights: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-attention ``softmax(scale * q k^T + mask) v`` per batch and head, FlashAttention-style.

    Args:
        q: ``(B, M, H, D)`` queries, or ``(1, M, H, D)``: queries shared by the whole batch (learned
            queries), read through a zero batch stride, never expanded or copied; their gradient
            is reduced over the batch.
        k, v: ``(B, N, H, D)`` (FlashAttention's layout, so projections need no transpose); with
            ``cu_seqlens_k``, packed ``(total_N, H, D)``.
        kv_lens: optional int32/int64 ``(B,)``: keys at positions >= ``kv_lens[b]`` are ignored
            completely (their values may be garbage or NaN; their gradients are exactly zero).
            ``kv_lens[b] == 0`` gives a zero output row and zero gradients. Values outside
            ``[0, N]`` are clamped into it (never read on the host; the same on every device).
        softmax_scale: default ``1 / sqrt(D)``, as SDPA computes it.
        dropout_p: attention dropout in ``[0, 1)`` applied to the probabilities (pass 0 in eval).
            The mask comes from a counter-based RNG seeded from ``generator``, is never stored and
            is regenerated in backward; with a generator in a fixed state the op is deterministic.
        generator: the ``torch.Generator`` the dropout seed is drawn from (default: torch's; a
            generator of your own is not restored by ``torch.utils.checkpoint``: docs/api.md).
        cu_seqlens_k: optional int32 ``(B + 1,)`` offsets into packed ``k``/``v`` (FlashAttention's
            varlen convention: batch ``b`` owns key rows ``cu[b] .. cu[b+1]``). Exclusive with
            ``kv_lens``. Reads the offsets on the host once (one sync when they live on the GPU:
            the longest length sizes the launch), so it is not traced by
            ``torch.compile(fullgraph=True)``.
        attn_mask: optional mask with ``F.scaled_dot_product_attention``'s semantics, computed in
            the fused kernels forward and backward: bool (True = attend) or floating (added to the
            scores; -inf drops a key), of up to 4 dims broadcastable to ``(B, H, M, N)`` (e.g.
            ``(B, 1, 1, N)`` per key, ``(M, N)`` per query x key, ``(B, H, M, N)``); broadcast dims
            are read through zero strides, never expanded. Any pattern (holes, left padding).
            Dropped keys are still read: NaN in k there is ignored, NaN in v is not (use
            ``kv_lens`` for garbage padding). A row whose keys are all dropped gives zeros (output,
            weights, gradients), as ``kv_lens == 0`` and SDPA do. No gradient flows to the mask:
            one that requires grad raises. With packed keys, N is the longest sequence.
        need_weights: also return the attention probabilities, computed from the saved
            log-sum-exp (exact softmax, the same masks and dropout mask as the output). They are
            differentiable w.r.t. q and k.
        average_attn_weights: with ``need_weights``: ``(B, M, N)`` averaged over the heads (True)
            or ``(B, H, M, N)`` per head, as ``nn.MultiheadAttention``.

    Returns:
        ``(B, M, H, D)`` in q's dtype (with ``need_weights``: ``(output, weights)``, weights in q's dtype). fp16/bf16/fp32 (fp32 dots follow torch.matmul's fp32
        precision, ``torch.backends.cuda.matmul.fp32_precision``); softmax statistics in fp32.
    """
    if (attn_mask is None and kv_lens is None and softmax_scale is None and generator is None and cu_seqlens_k is None
            and not need_weights and type(dropout_p) is float and dropout_p == 0.0):  # the common call: three tensors
        plan = _dense_plans.get(q, k, v)  # are its signature (≈ 0.2 µs less than checking the defaults as values)
    elif attn_mask is None and not need_weights:  # then a signature without the mask's arguments
        plan = _plans.get(q, k, v, kv_lens, softmax_scale, dropout_p, generator, cu_seqlens_k)
    else:
        plan = _masked_plans.get(q, k, v, kv_lens, softmax_scale, dropout_p, generator, cu_seqlens_k, attn_mask, need_weights,
                                 average_attn_weights)
    if plan is not None:
        return plan(q, k, v, kv_lens, attn_mask)
    kwargs = {"kv_lens": kv_lens, "softmax_scale": softmax_scale, "dropout_p": dropout_p, "generator": generator,
              "cu_seqlens_k": cu_seqlens_k, "attn_mask": attn_mask, "need_weights": need_weights, "average_attn_weights": average_attn_weights}
    out = _autocast.plain_call(cross_attention, "cross_attention", (q, k, v), kwargs)
    if out is not _autocast.NOT_PLAIN:
        return out
    kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, attn_bias = _checked(
        q, k, v, kv_lens, softmax_scale, dropout_p, generator, cu_seqlens_k, attn_mask)
    if need_weights:  # inside autocast the forward's op casts these and the weights' op does not (its LSE stays
        # fp32): cast once here for both, as a plain call does (``_autocast.plain_call``), or the weights are
        # the probabilities of other scores than the LSE's
        q, k, attn_bias = (None if t is None else _autocast.cast_tensor(t) for t in (q, k, attn_bias))
    if need_weights and cu_seqlens_k is None and _eager_weights_apply(q, k, v, attn_mask, dropout_p):
        impl = _plan.chosen(_cross_attention_implementation,
                            (q, k, v, kv_lens, None, max_seqlen_k, scale, dropout_p, None, attn_bias, True))
        if impl is _COMPOSED_FORWARD["composed"]:
            return composed_attention.cpu_attention_with_weights(
                q, k, _autocast.cast_tensor(v), kv_lens, scale, attn_bias, bool(average_attn_weights))
    need_lse = need_weights or _plan.needs_residuals(q, k, v)  # known here, not in the op's body
    rng = _draw_rng(generator, q.device) if dropout_p > 0 else None
    out, lse = deco.cross_attention(q, k, v, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, need_lse)
    if not need_weights:
        return out
    weights = deco.cross_attention_weights(
        q, k, lse, kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, rng, attn_bias, bool(average_attn_weights))
    return out, weights


def _eager_weights_apply(q, k, v, attn_mask, dropout_p) -> bool:
    """Whether a call with ``need_weights`` (and unpacked keys) may run as eager softmax attention
    (``composed_attention.cpu_attention_with_weights``) where the strategy picks SDPA's CPU kernel:
    no dropout (its mask is ours, Philox), plain CPU tensors (the path reads mask and key values on
    the host: not while torch.compile or ``torch.jit.trace`` traces, which records the ops, nor
    inside a functorch transform), no saved-tensor hooks (a checkpointed region runs the ops, whose
    recompute saves what their forward saved, as ``_checkpoint.recording``)."""
    return (dropout_p == 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling() and _tracing_state() is None
            and _checkpoint.saved_tensors_hooks(False) is None
            and all(t is None or (type(t) in reference.PLAIN_TENSORS and not torch._C._functorch.is_functorch_wrapped_tensor(t))
                    for t in (q, k, v, attn_mask)))


def _as_bias(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """An SDPA ``attn_mask`` as the additive bias every path reads: a (B, H, M, N) view with zero
    strides where broadcast. A bool mask becomes 0 / -inf (fp32, the default float dtype) at its
    own size first (one small elementwise kernel; the kernels then have a single mask path, and a
    byte mask would save nothing next to reading K and V)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:  # not in place: a vmapped mask fills a batched result
        mask = torch.where(mask, 0.0, float("-inf"))
    elif mask.dtype not in _MASK_DTYPES:  # float8: no -inf, no clamp on every device; its values are exact in fp32
        mask = mask.float()
    return mask.expand(shape)


_MASK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what every path adds as it is


def _checked(q, k, v, kv_lens, softmax_scale, dropout_p, generator, cu_seqlens_k, attn_mask) -> tuple:
    """Every check of ``cross_attention``, in order: (kv_lens as int32, cu_seqlens_k, the longest
    key sequence, scale, dropout_p, the additive bias)."""
    packed = cu_seqlens_k is not None
    H, D = _check.qkv(q, k, v, packed)
    if packed:
        if kv_lens is not None:
            raise ValueError("pass either kv_lens or cu_seqlens_k, not both")
        cu_seqlens_k, B, max_seqlen_k = _check.cu_seqlens(cu_seqlens_k, k.shape[0], q.device)
        N = max_seqlen_k
    else:
        B, N = k.shape[0], k.shape[1]
        max_seqlen_k = N
    _check.query_batch(q, B)
    kv_lens = _check.kv_lens(kv_lens, B, q.device)
    attn_bias = _as_bias(_check.attn_mask(attn_mask, (B, H, q.shape[1], N), q.device), (B, H, q.shape[1], N))
    scale = _check.scale(softmax_scale, D)
    dropout_p = _check.dropout(dropout_p, generator)
    return kv_lens, cu_seqlens_k, max_seqlen_k, scale, dropout_p, attn_bias


def _plan_of(q, k, v, kv_lens, softmax_scale, dropout_p, generator, cu_seqlens_k, attn_mask=None, need_weights=False,
             average_attn_weights=True) -> Callable | None:
    """A plain eager call's plan (no generator: a ``torch.Generator`` has no signature),
    ``plan(q, k, v, kv_lens, attn_mask)`` -> what ``cross_attention`` returns; none with packed keys
    (the offsets' values size the launch and the strategy key)."""
    if cu_seqlens_k is not None or isinstance(need_weights, torch.Tensor) or isinstance(average_attn_weights, torch.Tensor):
        return None  # flags given as tensors: a signature holds their metadata, the call reads their values
    kv_lens, _, N, scale, dropout_p, attn_bias = _checked(q, k, v, kv_lens, softmax_scale, dropout_p, generator, None, attn_mask)
    records = _plan.needs_residuals(q, k, v)
    need_lse = bool(need_weights) or records
    # no dropout seed: drawing one here would move the generator; a call with dropout has one candidate (nothing is timed)
    args = (q, k, v, kv_lens, None, N, scale, dropout_p, None, attn_bias, need_lse)
    impl = _plan.chosen(_cross_attention_implementation, args)
    native = None
    if impl is _COMPOSED_FORWARD["composed"] and kv_lens is None and attn_bias is None and not need_weights:
        # SDPA's CPU kernel is the whole call (no mask, no dropout: composed_attention.forward), and its
        # own backward is what the composed backward runs on the same residuals: called
        # differentiably, autograd records the ATen node, with no Python Function around it
        # (outside saved-tensor hooks: ``_checkpoint.recording``)
        default = scale == 1.0 / math.sqrt(q.shape[-1])  # the kernel's own scale, computed as it computes it
        shared = q.shape[0] != k.shape[0]
        if default and not shared and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:  # the common call, and
            native = _on_cpu_sdpa  # a signature fixes these strides (``_plan``)
        else:
            native = functools.partial(_on_cpu_sdpa_as_given, None if default else scale, shared)
        if not records:
            return native
    mask_shape = None if attn_bias is None else attn_bias.shape  # (B, H, M, N): the next calls' masks are converted to it
    weights = None if not need_weights else bool(average_attn_weights)
    function = functools.partial(_planned, deco.cross_attention.runner(impl, records), scale, dropout_p, need_lse, mask_shape, weights)
    if weights is not None and impl is _COMPOSED_FORWARD["composed"] and dropout_p == 0.0:
        return functools.partial(_planned_eager_weights, function, scale, mask_shape, weights)
    return _checkpoint.recording(native, function) if native is not None else function


def _planned(run, scale, dropout_p, need_lse, mask_shape, weights, q, k, v, kv_lens, attn_mask):
    """A planned call's work left (``_plan_of``): the value check of ``kv_lens``, the mask as a bias,
    the dropout seed, ``run``; and the weights (``weights``: None, or whether they are averaged over
    the heads)."""
    kv_lens, attn_bias = _planned_masks(mask_shape, q, k, kv_lens, attn_mask)
    rng = _draw_rng(None, q.device) if dropout_p > 0 else None
    N = k.shape[1]
    out, lse = run(q, k, v, kv_lens, None, N, scale, dropout_p, rng, attn_bias, need_lse)
    if weights is None:
        return out
    return out, deco.cross_attention_weights(q, k, lse, kv_lens, None, N, scale, dropout_p, rng, attn_bias, weights)


def _planned_eager_weights(function, scale, mask_shape, average, q, k, v, kv_lens, attn_mask):
    """A planned call with the weights whose forward the strategy runs on SDPA's CPU kernel, without
    dropout (``_plan_of``): eager softmax attention (``composed_attention.cpu_attention_with_weights``)
    where ``_eager_weights_apply``, else the ops (``function``, the plan ``_planned``)."""
    if not _eager_weights_apply(q, k, v, attn_mask, 0.0):
        return function(q, k, v, kv_lens, attn_mask)
    kv_lens, attn_bias = _planned_masks(mask_shape, q, k, kv_lens, attn_mask)
    return composed_attention.cpu_attention_with_weights(q, k, v, kv_lens, scale, attn_bias, average)


def _planned_masks(mask_shape, q, k, kv_lens, attn_mask):
    """A planned call's masks: ``kv_lens`` value-checked, the mask as a bias of ``mask_shape`` (or None)."""
    if kv_lens is not None:
        kv_lens = _check.kv_lens(kv_lens, k.shape[0], q.device)
    attn_bias = None if mask_shape is None else _as_bias(attn_mask, mask_shape)
    return kv_lens, attn_bias


def _on_cpu_sdpa(q, k, v, kv_lens, attn_mask):
    """A planned dense call on SDPA's CPU kernel (``_plan_of``) with its own scale, a query set per
    batch row and unit-stride head dims, which is what the kernel reads: the kernel alone, its
    output back in ``(B, M, H, D)``, as ``composed_attention.cpu_sdpa`` calls it (two frames and
    three stride tests fewer, ≈ 0.6 µs of a ≈ 10 µs call), contiguous as the full path returns it
    (the kernel lays its output out as q's storage is: heads first for a heads-first q)."""
    return composed_attention.cpu_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2).contiguous()


def _on_cpu_sdpa_as_given(scale, shared, q, k, v, kv_lens, attn_mask):
    """A planned dense call on SDPA's CPU kernel (``_plan_of``), any other: ``shared``, one query
    set for the batch; any head-dim strides (``cpu_sdpa`` copies what the kernel cannot read)."""
    return composed_attention.cpu_sdpa(q.expand(k.shape[0], -1, -1, -1) if shared else q, k, v, scale)[0].contiguous()


def _dense_plan_of(q, k, v) -> Callable | None:
    """The plan of a call with every other argument at its default (``_plan_of``)."""
    return _plan_of(q, k, v, None, None, 0.0, None, None)


_dense_plans, _plans, _masked_plans = _plan.Plans(_dense_plan_of), _plan.Plans(_plan_of), _plan.Plans(_plan_of)
