"""``cross_attention``'s composed twins: PyTorch's own scaled-dot-product-attention kernels, wherever
they express the call exactly, one candidate per kernel.

The kernels are the ones ``F.scaled_dot_product_attention`` dispatches to, called through the ATen
ops that also return the log-sum-exp, so every twin keeps exactly the fused path's residuals: the
output ``(B, M, H, D)`` and the fp32 LSE ``(B, H, M)`` (natural log, ``+inf`` for a row without
keys). Each kernel lays its LSE out its own way; forward normalises it to ``(B, H, M)`` and backward
hands each kernel the layout it reads, so any backward follows any forward (fused or composed, of
any kernel) and the strategy decides forward and backward separately.

Candidates (``kernels``: those that express a call, in order of preference; ``forward`` /
``backward`` take the name):

* ``composed`` (CPU): ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (SDPA's
  CPU kernel), on ``(B, H, L, D)`` views, with an additive mask for ``kv_lens``.
* ``composed_efficient`` (CUDA): ``aten._efficient_attention_forward`` and
  ``_scaled_dot_product_efficient_attention_backward`` (SDPA's memory-efficient kernel; the backward
  is SDPA's wrapper of ``_efficient_attention_backward``, the same call on the same memory, whose
  meta kernel, unlike that op's, matches its schema: ``torch.compile`` traces it), which read our
  ``(B, L, H, D)`` layout as it is. Any float dtype, head
  dims that are multiples of 8, ``kv_lens`` as an additive mask. Its LSE holds ``ceil(M / 32) * 32``
  queries per row; its mask rows must be 16-element aligned. Listed first: ``use_strategy("composed")``
  without a measured decision runs it, the kernel the first GPU runs validated in training.
* ``composed_flash`` (CUDA, sm80+): ``aten._scaled_dot_product_flash_attention`` / ``_backward``
  (FlashAttention-2). fp16/bf16, head dims multiples of 8 up to 256, no mask (so no ``kv_lens``).
  LSE ``(B, H, M)`` fp32.
* ``composed_cudnn`` (CUDA, sm80+): ``aten._scaled_dot_product_cudnn_attention`` / ``_backward``.
  fp16/bf16, head dims multiples of 8 up to 128 (cuDNN's backward limit), no ``kv_lens``: the op
  takes an additive bias, but its handling of a broadcast ``-inf`` padding bias has not been
  checked on a GPU, so padded keys stay with the memory-efficient kernel. LSE ``(B, H, M, 1)``
  (the rank the installed torch's forward returns, read from its meta kernel).

Determinism of the backward (``deterministic_backward``), as PyTorch implements it: the CPU kernel
reduces in a fixed order; flash runs its deterministic backward under
``torch.use_deterministic_algorithms(True)`` (not in ``warn_only`` mode); the memory-efficient
kernel only drops key splitting there, which we do not count on; cuDNN's backward is never
deterministic. Forwards are deterministic.

How a call is expressed:

* shared queries ``(1, M, H, D)`` are expanded to the batch (a stride-0 view for the kernels that
  read it; a copy where a kernel might write dq laid out like q, and for flash/cuDNN, which get a
  materialised query of a few rows); their gradient is summed over the batch;
* ``kv_lens`` becomes an additive ``0 / -inf`` mask. Keys at or past ``kv_lens[b]`` are replaced by
  zeros first, because SDPA still reads masked keys and ``0 * NaN`` would leak their garbage;
* the caller's additive mask (``bias``, ``deco_ops.cross_attention``'s ``attn_mask`` as a
  (B, H, M, N) view) is added to it at its compact (unbroadcast) shape, finite values clamped as
  the fused kernels clamp them, in fp32 for 16-bit queries on the CPU kernel (which takes an fp32
  mask with them; the memory-efficient kernel takes q's dtype only); keys it drops for every query
  of their batch entry are zeroed in k first (NaN there is ignored, as on the fused path); a masked
  call runs on the CPU kernel or the memory-efficient one (flash takes no mask; cuDNN's is not
  relied on);
* a row whose keys are all masked ("dead") attends to every key instead (SDPA would give NaN or
  a meaningless LSE) and its output is then set to zero and its LSE to ``+inf``, which makes every
  gradient of that row exactly zero in backward, as on the fused path.

Not expressible, so the fused path runs: dropout (SDPA draws its own mask; ours is Philox,
reproduced bit for bit by the reference path) and, on CUDA, head dims that are not a multiple of 8.
"""

