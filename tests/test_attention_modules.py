"""QueryResampler against a plain-PyTorch resampler on the same weights, forward and gradients;
CrossAttention's dropout; torch.compile(fullgraph=True). CrossAttention against
nn.MultiheadAttention: test_mha_dropin.py."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deco_ops
from deco_ops import attention_modules
from deco_ops.attention_modules import CrossAttention, QueryResampler
from harness import assert_close, peak_bytes, randn


def test_dropout_only_in_training():
    torch.manual_seed(0)
    ours = CrossAttention(32, 2, dropout=0.5, batch_first=True)
    query, key = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        ours.eval()
        a, b = ours(query, key, key, need_weights=False)[0], ours(query, key, key, need_weights=False)[0]
        ours.train()
        c = ours(query, key, key, need_weights=False)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="kv_dim=24"):
        QueryResampler(4, 16, 24, 2)(torch.randn(1, 4, 16))


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(2, 5, 6).int(), TypeError, "x must be a floating tensor, got torch.int32"),
    (torch.randn(2, 5, 6).half(), TypeError, "x has dtype torch.float16 but the module's parameters have torch.float32"),
    (torch.randn(2, 5, 6).double(), TypeError, "x has dtype torch.float64 but the module's parameters have torch.float32"),
    (torch.randn(2, 5, 6, device="meta"), ValueError, "x is on meta but the module's parameters are on cpu"),
], ids=["int", "fp16", "fp64", "meta"])
def test_query_resampler_names_tokens_its_parameters_cannot_take(x, error, match):
    """Named before layer_norm's or F.linear's RuntimeError; bf16 tokens run inside torch.autocast."""
    resampler = QueryResampler(4, 8, 6, 2)
    with pytest.raises(error, match=match):
        resampler(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resampler(torch.randn(2, 5, 6).half()).dtype == torch.bfloat16


@pytest.mark.parametrize("kv_lens,error,match", [(torch.tensor([1.0, 2.0]), TypeError, "kv_lens must be int32 or int64"),
                                                 (torch.tensor([1, 2, 3]), ValueError, "kv_lens has 3 entries but the batch is 2")])
def test_query_resampler_checks_kv_lens_without_tokens(kv_lens, error, match):
    """No key to read (N = 0) is no reason to take a kv_lens every other call refuses."""
    with pytest.raises(error, match=match):
        QueryResampler(4, 8, 6, 2)(torch.randn(2, 0, 6), kv_lens=kv_lens)


@pytest.mark.parametrize("mask", [torch.zeros(1, 7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool), torch.zeros(2, 8)],
                         ids=["one_row", "unbatched", "keys"])
def test_query_resampler_checks_the_padding_mask_shape(mask):
    """(batch, keys) exactly, as nn.MultiheadAttention takes it: a (1, N) mask is not broadcast over
    the batch, nor is another shape left to an IndexError or the op's broadcast error."""
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, keys\) = \(2, 7\)"):
        QueryResampler(4, 8, 6, 2)(torch.randn(2, 7, 6), key_padding_mask=mask)


def test_query_resampler_without_bias_and_its_initialisation():
    """bias=False: none of the four projections has a bias; the learned queries start as Qwen-VL's
    (trunc_normal_ with std 0.02)."""
    torch.manual_seed(0)
    resampler = QueryResampler(64, 32, 6, 2, bias=False)
    assert [m.bias for m in (resampler.q_proj, resampler.k_proj, resampler.v_proj, resampler.out_proj)] == [None] * 4
    assert 0.017 < resampler.queries.std().item() < 0.023 and resampler.queries.abs().max().item() < 0.1


