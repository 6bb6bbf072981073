"""Masks in the fused kernels and attention weights from the saved LSE (docs/masks.md).

* ``deco_ops.cross_attention(attn_mask=...)`` (SDPA's semantics: bool True = attend, float added)
  against a float64 softmax written out here: per key with holes and left padding, per query x key,
  per head, bool and float, with ``kv_lens`` too, shared queries, both backward schedules and the
  split forward, keys >= 1024; forward and gradients, NaN-poisoned outputs, NaN-guarded inputs,
  value checks off; a Triton launch is asserted on the Triton backend.
* ``need_weights``: averaged and per head, equal to the softmax and differentiable; with dropout
  they are exactly the weights the output used (out == W V).
* ``CrossAttention`` against ``nn.MultiheadAttention`` (float64) on the calls real models make,
  ``need_weights=True`` (its default) included: the kernels run, weights and gradients match.
"""

import pytest
import torch
from torch import nn

import deco_ops
from deco_ops import CrossAttention, QueryResampler, cross_attention, reference_attention
from harness import assert_close, guarded, leaf, poisoned_empty, randn
from hot_path import Launches

NEG = float("-inf")


@pytest.fixture(autouse=True)
def checks_off(monkeypatch):
    """CUDA's default: nothing about a mask is read on the host, results must still be right."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")


def _softmax_reference(q, k, v, bias, scale=None):
    """float64 (out, per-head weights) of softmax(q k^T * scale + bias) v; a row with no allowed key
    gives zeros (deco_ops' and SDPA's convention)."""
    q, k, v = (t.double() for t in (q, k, v))
    B = k.shape[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bmhd,bnhd->bhmn", q.expand(B, -1, -1, -1), k) * scale + bias.double()
    dead = (s == NEG).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(s == NEG, 0.0)
    return torch.einsum("bhmn,bnhd->bmhd", p, v), p


def _additive(mask):
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, NEG) if mask.dtype == torch.bool else mask


def _masks(kind, B, H, M, N, g):
    """(attn_mask as passed, its additive float64 form broadcast to (B, H, M, N))."""
    if kind == "holes":  # bool per key, random holes; batch 1 keeps nothing
        mask = torch.rand(B, 1, 1, N, generator=g) > 0.4
        mask[:, ..., 0] = True
        mask[-1] = False
    elif kind == "left-padding":
        mask = (torch.arange(N) >= torch.arange(B)[:, None] * (N // 3))[:, None, None, :]
    elif kind == "float-query-key":  # (M, N): a relative-position-style bias with -inf entries
        mask = randn(M, N, generator=g).double().masked_fill(torch.rand(M, N, generator=g) > 0.7, NEG)
        mask[:, 1] = 0.0
    elif kind == "float-per-head":
        mask = randn(B, H, M, N, generator=g).double().masked_fill(torch.rand(B, H, M, N, generator=g) > 0.5, NEG)
        mask[0, 0, 1] = NEG  # one dead row
    else:
        raise ValueError(kind)
    return mask, _additive(mask).expand(B, H, M, N)


def _launched(backend, launches, *names):
    if backend == "triton":
        for name in names:
            assert launches.counts[name] >= 1, f"{name} not launched: {dict(launches.counts)}"


# (B, q batch, M, N, H, D): single pass + split forward, FA2 backward, shared queries; every mask
# kind on the first two, and two kinds at >= 1024 keys (the interpreter's cost grows with N)
KINDS = ("holes", "left-padding", "float-query-key", "float-per-head")
CASES = [
    *(pytest.param(kind, 2, 1, 5, 300, 2, 16, id=f"shared-split-M5-N300-{kind}") for kind in KINDS),
    *(pytest.param(kind, 2, 2, 144, 40, 1, 32, id=f"fa2-M144-N40-{kind}") for kind in KINDS),
    *(pytest.param(kind, 2, 2, 3, 1030, 1, 16, id=f"N1030-{kind}") for kind in ("holes", "float-per-head")),
]


@pytest.mark.parametrize("kind,B,Bq,M,N,H,D", CASES)
def test_attn_mask_matches_softmax_forward_and_backward(backend, kind, B, Bq, M, N, H, D):
    g = torch.Generator().manual_seed(hash((kind, N)) % 1000)
    q, k, v = randn(Bq, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    dout = randn(B, M, H, D, generator=g)
    mask, bias = _masks(kind, B, H, M, N, g)
    if mask.is_floating_point():
        mask = mask.float()
    leaves = [guarded(t).requires_grad_(True) for t in (q, k, v)]
    with Launches() as launches, poisoned_empty():
        out = cross_attention(*leaves, attn_mask=mask)
        out.backward(guarded(dout))
    _launched(backend, launches, "cross_attention_fwd_kernel")
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = _softmax_reference(*refs, bias)
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, got, want in zip(("dq", "dk", "dv"), (t.grad for t in leaves), (t.grad for t in refs)):
        assert_close(got, want, torch.float32, name)
    dead = (bias == NEG).all(-1)  # (B, H, M): zero output, zero gradient contribution
    assert dead.any() == (kind in ("holes", "float-per-head"))
    assert torch.equal(out.detach().transpose(1, 2)[dead], torch.zeros_like(out.transpose(1, 2)[dead]))


def test_attn_mask_with_kv_lens_and_clamped_lengths(backend):
    """A mask and kv_lens together; lengths past N or below 0 are clamped (never read on the host),
    the same on every backend and with value checks on or off."""
    g = torch.Generator().manual_seed(3)
    B, M, N, H, D = 3, 4, 40, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask = torch.rand(B, 1, M, N, generator=g) > 0.3
    k[2, 17:], v[2, 17:] = float("nan"), float("nan")  # padding past kv_lens is never read
    # int64 lengths past int32's range clamp to N or 0 too (a cast alone wraps 2**31 to a negative length, 2**32 + 5
    # and -2**32 + 5 to 5)
    for lens in (torch.tensor([50, -3, 17]), torch.tensor([2**31, -2**40, 17]), torch.tensor([2**32 + 5, -2**32 + 5, 17])):
        valid = torch.arange(N)[None, :] < lens.clamp(0, N)[:, None]
        bias = _additive(mask).masked_fill(~valid[:, None, None, :], NEG).expand(B, H, M, N)
        ref, _ = _softmax_reference(q, k.nan_to_num(), v.nan_to_num(), bias)
        for checks in ("0", "1"):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("DECO_OPS_CHECKS", checks)
                out = cross_attention(q, k, v, attn_mask=mask, kv_lens=lens)
            assert_close(out, ref, torch.float32, f"out (lens={lens.tolist()}, checks={checks})")
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_mask_is_added_in_fp32_for_16bit_queries(backend, dtype):
    """An fp32 float mask with 16-bit q is added in fp32 on every path (docs/masks.md), as
    ``F.scaled_dot_product_attention`` adds it: a bias of ~40 rounded to bf16 first (steps of 0.25)
    would be 13x less accurate. A row of ``finfo(float32).min`` (Hugging Face's "masked") stays a
    uniform average: cast to 16 bits first it would overflow into -inf and give zeros."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot in Triton's interpreter is not bf16")
    g = torch.Generator().manual_seed(5)
    B, M, N, H, D = 2, 6, 48, 2, 32
    q, k, v = (randn(*shape, dtype=dtype, generator=g) for shape in ((B, M, H, D), (B, N, H, D), (B, N, H, D)))
    mask = randn(B, 1, M, N, generator=g) * 4 + 40
    leaves = [guarded(t).requires_grad_(True) for t in (q, k, v)]
    dout = randn(B, M, H, D, dtype=dtype, generator=g)
    with poisoned_empty():
        out = cross_attention(*leaves, attn_mask=mask)
        grads = torch.autograd.grad(out, leaves, dout)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = _softmax_reference(*refs, mask.double().expand(B, H, M, N))
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    eager = [t.detach().requires_grad_(True) for t in (q, k, v)]
    heads_first = [t.transpose(1, 2) for t in eager]
    eager_out = torch.nn.functional.scaled_dot_product_attention(*heads_first, attn_mask=mask).transpose(1, 2)
    eager_grads = torch.autograd.grad(eager_out, eager, dout)
    for name, got, want, by_eager in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), (eager_out, *eager_grads)):
        assert_close(got, want, dtype, name, eager=by_eager, eager_factor=1.5, tighten=True)
    mask[1, 0, 2] = torch.finfo(torch.float32).min
    out = cross_attention(q, k, v, attn_mask=mask)
    uniform = v[1].double().mean(0)  # (H, D): the masked row averages every value
    assert (out[1, 2].double() - uniform).abs().max() < 2e-2


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("strategy", ["auto", "fused"])  # on the PyTorch backend: SDPA's CPU kernel, the reference path
def test_rows_of_the_lowest_finite_bias_stay_uniform(backend, dtype, mask_dtype, strategy):
    """A row whose every key carries the mask dtype's lowest finite value (Hugging Face's "masked")
    is softmax(S + bias) as PyTorch computes it, on every path and for every pair of dtypes: the bias
    is clamped at -1e30 (``reference_attention.MIN_BIAS``), never cast into -inf (a dead row:
    zeros). Past about -1e8 the scores are lost next to it and the row averages every value."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 tl.dot in Triton's interpreter is not bf16")
    g = torch.Generator().manual_seed(7)
    B, M, N, H, D = 2, 4, 24, 2, 16
    q, k, v = (randn(*shape, dtype=dtype, generator=g) for shape in ((B, M, H, D), (B, N, H, D), (B, N, H, D)))
    mask = torch.zeros(B, 1, M, N, dtype=mask_dtype)
    mask[1, 0, 3] = torch.finfo(mask_dtype).min
    mask[0, 0, :, 5:] = NEG
    with deco_ops.use_strategy(strategy):
        out, weights = cross_attention(q, k, v, attn_mask=mask, need_weights=True, average_attn_weights=False)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    bias = mask.double()
    bias = torch.where(bias == NEG, NEG, bias.clamp(min=reference_attention.MIN_BIAS))
    ref, ref_p = _softmax_reference(q, k, v, bias.expand(B, H, M, N))
    assert_close(out, ref, dtype, "out")
    others = torch.ones(B, M, dtype=torch.bool)
    others[1, 3] = False  # that row's weights sum to N where the bias hides the scores (docs/masks.md)
    assert_close(weights.transpose(1, 2)[others], ref_p.transpose(1, 2)[others], dtype, "weights of the other rows")
    if torch.finfo(mask_dtype).min < -1e8:  # the scores are lost: every value averaged
        assert (out[1, 3].double() - v[1].double().mean(0)).abs().max() < 2e-2


@pytest.mark.parametrize("mask_dtype", [torch.bfloat16, torch.float16])
def test_16bit_mask_is_added_as_its_values(backend, mask_dtype):
    """A 16-bit float mask (what autocast makes of an fp32 one, or 16-bit queries' own) is added
    as its values, forward, weights and backward, with fp32 queries so that every dot is fp32 in
    the interpreter too. (Triton's interpreter keeps bf16 as 16-bit integers: a clamp in bf16 read
    every key of a bf16 mask as dropped there, an LSE of -1e30.)"""
    g = torch.Generator().manual_seed(9)
    B, M, N, H, D = 2, 5, 24, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask = (randn(B, H, M, N, generator=g) * 3).masked_fill(torch.rand(B, H, M, N, generator=g) > 0.7, NEG).to(mask_dtype)
    leaves = [leaf(t) for t in (q, k, v)]
    out, weights = cross_attention(*leaves, attn_mask=mask, need_weights=True)
    dout, dw = randn(B, M, H, D, generator=g), randn(B, M, N, generator=g)
    grads = torch.autograd.grad((out, weights), leaves, (dout, dw))
    refs = [leaf(t, torch.float64) for t in (q, k, v)]
    ref, p = _softmax_reference(*refs, mask.double())
    ref_grads = torch.autograd.grad((ref, p.mean(1)), refs, (dout.double(), dw.double()))
    for name, got, want in zip(("out", "weights", "dq", "dk", "dv"), (out, weights, *grads), (ref, p.mean(1), *ref_grads)):
        assert_close(got, want, torch.float32, f"{name} ({mask_dtype} mask)")


def test_float8_mask_is_its_fp32_values(backend):
    """A float8 mask (no -inf in e4m3fn, no clamp kernel for it) is added as its fp32 values."""
    g = torch.Generator().manual_seed(8)
    q, k, v = randn(2, 3, 2, 16, generator=g), randn(2, 9, 2, 16, generator=g), randn(2, 9, 2, 16, generator=g)
    mask = (randn(2, 1, 3, 9, generator=g) * 2).to(torch.float8_e4m3fn)
    torch.testing.assert_close(cross_attention(q, k, v, attn_mask=mask), cross_attention(q, k, v, attn_mask=mask.float()), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["auto", "fused"])  # on the PyTorch backend: SDPA's CPU kernel, the reference path
def test_nan_keys_dropped_for_every_query_are_ignored(backend, strategy):
    """NaN in k at keys a padding mask drops for every query of the batch entry is ignored on every
    path (the fused kernels set such a score to -inf; SDPA's kernels would add the mask to a NaN
    score, so the PyTorch path zeroes those keys first); output, weights and gradients (dQ = dS K
    reads NaN keys as zeros: 0 * NaN would be NaN)."""
    g = torch.Generator().manual_seed(6)
    B, M, N, H, D = 3, 5, 40, 2, 16
    q, k, v = randn(1, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    keep = torch.arange(N)[None, :] < torch.tensor([40, 23, 9])[:, None]
    for mask in (keep[:, None, None, :], torch.zeros(B, 1, 1, N).masked_fill(~keep[:, None, None, :], NEG)):
        k_nan = k.masked_fill(~keep[:, :, None, None], float("nan"))
        leaves = [guarded(t).requires_grad_(True) for t in (q, k_nan, v)]
        dout, dw = randn(B, M, H, D, generator=g), randn(B, M, N, generator=g)
        with deco_ops.use_strategy(strategy):
            out, weights = cross_attention(*leaves, attn_mask=mask, need_weights=True)
            grads = torch.autograd.grad((out, weights), leaves, (dout, dw))
        refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        ref, ref_p = _softmax_reference(*refs, _additive(mask).double().expand(B, H, M, N))
        ref_weights = ref_p.mean(1)
        if mask.dtype == torch.bool:  # frozen keys and values (a frozen encoder's), only the queries trained: dQ alone
            q_alone = guarded(q).requires_grad_(True)
            with deco_ops.use_strategy(strategy):
                (dq_alone,) = torch.autograd.grad(cross_attention(q_alone, guarded(k_nan), guarded(v), attn_mask=mask), q_alone, dout)
            assert_close(dq_alone, torch.autograd.grad(ref, refs[0], dout.double(), retain_graph=True)[0], torch.float32,
                         "dq, frozen keys")
        ref_grads = torch.autograd.grad((ref, ref_weights), refs, (dout.double(), dw.double()))
        for name, got, want in zip(("out", "weights", "dq", "dk", "dv"), (out, weights, *grads), (ref, ref_weights, *ref_grads)):
            assert_close(got, want, torch.float32, f"{name} ({mask.dtype} mask)")


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("strategy", ["auto", "fused"])
def test_nan_in_a_float_mask_gives_the_rows_it_reaches_nan(backend, mask_dtype, strategy):
    """A NaN in a float mask is added as NaN, as ``F.scaled_dot_product_attention`` adds it: the
    query rows it reaches are NaN (output and weights), every other row is the softmax of its own
    scores, and the gradients are NaN where SDPA's are (the row's LSE is NaN, not the +inf of a row
    without keys: then dV would be NaN at the NaN key only). (The kernels' clamp at -1e30 once
    turned NaN into -1e30: a key silently dropped.)"""
    g = torch.Generator().manual_seed(10)
    B, M, N, H, D = 2, 4, 24, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask = randn(B, H, M, N, generator=g).to(mask_dtype)
    mask[1, 0, 2, 7] = float("nan")
    leaves, exact = [leaf(t) for t in (q, k, v)], [leaf(t, torch.float64) for t in (q, k, v)]
    with deco_ops.use_strategy(strategy):
        out, weights = cross_attention(*leaves, attn_mask=mask, need_weights=True, average_attn_weights=False)
    out.sum().backward()
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in exact), attn_mask=mask.double())
    sdpa.sum().backward()
    assert all(torch.equal(torch.isnan(a.grad), torch.isnan(b.grad)) for a, b in zip(leaves, exact))
    out, weights = out.detach(), weights.detach()
    assert torch.equal(torch.isnan(out), torch.isnan(sdpa.detach().transpose(1, 2)))
    assert torch.isnan(out[1, 2, 0]).all() and not torch.isnan(out[1, 2, 1]).any() and torch.isnan(out).sum() == D
    assert torch.isnan(weights[1, 0, 2]).all() and torch.isnan(weights).sum() == N
    ref, ref_p = _softmax_reference(q, k, v, mask.double().nan_to_num(0.0))
    rows = ~torch.isnan(out)
    assert_close(out[rows], ref[rows], torch.float32, "out of the other rows")
    assert_close(weights[~torch.isnan(weights)], ref_p[~torch.isnan(weights)], torch.float32, "weights of the other rows")


@pytest.mark.parametrize("average", [True, False])
def test_weights_match_softmax_and_carry_gradients(backend, average):
    g = torch.Generator().manual_seed(4)
    B, M, N, H, D = 2, 6, 70, 2, 16
    q, k, v = randn(1, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask, bias = _masks("float-per-head", B, H, M, N, g)
    leaves = [leaf(t) for t in (q, k, v)]
    with Launches() as launches, poisoned_empty():
        out, weights = cross_attention(*leaves, attn_mask=mask.float(), need_weights=True, average_attn_weights=average)
    _launched(backend, launches, "cross_attention_fwd_kernel", "cross_attention_weights_kernel")
    refs = [leaf(t, torch.float64) for t in (q, k, v)]
    ref, p = _softmax_reference(*refs, bias)
    ref_w = p.mean(1) if average else p
    assert weights.shape == ref_w.shape and weights.dtype == torch.float32
    assert_close(out, ref, torch.float32, "out")
    assert_close(weights, ref_w, torch.float32, "weights")
    dw = randn(*weights.shape, generator=g)
    alone = torch.autograd.grad(weights, leaves[:2], dw, retain_graph=True)  # the output unused
    want = torch.autograd.grad(ref_w, refs[:2], dw.double(), retain_graph=True)
    for name, a, b in zip(("dq", "dk"), alone, want):
        assert_close(a, b, torch.float32, f"{name} through the weights")
    for live in (0, 1):  # q or k alone requiring grad (frozen keys, a frozen query table)
        parts = [t.detach().requires_grad_(i == live) for i, t in enumerate((q, k, v))]
        _, w = cross_attention(*parts, attn_mask=mask.float(), need_weights=True, average_attn_weights=average)
        (got,) = torch.autograd.grad(w, parts[live], dw)
        assert_close(got, want[live], torch.float32, f"{'dq' if live == 0 else 'dk'} through the weights, the other frozen")
    got = torch.autograd.grad((weights * dw).sum() + out.sum(), leaves)
    want = torch.autograd.grad((ref_w * dw.double()).sum() + ref.sum(), refs)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, torch.float32, name)


@pytest.mark.parametrize("average", [True, False])
def test_weights_of_more_queries_than_one_program(average):
    """33 queries: two query blocks of the weights kernel's grid axis 1 (32 rows a program under the
    interpreter), each writing the weights of its own rows, per head and averaged."""
    g = torch.Generator().manual_seed(6)
    B, M, N, H, D = 1, 33, 5, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask, bias = _masks("float-per-head", B, H, M, N, g)
    with deco_ops.use_backend("triton"), Launches() as launches, poisoned_empty():
        _, weights = cross_attention(q, k, v, attn_mask=mask.float(), need_weights=True, average_attn_weights=average)
    _launched("triton", launches, "cross_attention_weights_kernel")
    _, p = _softmax_reference(q, k, v, bias)
    assert_close(weights, p.mean(1) if average else p, torch.float32, "weights")


def test_weights_under_dropout_are_the_ones_the_output_used(backend):
    g = torch.Generator().manual_seed(5)
    B, M, N, H, D = 2, 5, 45, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    mask = torch.rand(B, 1, 1, N, generator=g) > 0.3
    kv_lens = torch.tensor([N, 30])  # batch 1's dropout counters still count N keys a query row
    out, w = cross_attention(q, k, v, attn_mask=mask, kv_lens=kv_lens, dropout_p=0.3,
                             generator=torch.Generator().manual_seed(9), need_weights=True, average_attn_weights=False)
    assert (w == 0).float().mean() > 0.3  # dropped and masked entries
    assert_close(out, torch.einsum("bhmn,bnhd->bmhd", w.double(), v.double()), torch.float32, "out vs W V")
    # averaged over the heads (one program sums them): each head with its own keep mask, as the output
    _, w_avg = cross_attention(q, k, v, attn_mask=mask, kv_lens=kv_lens, dropout_p=0.3,
                               generator=torch.Generator().manual_seed(9), need_weights=True)
    assert_close(w_avg, w.double().mean(1), torch.float32, "averaged weights vs the per-head ones")


def test_weights_gradient_under_dropout(backend):
    """The weights returned under dropout are keep * P / (1 - p) with the output's own keep mask
    (read back from the weights: P > 0 everywhere here), so their gradient is softmax's backward
    of keep * dW / (1 - p): against float64 with that mask."""
    g = torch.Generator().manual_seed(6)
    B, M, N, H, D = 2, 5, 45, 2, 16
    q, k, v = randn(B, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    leaves = [leaf(t) for t in (q, k)]
    _, w = cross_attention(*leaves, v, dropout_p=0.4, generator=torch.Generator().manual_seed(9), need_weights=True,
                           average_attn_weights=False)
    keep = (w != 0).double()
    assert 0.2 < 1 - keep.mean() < 0.6
    dw = randn(*w.shape, generator=g)
    got = torch.autograd.grad(w, leaves, dw)
    refs = [leaf(t, torch.float64) for t in (q, k)]
    _, p = _softmax_reference(*refs, v, torch.zeros(B, H, M, N))
    want = torch.autograd.grad(p * keep / 0.6, refs, dw.double())
    for name, a, b in zip(("dq", "dk"), got, want):
        assert_close(a, b, torch.float32, f"{name} through the weights under dropout")


def test_weights_differentiated_after_the_output_changed_in_place(backend):
    """The output changed in place, then only the weights differentiated (``nn.MultiheadAttention``
    runs it): the forward's node is reached through the LSE the weights read, with no output
    gradient, and returns before it reads its saved tensors (whose versions the change moved). The
    gradients are those of a call whose output stayed as it was (the same dropout draw)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = randn(2, 3, 2, 8, generator=g), randn(2, 6, 2, 8, generator=g), randn(2, 6, 2, 8, generator=g)
    grads = []
    for change in (True, False):
        leaves = [leaf(t) for t in (q, k, v)]
        out, weights = cross_attention(*leaves, dropout_p=0.3, generator=torch.Generator().manual_seed(1), need_weights=True)
        if change:
            out.mul_(3)
        grads.append(torch.autograd.grad(weights.square().sum(), leaves[:2]))
    for name, changed, kept in zip(("dq", "dk"), *grads):
        assert torch.equal(changed, kept), name