from __future__ import annotations

import functools
import math

import torch

from . import reference_attention

_LSE_ALIGN_EFFICIENT = 32  # the memory-efficient kernel's LSE holds ceil(M / 32) * 32 queries
_BIAS_ALIGN_EFFICIENT = 16  # ... and wants its additive mask's rows 16-element aligned
_HALF = (torch.float16, torch.bfloat16)
# kernel -> (aten forward op, largest head dim) of the 16-bit-only CUDA kernels
_HALF_KERNELS = {
    "composed_flash": ("_scaled_dot_product_flash_attention", 256),
    "composed_cudnn": ("_scaled_dot_product_cudnn_attention", 128),
}
CUDA_KERNELS = ("composed_efficient", *_HALF_KERNELS)
KERNELS = ("composed", *CUDA_KERNELS)


def kernels(q: torch.Tensor, masked: bool, dropout_p: float) -> tuple[str, ...]:
    """The composed candidates that compute this call exactly, in order of preference (empty if
    none does). ``masked``: whether some keys are masked out (``kv_lens``, packed keys, an ``attn_mask``)."""
    if dropout_p > 0:
        return ()
    if q.device.type == "cpu":
        return ("composed",)
    if q.device.type != "cuda" or q.shape[-1] % 8 or q.dtype not in (*_HALF, torch.float32):
        return ()
    return ("composed_efficient", *(name for name in _HALF_KERNELS if _half_kernel_applies(name, q, masked)))


def _half_kernel_applies(name: str, q: torch.Tensor, masked: bool) -> bool:
    op, max_head_dim = _HALF_KERNELS[name]
    return (not masked and q.dtype in _HALF and q.shape[-1] <= max_head_dim and hasattr(torch.ops.aten, op)
            and _sm80_or_newer(q.device))


@functools.cache
def _sm80_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


def deterministic_backward(kernel: str) -> bool:
    """Whether ``kernel``'s backward is bitwise reproducible in the current mode (module docstring)."""
    if kernel == "composed":
        return True
    if kernel == "composed_flash":
        return torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    return False


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A broadcast view at its own size: every zero-stride dim narrowed to 1."""
    return t[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in t.stride())]


def _mask_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype the CPU kernel adds a mask in: fp32 for 16-bit queries (it takes an fp32 mask
    with them, so a user's fp32 bias is not rounded to 16 bits, and ``finfo(float32).min`` does
    not overflow into ``-inf``), else q's."""
    return torch.float32 if q.dtype in _HALF else q.dtype


# K's size (elements) from which the CPU path checks whether its zeroing copies can be skipped:
# the check costs three reductions and ~30 Python-level calls, more host time than the two copies
# of a small K and V (a tiny kv_lens call made 87 calls with it, 55 without: tests/test_host_path.py)
_CHECKED_FROM = 1 << 16


def _max_abs(t: torch.Tensor) -> float:
    """max |t| over a non-empty tensor, NaN if it holds one (``aminmax`` gives NaN as both): one
    pass, no |t| temporary."""
    low, high = torch.aminmax(t.detach())
    low, high = float(low), float(high)
    return high if high != high else max(-low, high)