@pytest.mark.parametrize("make,call", [
    (lambda: QueryResampler(4, 16, 12, 2, dropout=0.5), lambda m, x, mask: m(x, key_padding_mask=mask)),
    (lambda: CrossAttention(12, 2, dropout=0.5, batch_first=True), lambda m, x, mask: m(x[:, :3], x, x, mask, need_weights=False)[0]),
], ids=["QueryResampler", "CrossAttention"])
def test_learned_mask_path_drops_in_training_only(auto_backend, make, call):
    """A key_padding_mask that requires grad runs PyTorch's attention: its dropout applies in
    training and not in eval, as on the kernels' path."""
    torch.manual_seed(0)
    module = make()
    g = torch.Generator().manual_seed(3)
    x, learned = randn(2, 7, 12, generator=g), randn(2, 7, generator=g).requires_grad_(True)
    trained = call(module, x, learned)  # not under no_grad: the mask must require grad
    module.eval()
    a, b = call(module, x, learned), call(module, x, learned)
    assert trained.requires_grad and torch.equal(a, b) and not torch.allclose(trained, a)


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "a", None, True])
def test_query_resampler_checks_eps_when_built(eps):
    """Not NaN outputs (eps < 0) or layer_norm's TypeError at the first forward."""
    with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
        QueryResampler(4, 8, 6, 2, eps=eps)


def test_query_resampler_norms_default_to_qwen_vls_eps():
    """Qwen-VL's resampler builds its query and key norms as LayerNorm(eps=1e-6) (``norm_layer``),
    not nn.LayerNorm's 1e-5: a checkpoint loaded into the defaults computes what it was trained with."""
    resampler = QueryResampler(4, 8, 6, 2)
    assert resampler.ln_q.eps == resampler.ln_kv.eps == 1e-6
    given = QueryResampler(4, 8, 6, 2, eps=1e-5)  # and both take the eps given
    assert given.ln_q.eps == given.ln_kv.eps == 1e-5


@pytest.mark.parametrize("make", [lambda: CrossAttention(1024, 2), lambda: QueryResampler(4, 600, 6, 2)], ids=["CrossAttention", "QueryResampler"])
def test_head_dim_above_the_kernels_limit_raises_when_built(make):
    """Named by embed_dim and num_heads where the module is built, not by q's shape at its first forward."""
    limit = deco_ops._validate_attention.MAX_HEAD_DIM
    with pytest.raises(ValueError, match=fr"embed_dim \d+ / num_heads 2 = head dim \d+; .* takes head dims up to {limit}"):
        make()
    assert CrossAttention(2 * limit, 2).head_dim == limit


class PlainResampler(nn.Module):
    """The same computation with eager PyTorch ops: expanded queries, masked softmax attention."""

    def __init__(self, ours: QueryResampler):
        super().__init__()
        self.ours = ours

    def forward(self, x, kv_lens=None, padding_bias=None):
        m = self.ours
        B, N, _ = x.shape
        q = m.q_proj(m.ln_q(m.queries)).expand(B, -1, -1).view(B, -1, m.num_heads, m.head_dim).transpose(1, 2)
        kv = m.ln_kv(x)
        k = m.k_proj(kv).view(B, N, m.num_heads, m.head_dim).transpose(1, 2)
        v = m.v_proj(kv).view(B, N, m.num_heads, m.head_dim).transpose(1, 2)
        mask = None if kv_lens is None else (torch.arange(N)[None, :] < kv_lens[:, None])[:, None, None, :]
        if padding_bias is not None:  # a float key_padding_mask: added to the scores
            bias = padding_bias[:, None, None, :]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return m.out_proj(o.transpose(1, 2).reshape(B, -1, m.embed_dim))


@pytest.mark.parametrize("with_lens,with_mask", [(False, False), (True, False), (True, True)],
                         ids=["dense", "kv_lens", "kv_lens_and_padding_mask"])
def test_query_resampler_matches_plain_pytorch(backend, with_lens, with_mask):
    """Without padding, with kv_lens, and with kv_lens beside a bool key_padding_mask with holes
    (a mask that does not require grad: computed in the kernels)."""
    torch.manual_seed(0)
    ours = QueryResampler(9, 64, 48, 4)
    plain = PlainResampler(QueryResampler(9, 64, 48, 4).double())
    plain.ours.load_state_dict(ours.state_dict())
    x = torch.randn(3, 37, 48)
    kv_lens = torch.tensor([37, 5, 20]) if with_lens else None
    ignore = None
    if with_mask:
        ignore = torch.rand(3, 37, generator=torch.Generator().manual_seed(8)) > 0.6
        ignore[:, 0] = False
    dout = torch.randn(3, 9, 64)
    xs = x.clone().requires_grad_(True)
    out = ours(xs, kv_lens=kv_lens, key_padding_mask=ignore)
    out.backward(dout)
    xd = x.double().requires_grad_(True)
    ref = plain(xd, kv_lens, None if ignore is None else torch.zeros(3, 37, dtype=torch.float64).masked_fill(ignore, float("-inf")))
    ref.backward(dout.double())
    assert out.shape == (3, 9, 64)
    assert_close(out, ref, torch.float32, "output")
    assert_close(xs.grad, xd.grad, torch.float32, "grad x")
    for (name, got), want in zip(ours.named_parameters(), plain.ours.parameters()):
        if name == "k_proj.bias":  # softmax ignores a shift shared by all keys: the gradient is 0
            assert want.grad.abs().max() < 1e-12 and got.grad.abs().max() < 1e-5
            continue
        assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