@pytest.mark.parametrize(
    "mask,error,match",
    [
        (torch.zeros(2, 3, dtype=torch.int32), TypeError, "attn_mask must be bool"),
        (torch.zeros(5, 7), ValueError, r"does not broadcast to \(B, H, M, N\)"),
        (torch.zeros(1, 1, 1, 1, 9), ValueError, "does not broadcast"),
        (torch.zeros(4, 9, requires_grad=True), ValueError, "attn_mask requires grad"),
    ],
)
def test_bad_attn_mask_raises(mask, error, match):
    q, k = randn(2, 4, 2, 8), randn(2, 9, 2, 8)
    with pytest.raises(error, match=match):
        cross_attention(q, k, k, attn_mask=mask)


# --- nn.MultiheadAttention's calls --------------------------------------------------------------

E, H, B, L, S = 16, 2, 3, 4, 9


def _pair(**config):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **config).double()
    ours = CrossAttention(E, H, **config)
    ours.load_state_dict(mha.state_dict())
    return ours, mha


def _mha_masks(kind, g, keys=S):
    ignore = torch.rand(B, keys, generator=g) > 0.6
    ignore[:, 1] = False
    if kind == "left-padding":
        return {"key_padding_mask": torch.arange(keys)[None, :] < torch.tensor([0, 3, keys - 2])[:, None]}
    if kind == "holes":
        return {"key_padding_mask": ignore}
    if kind == "float-per-key":
        return {"key_padding_mask": randn(B, keys, generator=g).masked_fill(ignore, NEG)}
    if kind == "float-query-key":
        return {"attn_mask": randn(L, keys, generator=g).masked_fill(torch.rand(L, keys, generator=g) > 0.8, NEG)}
    if kind == "bool-per-head+padding":
        return {"attn_mask": torch.rand(B * H, L, keys, generator=g) > 0.8, "key_padding_mask": ignore}
    raise ValueError(kind)