def _harmless_keys(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> bool:
    """Whether SDPA's CPU kernel computes the same bits with ``k`` as given as with ``k`` zeroed
    at the keys no query reads: their scores are finite (then ``+ (-inf)`` is ``-inf``, as for a
    zeroed key, and their probabilities 0; a row without keys is overwritten after), which
    ``|scale * q.k| <= |scale| * D * max|q| * max|k|`` bounds well inside q's range. NaN or inf
    anywhere fails the test. The maxima are over every key, not only the keys left out: one
    reduction each, cheaper than gathering those (and a read key's NaN only costs the copy). Reads
    the values on the host: the CPU path only."""
    if not (q.numel() and k.numel()):
        return True
    D = q.shape[-1]
    bound = abs(D ** -0.5 if scale is None else scale) * D * _max_abs(q) * _max_abs(k)
    return bound < torch.finfo(q.dtype).max / 4  # False for NaN


def _harmless_values(v: torch.Tensor) -> bool:
    """Whether ``v`` is finite (at the keys no query reads, among others): their probabilities are
    exactly 0, and ``0 * v`` adds nothing to a row's sum, as a zeroed value does. CPU path only
    (``_harmless_keys``)."""
    return not v.numel() or math.isfinite(_max_abs(v))


def _inputs(q, k, v, kv_lens, user_bias=None, align: int = 1, per_head: bool = False, mask_dtype=None, scale=None):
    """q expanded to the batch (a view), k and v (zeroed past ``kv_lens``, and k at the keys the
    caller's mask drops for every query of their batch entry, so NaN there is ignored as the fused
    kernels ignore it), the additive mask ``(B or 1, 1 or H, 1 or M, N)`` in ``mask_dtype``
    (default q's; rows allocated ``align``-element aligned; expanded to ``(B, H, M, N)`` if
    ``per_head``) or None, and the bool "row has no key" ``(B or 1, 1 or H, 1 or M)`` or None;
    layouts as given. On the CPU, for K of ``_CHECKED_FROM`` elements or more (``scale``: the
    call's, None for ``1 / sqrt(D)``), the zeroing copies of k and v are skipped where the keys
    left out hold values that cannot reach the result (``_harmless_keys``, ``_harmless_values``: the same bits; one max-abs reduction of q, k
    and v decides): a copy of K and of V was ~0.7x of SDPA's own time at BLIP-2's size."""
    B, N, H, D = k.shape
    M = q.shape[1]
    q = q.expand(B, -1, -1, -1)
    if kv_lens is None and user_bias is None:
        return q, k, v, None, None
    cpu = q.device.type == "cpu" and B * N * H * D >= _CHECKED_FROM  # host reads of values cost no sync there
    mask_dtype = mask_dtype or q.dtype
    if user_bias is not None:  # at its compact shape, clamped as the kernels clamp it
        user_bias = reference_attention.clamped_bias(_compact(user_bias), mask_dtype)
    valid = None  # (B, N): the keys before kv_lens
    if kv_lens is None:  # the caller's mask alone
        bias = user_bias
    else:
        valid = torch.arange(N, device=k.device)[None, :] < kv_lens.to(device=k.device, dtype=torch.int64)[:, None]
        if not (cpu and _harmless_values(v)):
            v = torch.where(valid[:, :, None, None], v, 0.0)
        bias = torch.zeros((1, 1, 1, N), dtype=mask_dtype, device=q.device).masked_fill(~valid[:, None, None, :], float("-inf"))
        if user_bias is not None:
            bias = bias + user_bias
    if not (cpu and _harmless_keys(q, k, scale)):  # zero k at the keys no query reads, in one pass
        read = valid  # (B or 1, N or 1): before kv_lens, and not -inf for every head and query of the mask
        if user_bias is not None:
            by_mask = ~(user_bias == float("-inf")).all(2).all(1)
            read = by_mask if valid is None else valid & by_mask
        k = torch.where(read[:, :, None, None], k, 0.0)
    dead = (bias == float("-inf")).all(-1)
    bias = bias.masked_fill_(dead[..., None], 0.0)  # in place: a tensor made above (clamped_bias copies the caller's mask)
    if align > 1:
        aligned = torch.zeros((*bias.shape[:-1], -(-N // align) * align), dtype=mask_dtype, device=q.device)
        aligned[..., :N] = bias
        bias = aligned[..., :N]
    if per_head:
        bias = bias.expand(B, H, M, N)
    return q, k, v, bias, dead


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the CUDA kernels accept it: a 16-byte aligned start and strides, unit stride on the
    last dim (the memory-efficient kernel's alignment check fails otherwise, "no kernel found to
    launch", e.g. for a view that starts mid-buffer). Anything else is copied; an aligned tensor is not.
    While ``torch.compile`` traces the op's body (FunctionalTensors, FakeTensors: no address, and
    ``data_ptr`` raises) the start is judged by the storage offset, as Inductor judges its inputs'
    alignment (and copies a graph input that is not aligned at run time)."""
    step = 16 // t.element_size()
    start = t.data_ptr() if type(t) in reference_attention.PLAIN_TENSORS else t.storage_offset() * t.element_size()
    if t.stride(-1) == 1 and start % 16 == 0 and all(s % step == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _heads_first(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(B, L, H, D)`` -> ``(B, H, L, D)`` views, the layout SDPA's ATen ops take."""
    return tuple(t.transpose(1, 2) for t in tensors)


def normalised_lse(lse: torch.Tensor, M: int) -> torch.Tensor:
    """A kernel's LSE (``(B, H, M)``, ``(B, H, M, 1)`` or ``(B, H, >= M)`` padded; fp32, fp64 for
    fp64 inputs on CPU) as the op's ``(B, H, M)`` (a view where it already is)."""
    return lse.flatten(2).narrow(2, 0, M)  # flatten, not reshape(B, H, -1): an empty batch has no -1; narrow: no index parsing


@functools.cache
def _cudnn_lse_rank() -> int:
    """How many dims the installed torch's cuDNN forward gives its LSE (its backward reads the
    same): ``(B, H, M, 1)`` so far; asked of the op's meta kernel, which describes the real one."""
    x = torch.empty((1, 1, 1, 8), dtype=torch.float16, device="meta")
    return torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, True)[1].dim()


cpu_kernel = torch._scaled_dot_product_flash_attention_for_cpu  # the ATen op's Python binding: no torch.ops lookup per call


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit stride on the head dim, as SDPA's CPU kernels read it: they index rows by
    the other strides and assume this one is 1 (``F.scaled_dot_product_attention`` checks it and
    falls back to its math path; called directly, the kernels read the wrong elements, or past
    the tensor). Copied only where it is not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cpu_sdpa(q, k, v, scale: float | None = None, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU kernel on ``(B, L, H, D)`` tensors of one batch size: (O ``(B, M, H, D)``, a
    view; its LSE as the kernel lays it out). ``scale`` None: the kernel's own ``1 / sqrt(D)``.
    Differentiable: under autograd it records the ATen op's node, whose backward is the op that
    ``backward`` runs for ``composed`` on the same residuals."""
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # inline: three frames fewer on every call
        q, k, v = map(_unit_stride, (q, k, v))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if scale is None and bias is None:  # keyword arguments cost the binding ~0.5 us a call
        o, lse = cpu_kernel(qt, kt, vt)
    else:
        o, lse = cpu_kernel(qt, kt, vt, attn_mask=bias, scale=scale)
    return o.transpose(1, 2), lse


def cpu_attention_with_weights(q, k, v, kv_lens, scale: float, bias, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_attention(..., need_weights=True)`` on the CPU without dropout, as eager softmax
    attention computes it: S = scale q k^T + mask, P = softmax(S) once, O = P V, the weights P
    ((B, M, N) averaged over the heads, or (B, H, M, N)), O and the weights in q's dtype. Plain
    differentiable ops: autograd keeps P and runs eager's backward (four GEMMs), as
    ``nn.MultiheadAttention``'s math path does; SDPA's kernel and the weights from its LSE computed
    S three times and P twice (2x eager's time at BLIP-2's and Qwen-VL's sizes). The masks as
    ``forward`` reads them (``_inputs``: values and keys dropped for every query zeroed, a row
    without keys gives zero output, weights and gradients); in fp32 for 16-bit inputs, autocast
    off (the caller cast the inputs as the op's autocast rule does)."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return cpu_attention_with_weights(q, k, v, kv_lens, scale, bias, average)
    dtype = q.dtype
    compute = reference_attention.compute_dtype(dtype)
    q, k, v, bias, dead = _inputs(q, k, v, kv_lens, bias, mask_dtype=_mask_dtype(q), scale=scale)
    # heads first, contiguous: the GEMMs read (B * H) batches as views. K^T as (B, H, D, N), the GEMM
    # ``einsum("bmhd,bnhd->bhmn")`` runs (the previous weights' bits; K as a transposed (N, D) operand
    # rounds otherwise, 8x eager's weight error at logits near 100 in the accuracy test, 2x better
    # at logits near 10: the luck of one draw, but that test's bar)
    # Each operand made when its GEMM runs, and S dropped once softmax has read it: V's copy beside K's
    # and S, or S beside P and V's, was a buffer more than eager holds at its peak
    s = torch.matmul(q.transpose(1, 2).contiguous().to(compute) * scale, k.permute(0, 2, 3, 1).contiguous().to(compute))
    if bias is not None:
        s = s + bias
    p = torch.softmax(s, -1)
    del s
    out = torch.matmul(p, v.transpose(1, 2).contiguous().to(compute))
    if dead is not None:
        p = p.masked_fill(dead[..., None], 0.0)
        out = out.masked_fill(dead[..., None], 0.0)
    weights = p.mean(1) if average else p
    return out.transpose(1, 2).to(dtype).contiguous(), weights.to(dtype)


# Ragged keys (packed, or ``kv_lens``) on the CPU kernel run one call per sequence on its own keys
# (views: no padded copy, no mask, the keys past a length never computed) where the padded keys
# would hold ``_RAGGED_FROM`` elements or more (below, reading the lengths costs a tiny call more
# host time than it saves) and either a sequence holds ``_PER_SEQUENCE_FROM`` elements on average or
# a padded batch would hold ``_PER_SEQUENCE_PADDING`` times the keys. Below that a padded call
# measured faster: a call costs ~25 us of host time forward, ~100 us with its backward (64 packed
# sequences of 16 keys x 12 heads x 64: 26 vs 29 ms forward+backward).
_RAGGED_FROM = 1 << 16
_PER_SEQUENCE_FROM = 1 << 15
_PER_SEQUENCE_PADDING = 2


def per_sequence(k: torch.Tensor, kv_lens: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, padded_length: int) -> bool:
    """Whether a ``composed`` call with ragged keys (``kv_lens`` or packed ``cu_seqlens_k``) runs one
    call per sequence (``ragged_forward``): its lengths hold values to read (not while torch.compile
    traces, where they are fake) and the rule above holds. ``padded_length``: N, or the longest
    packed sequence."""
    lengths = kv_lens if cu_seqlens_k is None else cu_seqlens_k
    batch, row = lengths.shape[0] - (cu_seqlens_k is not None), k.shape[-2] * k.shape[-1]
    if (batch * padded_length * row < _RAGGED_FROM or type(k) not in reference_attention.PLAIN_TENSORS
            or type(lengths) is not torch.Tensor):
        return False
    keys = int(kv_lens.clamp(0, padded_length).sum()) if cu_seqlens_k is None else int(cu_seqlens_k[-1])
    return keys * row >= batch * _PER_SEQUENCE_FROM or batch * padded_length >= _PER_SEQUENCE_PADDING * keys


def _sequences(q, k, v, kv_lens, cu_seqlens_k, bias):
    """Per sequence of ragged keys (lengths read on the host: CPU tensors, no sync): its batch
    index, its queries ``(1, M, H, D)``, keys and values ``(1, length, H, D)`` (views), its mask
    ``(1, 1 or H, 1 or M, length)`` or None, and how many key rows after its own get a zero
    gradient (past ``kv_lens``; after the last packed sequence, rows of none)."""
    shared = q.shape[0] == 1
    if cu_seqlens_k is None:
        N = k.shape[1]
        spans = [(b, 0, length, N - length) for b, length in enumerate(kv_lens.clamp(0, N).tolist())]
    else:
        offsets = cu_seqlens_k.tolist()
        spans = [(None, start, stop, 0) for start, stop in zip(offsets[:-1], offsets[1:])]
        spans[-1] = (None, offsets[-2], offsets[-1], k.shape[0] - offsets[-1])
    for b, (row, start, stop, zeros_after) in enumerate(spans):
        mask = None if bias is None else bias[0 if bias.shape[0] == 1 else b, None, ..., : stop - start]
        kb, vb = (k[None, start:stop], v[None, start:stop]) if row is None else (k[row, None, start:stop], v[row, None, start:stop])
        yield b, q[0 if shared else b, None], kb, vb, mask, zeros_after


def ragged_forward(q, k, v, kv_lens, cu_seqlens_k, scale, bias, need_lse: bool):
    """``forward`` of ragged keys on the CPU kernel, one call per sequence (``_sequences``). A
    sequence without keys gives zeros and an LSE of +inf, as the padded call does. Each sequence's
    output is copied into the batch's as it comes (a list joined at the end held the output twice)."""
    batch = kv_lens.shape[0] if cu_seqlens_k is None else cu_seqlens_k.shape[0] - 1
    outs, lses = q.new_empty((batch, *q.shape[1:])), []
    for b, qb, kb, vb, mask, _ in _sequences(q, k, v, kv_lens, cu_seqlens_k, bias):
        if kb.shape[1] == 0:
            outs[b].zero_()
            lses.append(torch.full((1, qb.shape[2], qb.shape[1]), float("inf"), dtype=reference_attention.compute_dtype(q.dtype), device=q.device))
            continue
        out, lse = forward(qb, kb, vb, None, scale, bias=mask, need_lse=need_lse)
        outs[b].copy_(out[0])
        lses.append(lse)
        del out  # before the next sequence's exists
    return outs, torch.cat(lses) if need_lse else None


def ragged_backward(dout, q, k, v, out, lse, kv_lens, cu_seqlens_k, scale, need_dq: bool, need_dkv: bool, bias=None):
    """``backward`` of ``ragged_forward``, one call per sequence: dK and dV laid out as K and V (zeros
    past each length, in rows of no sequence), dQ of shared queries summed over the sequences."""
    dqs, dks, dvs = [], [], []
    for b, qb, kb, vb, mask, zeros_after in _sequences(q, k, v, kv_lens, cu_seqlens_k, bias):
        if kb.shape[1] == 0:
            dqs.append(torch.zeros_like(qb))
        else:
            dq, dk, dv = backward(dout[b, None], qb, kb, vb, out[b, None], lse[b, None], None, scale, need_dq, need_dkv, bias=mask)
            dqs.append(dq)
            if need_dkv:
                dks.append(dk[0])
                dvs.append(dv[0])
        if need_dkv and zeros_after:
            dks.append(k.new_zeros((zeros_after, *k.shape[-2:])))
            dvs.append(v.new_zeros((zeros_after, *v.shape[-2:])))
    dq = (torch.stack(dqs).sum(0) if q.shape[0] == 1 else torch.cat(dqs)) if need_dq else None
    if not need_dkv:
        return dq, None, None
    if not dks:  # no key rows at all
        return dq, torch.zeros_like(k), torch.zeros_like(v)
    return dq, torch.cat(dks).view(k.shape), torch.cat(dvs).view(v.shape)


def forward(q, k, v, kv_lens, scale, kernel: str = "composed", bias=None, need_lse: bool = True):
    """(O ``(B, M, H, D)`` in q's dtype, LSE ``(B, H, M)`` fp32 or None), as ``deco::cross_attention``,
    by the named composed ``kernel`` (one ``kernels`` lists for the call). The LSE where
    ``need_lse`` (a backward or the weights read it), else None and the cheapest call: the
    memory-efficient and cuDNN kernels skip it (flash and the CPU kernel always compute it). The
    caller decides: the op's body cannot tell (under torch.compile it runs on detached inputs
    inside a graph that has a backward)."""
    if kernel == "composed":
        if kv_lens is None and bias is None and q.shape[0] == k.shape[0]:
            dead = None  # no mask, a query row per batch: ``_inputs`` would return the tensors as they are
        # the size tested inline, as in ``backward``: a tiny call makes no call more (tests/test_host_path.py pins them)
        elif (kv_lens is not None and k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3] >= _RAGGED_FROM
              and per_sequence(k, kv_lens, None, k.shape[1])):
            return ragged_forward(q, k, v, kv_lens, None, scale, bias, need_lse)
        else:
            q, k, v, bias, dead = _inputs(q, k, v, kv_lens, bias, mask_dtype=_mask_dtype(q), scale=scale)
        out, lse = cpu_sdpa(q, k, v, scale, bias)
    elif kernel == "composed_efficient":
        q, k, v = (_aligned(t) for t in (q, k, v))
        q, k, v, bias, dead = _inputs(q, k, v, kv_lens, bias, _BIAS_ALIGN_EFFICIENT, per_head=True)
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(q, k, v, bias, None, None, None, None, 0.0, 0, need_lse, scale=scale)
    else:
        q = _aligned(q.expand(k.shape[0], -1, -1, -1).contiguous())
        k, v = _aligned(k), _aligned(v)
        dead = None  # no kv_lens, no mask here (``kernels``)
        if kernel == "composed_flash":
            o, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(*_heads_first(q, k, v), 0.0, False, False, scale=scale)
        else:
            o, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
                *_heads_first(q, k, v), None, need_lse, 0.0, False, False, scale=scale)
        out = o.transpose(1, 2)
    if dead is not None:  # in place: the kernel's output is ours (a copy would double the peak)
        out = out.masked_fill_(dead.transpose(1, 2)[..., None], 0.0)
    if not need_lse:
        return out.contiguous(), None
    lse = normalised_lse(lse, out.shape[1])
    if dead is not None:
        lse = torch.where(dead, float("inf"), lse)
    return out.contiguous(), lse.contiguous()


def backward(dout, q, k, v, out, lse, kv_lens, scale, need_dq: bool, need_dkv: bool, kernel: str = "composed", bias=None):
    """(dq, dk, dv) from the residuals of any forward (None where not needed), by the named
    composed ``kernel``; dq of shared queries summed over the batch."""
    shared = q.shape[0] == 1
    B, M, N = k.shape[0], q.shape[1], k.shape[1]
    if kernel == "composed":
        if kv_lens is not None and k.shape[0] * k.shape[1] * k.shape[2] * k.shape[3] >= _RAGGED_FROM and per_sequence(k, kv_lens, None, N):
            return ragged_backward(dout, q, k, v, out, lse, kv_lens, None, scale, need_dq, need_dkv, bias)
        q, k, v, bias, _ = _inputs(q, k, v, kv_lens, bias, mask_dtype=_mask_dtype(q), scale=scale)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *_heads_first(*map(_unit_stride, (dout, q, k, v, out))), lse, 0.0, False, attn_mask=bias, scale=scale
        )
        dq, dk, dv = _heads_first(*grads)
    elif kernel == "composed_efficient":
        q, k, v, bias, _ = _inputs(q, k, v, kv_lens, bias, _BIAS_ALIGN_EFFICIENT, per_head=True)
        # q is materialised: the kernel may lay dq out like q, and a stride-0 batch would alias it
        q = q.contiguous()
        dout, k, v, out = (_aligned(t) for t in (dout, k, v, out))
        padded = -(-M // _LSE_ALIGN_EFFICIENT) * _LSE_ALIGN_EFFICIENT
        lse = torch.nn.functional.pad(lse.float(), (0, padded - M))
        unused_rng = torch.zeros((), dtype=torch.int64)  # the Philox seed and offset, read only with dropout
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            *_heads_first(dout, q, k, v), bias, out.transpose(1, 2), lse, unused_rng, unused_rng, 0.0, [True, True, True, False], False,
            scale=scale,
        )
        dq, dk, dv = _heads_first(*grads[:3])  # the fourth, the mask's gradient, is not asked for
    else:
        q = _aligned(q.expand(B, -1, -1, -1).contiguous())
        k, v = _aligned(k), _aligned(v)
        dout, out = (_aligned(t.contiguous()) for t in (dout, out))  # one layout: cuDNN reads dout with out's strides
        lse = lse.float().contiguous()
        unused_rng = torch.empty((2,), dtype=torch.int64, device=q.device)  # Philox seed / offset: read only with dropout
        if kernel == "composed_flash":
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                *_heads_first(dout, q, k, v, out), lse, None, None, M, N, 0.0, False, unused_rng, unused_rng, scale=scale
            )
        else:
            lse = lse.reshape(B, lse.shape[1], M, *([1] * (_cudnn_lse_rank() - 3)))
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *_heads_first(dout, q, k, v, out), lse, unused_rng, unused_rng, None, None, None, M, N, 0.0, False, scale=scale
            )
        dq, dk, dv = _heads_first(*grads)
    if shared and dq.shape[0] > 1:
        dq = dq.sum(0, keepdim=True)
    return (dq.contiguous() if need_dq else None), (dk.contiguous() if need_dkv else None), (dv.contiguous() if need_dkv else None)