def test_query_resampler_learns_a_float_padding_mask(auto_backend):
    """A ``key_padding_mask`` that requires grad (a learned bias), with ``kv_lens``: PyTorch's
    attention, which differentiates it, as ``CrossAttention`` (and ``nn.MultiheadAttention``) do;
    output and the mask's gradient against float64."""
    torch.manual_seed(0)
    ours = QueryResampler(5, 16, 12, 2)
    plain = PlainResampler(QueryResampler(5, 16, 12, 2).double())
    plain.ours.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(6)
    x, bias, dout = randn(2, 7, 12, generator=g), randn(2, 7, generator=g), randn(2, 5, 16, generator=g)
    kv_lens = torch.tensor([7, 4])
    learned, learned64 = bias.clone().requires_grad_(True), bias.double().requires_grad_(True)
    out = ours(x, kv_lens=kv_lens, key_padding_mask=learned)
    out.backward(dout)
    ref = plain(x.double(), kv_lens, padding_bias=learned64)
    ref.backward(dout.double())
    assert_close(out, ref, torch.float32, "output")
    assert_close(learned.grad, learned64.grad, torch.float32, "grad key_padding_mask")


def test_query_resampler_takes_a_learned_mask_of_another_dtype():
    """A float64 learned padding bias beside float32 tokens (a bias table kept in double): cast to
    the tokens' dtype as the attention needs it; the output in the tokens' dtype, the bias's
    gradient in its own."""
    torch.manual_seed(0)
    ours = QueryResampler(4, 32, 16, 2)
    x = randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    bias = torch.zeros(2, 8, dtype=torch.float64).masked_fill(torch.arange(8) >= 6, -2.0).requires_grad_(True)
    single = bias.detach().float().requires_grad_(True)
    out, want = ours(x, key_padding_mask=bias), ours(x, key_padding_mask=single)
    out.sum().backward()
    want.sum().backward()
    assert out.dtype == torch.float32 and bias.grad.dtype == torch.float64
    assert_close(out, want, torch.float32, "output")
    assert_close(bias.grad, single.grad.double(), torch.float32, "grad key_padding_mask")


def test_query_resampler_shares_queries():
    """The learned queries reach the op as (1, M, H, D): never expanded over the batch."""
    ours = QueryResampler(4, 32, 16, 2)
    seen = []

    def spy(q, k, v, **kw):
        seen.append((q.shape[0], q.untyped_storage().nbytes()))
        return deco_ops.attention.cross_attention(q, k, v, **kw)

    with mock.patch.object(attention_modules, "cross_attention", spy):
        ours(torch.randn(5, 7, 16))
    assert seen == [(1, 4 * 32 * 4)]


def _compiled_matches_eager(module, *inputs, **kwargs):
    compiled = torch.compile(module, fullgraph=True)
    leaves = [[t.clone().requires_grad_(t.is_floating_point()) for t in inputs] for _ in range(2)]
    results = []
    for fn, args in ((module, leaves[0]), (compiled, leaves[1])):
        module.zero_grad()
        out = fn(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in module.parameters()], [a.grad for a in args if a.requires_grad]))
    (eager_out, eager_p, eager_x), (comp_out, comp_p, comp_x) = results
    torch.testing.assert_close(comp_out, eager_out, atol=1e-5, rtol=1e-4)
    for got, want in zip(comp_p + comp_x, eager_p + eager_x):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    _compiled_matches_eager(
        CrossAttention(32, 2, batch_first=True), torch.randn(2, 5, 32), torch.randn(2, 11, 32), torch.randn(2, 11, 32), need_weights=False
    )
    _compiled_matches_eager(QueryResampler(6, 32, 24, 2), torch.randn(2, 13, 24), torch.tensor([13, 4]))