def _forward_backward(module, inputs, dtype, **kwargs):
    leaves = [leaf(t, dtype) for t in inputs]
    kwargs = {n: m.to(dtype) if isinstance(m, torch.Tensor) and m.is_floating_point() else m for n, m in kwargs.items()}
    out, weights = module(*leaves, **kwargs)
    loss = (out * randn(*out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)).nansum()
    if weights is not None:
        loss = loss + (weights * randn(*weights.shape, generator=torch.Generator().manual_seed(8)).to(dtype)).nansum()
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters()} | {f"input {i}": t.grad for i, t in enumerate(leaves)}
    return out.detach(), None if weights is None else weights.detach(), grads


@pytest.mark.parametrize("kind", ["left-padding", "holes", "float-per-key", "float-query-key", "bool-per-head+padding"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_multihead_attention_default_call_runs_the_kernels(kind, batch_first, average):
    """need_weights=True (MHA's default) with any mask: our kernels end to end (forward, weights,
    backward), equal to nn.MultiheadAttention in float64 with value checks off."""
    ours, mha = _pair(batch_first=batch_first)
    g = torch.Generator().manual_seed(11)
    shape = (lambda n: (B, n, E)) if batch_first else (lambda n: (n, B, E))
    inputs = (randn(*shape(L), generator=g), randn(*shape(S), generator=g), randn(*shape(S), generator=g))
    masks = _mha_masks(kind, g)
    with deco_ops.use_backend("triton"), Launches() as launches:
        out, weights, grads = _forward_backward(ours, inputs, torch.float32, average_attn_weights=average, **masks)
    for name in ("cross_attention_fwd_kernel", "cross_attention_weights_kernel", "cross_attention_bwd_single_pass_kernel"):
        assert launches.counts[name] >= 1, f"{name} not launched: {dict(launches.counts)}"
    ref, ref_weights, ref_grads = _forward_backward(mha, inputs, torch.float64, average_attn_weights=average, **masks)
    assert_close(out, ref, torch.float32, "attn_output")
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    for name, got in grads.items():
        assert_close(got, ref_grads[name], torch.float32, f"grad {name}")


def test_queries_without_keys_give_nan_as_multihead_attention():
    ours, mha = _pair(batch_first=True)
    g = torch.Generator().manual_seed(16)
    q, k = randn(B, L, E, generator=g), randn(B, S, E, generator=g)
    ignore = torch.rand(B, S, generator=g) > 0.5
    ignore[1] = True
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[2] = True  # query 2 sees nothing in any batch
    for average in (True, False):
        with deco_ops.use_backend("triton"):
            out, weights = ours(q, k, k, key_padding_mask=ignore, attn_mask=attn_mask, average_attn_weights=average)
        ref, ref_weights = mha(q.double(), k.double(), k.double(), key_padding_mask=ignore, attn_mask=attn_mask,
                               average_attn_weights=average)
        assert torch.isnan(ref[1]).all() and torch.isnan(ref[:, 2]).all()
        assert_close(out, ref, torch.float32, "attn_output")  # the same NaN positions, the rest close
        assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    per_head = torch.zeros(B * H, L, S, dtype=torch.bool)
    per_head[H * 1 + 0, 3] = True  # batch 1, head 0, query 3 sees nothing; head 1 sees every key
    for average in (True, False):
        with deco_ops.use_backend("triton"):
            out, weights = ours(q, k, k, attn_mask=per_head, average_attn_weights=average)
        ref, ref_weights = mha(q.double(), k.double(), k.double(), attn_mask=per_head, average_attn_weights=average)
        assert torch.isnan(ref_weights[1, 3] if average else ref_weights[1, 0, 3]).all()
        assert_close(out, ref, torch.float32, "attn_output (one head without keys)")
        assert_close(weights, ref_weights, torch.float32, "attn_output_weights (one head without keys)")


@pytest.mark.slow  # ~20 s in the interpreter; the fast suite covers 1030 keys at the op level
def test_multihead_attention_long_keys_bias_kv_zero_attn():
    """1030 keys, add_bias_kv and add_zero_attn (extra keys and zero mask columns after the given
    ones, as MHA), left padding, need_weights: our kernels, MHA's values."""
    ours, mha = _pair(add_bias_kv=True, add_zero_attn=True, batch_first=True)
    g = torch.Generator().manual_seed(12)
    batch, keys = 2, 1030
    inputs = (randn(batch, L, E, generator=g), randn(batch, keys, E, generator=g), randn(batch, keys, E, generator=g))
    masks = {"key_padding_mask": torch.arange(keys)[None, :] < torch.tensor([5, 1000])[:, None]}
    with deco_ops.use_backend("triton"), Launches() as launches:
        out, weights, grads = _forward_backward(ours, inputs, torch.float32, **masks)
    assert launches.counts["cross_attention_fwd_kernel"] >= 1
    ref, ref_weights, ref_grads = _forward_backward(mha, inputs, torch.float64, **masks)
    assert weights.shape == (batch, L, keys + 2)
    assert_close(out, ref, torch.float32, "attn_output")
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    for name, got in grads.items():
        assert_close(got, ref_grads[name], torch.float32, f"grad {name}")


def test_learned_mask_runs_pytorch():
    """A mask that requires grad (a learned bias) runs F.multi_head_attention_forward: the kernels
    give masks no gradient."""
    ours, mha = _pair()
    g = torch.Generator().manual_seed(13)
    q, k = randn(L, B, E, generator=g), randn(S, B, E, generator=g)
    bias = randn(L, S, generator=g).requires_grad_(True)
    with Launches() as launches:
        out, _ = ours(q, k, k, attn_mask=bias)
    assert launches.total() == 0
    out.sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()


def test_query_resampler_key_padding_mask_with_holes(backend):
    torch.manual_seed(0)
    m = QueryResampler(4, 16, 12, 2)
    x = randn(2, 30, 12, generator=torch.Generator().manual_seed(14))
    ignore = torch.rand(2, 30, generator=torch.Generator().manual_seed(15)) > 0.5
    ignore[:, 0] = False
    x_nan = x.masked_fill(ignore[..., None], 1e4)  # ignored tokens must not matter
    out = m(x_nan, key_padding_mask=ignore)
    for b in range(2):  # each row alone, only its kept tokens
        alone = m(x[b:b + 1, ~ignore[b]])
        assert_close(out[b:b + 1], alone, torch.float32, f"batch {b}")


def test_torch_compile_takes_a_mask_first_seen_after_a_dynamic_recompile():
    """``cross_attention`` compiled, called without a mask, then with a per-key mask at other sizes:
    the recompile makes B, M and N symbolic while the new mask's shape is static, and the broadcast
    check compared them with ``in`` (False while Dynamo traces), raising its ValueError on a mask
    that broadcasts. Forward and gradients against the float64 softmax."""
    torch._dynamo.reset()
    compiled = torch.compile(cross_attention, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    H, D = 2, 8
    compiled(*(randn(2, n, H, D, generator=g) for n in (4, 5, 5)))
    B, M, N = 3, 6, 9
    q, k, v = (leaf(randn(B, n, H, D, generator=g), torch.float32) for n in (M, N, N))
    mask = torch.rand(B, 1, 1, N, generator=g) > 0.3
    mask[..., 0] = True
    out = compiled(q, k, v, attn_mask=mask)
    dout = randn(*out.shape, generator=g)
    out.backward(dout)
    ref_inputs = [leaf(t.detach(), torch.float64) for t in (q, k, v)]
    ref, _ = _softmax_reference(*ref_inputs, _additive(mask).expand(B, H, M, N))
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), ref_inputs):
        assert_close(got, want.grad, torch.float32, f"grad {name}")