def test_vmap_over_bool_masks(auto_backend, monkeypatch):
    """``torch.func.vmap`` over an ensemble axis of inputs and bool masks, value checks on: a bool
    mask becomes a bias out of place (filling a fresh tensor in place cannot take a vmapped mask),
    and no mask value is read on the host inside the transform. Each equals the loop of calls."""
    from torch.func import vmap

    monkeypatch.setenv("DECO_OPS_CHECKS", "1")
    g = torch.Generator().manual_seed(5)
    E = 3
    q, k, v = randn(E, 2, 3, 2, 4, generator=g), randn(E, 2, 5, 2, 4, generator=g), randn(E, 2, 5, 2, 4, generator=g)
    keep = torch.rand(E, 2, 1, 1, 5, generator=g) > 0.4
    keep[..., 0] = True
    x = randn(E, 2, 5, 8, generator=g)
    ignore = torch.rand(E, 2, 5, generator=g) > 0.6
    ignore[..., 0] = False
    torch.manual_seed(0)
    xattn, resampler = CrossAttention(8, 2, batch_first=True), QueryResampler(4, 8, 8, 2)
    calls = [
        (lambda q, k, v, m: deco_ops.cross_attention(q, k, v, attn_mask=m), (q, k, v, keep)),
        (lambda x, m: xattn(x[:, :3], x, x, key_padding_mask=m)[0], (x, ignore)),
        (lambda x, m: resampler(x, key_padding_mask=m), (x, ignore)),
    ]
    for fn, args in calls:
        want = torch.stack([fn(*(a[i] for a in args)) for i in range(E)])
        assert_close(vmap(fn)(*args), want, torch.float32)


def test_cross_attention_inference_peak_is_no_more_than_multihead_attentions(auto_backend, capsys):
    """Inference without the weights holds no more at its peak than the ``nn.MultiheadAttention`` it
    replaces (BLIP-2's shape: 32 queries of 768 over 257 tokens of 1024): the projections are
    dropped before out_proj's output exists, as MHA drops them, and as the same math written with
    SDPA between the projections (the tighter bound: MHA's own path copies more). Before 2026-12-07
    q, k and v were held through out_proj: 14640 KiB against 13965 (MHA: 21328)."""
    torch.manual_seed(21)
    ours = CrossAttention(768, 12, kdim=1024, vdim=1024, batch_first=True).eval()
    mha = nn.MultiheadAttention(768, 12, kdim=1024, vdim=1024, batch_first=True).eval()
    mha.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(22)
    query, key = randn(8, 32, 768, generator=g), randn(8, 257, 1024, generator=g)
    with torch.no_grad():
        assert_close(ours(query, key, key, need_weights=False)[0], mha(query, key, key, need_weights=False)[0], torch.float32, "out")
        got = peak_bytes(lambda: ours(query, key, key, need_weights=False))
        eager = peak_bytes(lambda: mha(query, key, key, need_weights=False))
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def lean():  # the same math as a user writes it with SDPA, each projection dropped before out_proj
        return mha.out_proj(F.scaled_dot_product_attention(*[
            F.linear(t, w, b).unflatten(-1, (12, 64)).transpose(1, 2)
            for t, w, b in ((query, mha.q_proj_weight, bq), (key, mha.k_proj_weight, bk), (key, mha.v_proj_weight, bv))
        ]).transpose(1, 2).flatten(2))

    with torch.no_grad():
        assert_close(lean(), mha(query, key, key, need_weights=False)[0], torch.float32, "lean")
        leanest = peak_bytes(lean)
    with capsys.disabled():
        print(f"\nCrossAttention inference peak: ours {got / 2**10:.0f} KiB, nn.MultiheadAttention {eager / 2**10:.0f} KiB, "
              f"SDPA between the projections {leanest / 2**10:.0f} KiB")
    assert got <= min(eager, leanest) + query.numel() * 4 // 8, (got, eager, leanest)
