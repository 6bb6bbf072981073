"""attn_implementation="deco_ops" in Hugging Face transformers: BLIP-2 / InstructBLIP Q-Formers (tiny,
random init) against the same models' eager attention in float64, forward and backward, with and
without padding masks; every mask a layer passes (holes, left padding, per query, per head,
additive) goes straight to the kernels and matches SDPA; causal layers raise.

Each attention call costs about a second in Triton's interpreter, so the padded Q-Former case and
the mask cases run the Triton kernels and the others the default CPU path;
tests/test_cross_attention.py holds the two backends to each other.
"""

import contextlib
import copy
import functools
from unittest import mock

import pytest
import torch

pytest.importorskip("transformers")

import deco_ops  # noqa: E402
import deco_ops.integrations.transformers as hf_deco  # noqa: E402
from deco_ops.integrations.transformers import attention as hf_attention  # noqa: E402
from deco_ops.integrations.transformers._require import transformers_module  # noqa: E402
from harness import DEVICE, assert_close  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
)
from transformers.masking_utils import eager_mask  # noqa: E402

QFORMER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=24,
               cross_attention_frequency=1, vocab_size=50, max_position_embeddings=64)


def _pair(model_cls, config):
    """(deco_ops model in fp32, eager model in float64) with the same random weights."""
    torch.manual_seed(0)
    ours = model_cls(config).eval()
    eager = model_cls(config.__class__(**config.to_dict())).eval()
    eager.load_state_dict(ours.state_dict())
    ours.set_attn_implementation("deco_ops")
    eager.set_attn_implementation("eager")
    return ours, eager.double()


@pytest.fixture(scope="module")
def qformers():
    return _pair(Blip2QFormerModel, Blip2QFormerConfig(**QFORMER))


def _encoder_mask(lengths, n):
    return (torch.arange(n) < torch.tensor(lengths)[:, None]).long()


# tiny random HF models compared on CPU tensors on the default backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("cpu_tensors", "auto_backend")


@pytest.mark.parametrize("lengths,backend", [(None, "auto"), ((20, 13), "triton")])
def test_blip2_qformer_matches_eager_forward_and_backward(qformers, lengths, backend):
    # The Triton backend runs on the suite's device: the interpreter on a CPU, the compiled kernels
    # on a GPU (which has no interpreter for CPU tensors).
    device = DEVICE if backend == "triton" else torch.device("cpu")
    ours, eager = qformers
    with deco_ops.use_backend(backend):
        _check_qformer(copy.deepcopy(ours).to(device), eager, lengths, device)


@contextlib.contextmanager
def _through_deco_ops(layers: int):
    """The block's model calls reach ``deco_ops.cross_attention`` once per attention layer at least
    (a silent fallback to SDPA or eager attention would match eager too)."""
    with mock.patch.object(hf_attention, "cross_attention", wraps=hf_attention.cross_attention) as calls:
        yield
    assert calls.call_count >= layers, f"deco_ops.cross_attention ran {calls.call_count} times for {layers} attention layers"


def _check_qformer(ours, eager, lengths, device):
    """``ours`` on ``device`` against the float64 ``eager`` on the CPU."""
    gen = torch.Generator().manual_seed(1)
    q, enc = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 20, 24, generator=gen)
    mask = None if lengths is None else _encoder_mask(lengths, 20)
    on_device = None if mask is None else mask.to(device)
    leaves = [q.to(device, copy=True).requires_grad_(), enc.to(device, copy=True).requires_grad_()]
    refs = [q.double().requires_grad_(), enc.double().requires_grad_()]
    with _through_deco_ops(ours.config.num_hidden_layers):
        y = ours(query_embeds=leaves[0], encoder_hidden_states=leaves[1], encoder_attention_mask=on_device).last_hidden_state
    y64 = eager(query_embeds=refs[0], encoder_hidden_states=refs[1], encoder_attention_mask=mask).last_hidden_state
    assert_close(y.cpu(), y64, torch.float32, tol=1e-5)
    dy = torch.randn(y.shape, generator=gen)
    ours.zero_grad(), eager.zero_grad()
    y.backward(dy.to(device))
    y64.backward(dy.double())
    assert_close(leaves[0].grad.cpu(), refs[0].grad, torch.float32, "grad query_embeds", tol=1e-5)
    assert_close(leaves[1].grad.cpu(), refs[1].grad, torch.float32, "grad encoder_hidden_states", tol=1e-5)
    for (name, p), p64 in zip(ours.named_parameters(), eager.parameters()):
        if name.endswith("key.bias"):  # softmax ignores a per-row shift: exactly zero, up to rounding
            assert p.grad.abs().max() < 1e-5
        elif p64.grad is not None:
            assert_close(p.grad.cpu(), p64.grad, torch.float32, f"grad {name}", tol=1e-5)
    if lengths is not None:  # masked image tokens get exactly zero weight: garbage there changes nothing
        poisoned = enc.clone()
        poisoned[1, lengths[1]:] = 1e4
        with torch.no_grad():
            again = ours(query_embeds=q.to(device), encoder_hidden_states=poisoned.to(device),
                         encoder_attention_mask=on_device).last_hidden_state
        assert torch.equal(again, y.detach())


def test_output_attentions_returns_eager_s_weights(qformers):
    """``output_attentions=True`` returns what eager attention returns, the (B, H, M, N)
    probabilities of every self- and cross-attention layer (from the kernels' saved LSE), padded
    image tokens at weight 0; never an empty tuple."""
    ours, eager = qformers
    gen = torch.Generator().manual_seed(2)
    q, enc = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 20, 24, generator=gen)
    mask = _encoder_mask((20, 13), 20)
    got = ours(query_embeds=q, encoder_hidden_states=enc, encoder_attention_mask=mask, output_attentions=True)
    want = eager(query_embeds=q.double(), encoder_hidden_states=enc.double(), encoder_attention_mask=mask, output_attentions=True)
    for kind in ("attentions", "cross_attentions"):
        assert len(getattr(got, kind)) == len(getattr(want, kind)) > 0, kind
        for a, b in zip(getattr(got, kind), getattr(want, kind)):
            assert a.shape == b.shape
            assert_close(a, b, torch.float32, kind, tol=1e-5)
    assert not got.cross_attentions[0][1, :, :, 13:].any()


def test_instructblip_qformer_text_padding_matches_eager():
    """InstructBLIP's Q-Former attends over [queries, instruction text] with the text's padding mask."""
    config = InstructBlipQFormerConfig(**QFORMER)
    ours, eager = _pair(InstructBlipQFormerModel, config)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 50, (2, 5), generator=gen)
    mask = torch.cat([torch.ones(2, 8, dtype=torch.long), _encoder_mask((5, 2), 5)], 1)
    q, enc = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 20, 24, generator=gen)
    with _through_deco_ops(config.num_hidden_layers):
        y = ours(input_ids=ids, attention_mask=mask, query_embeds=q, encoder_hidden_states=enc).last_hidden_state
    y64 = eager(input_ids=ids, attention_mask=mask, query_embeds=q.double(), encoder_hidden_states=enc.double()).last_hidden_state
    assert_close(y, y64, torch.float32, tol=1e-5)


def test_blip2_vision_and_qformer_on_deco_ops_language_model_stays_causal():
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
        qformer_config=dict(QFORMER, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=48,
                         vocab_size=60, max_position_embeddings=64, word_embed_proj_dim=32),
        num_query_tokens=8, image_token_index=59)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    ids = torch.cat([torch.full((2, 8), 59), torch.randint(0, 50, (2, 5), generator=gen)], 1)
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids).logits
        model.set_attn_implementation({"vision_config": "deco_ops", "qformer_config": "deco_ops"})
        got = model(pixel_values=pixels, input_ids=ids).logits
    assert_close(got, expected, torch.float32)
    model.set_attn_implementation("deco_ops")  # the OPT language model is causal: refused, never a fallback
    with pytest.raises(ValueError, match="causal_mask_function"):
        model(pixel_values=pixels, input_ids=ids)


def _qkv(B=2, H=4, M=3, N=6, D=8, kv_heads=None):
    gen = torch.Generator().manual_seed(4)
    return (torch.randn(B, H, M, D, generator=gen), torch.randn(B, kv_heads or H, N, D, generator=gen),
            torch.randn(B, kv_heads or H, N, D, generator=gen))


class _Layer(torch.nn.Module):
    is_causal = False


def test_eager_style_float_mask_and_grouped_heads_match_sdpa():
    q, k, v = _qkv(kv_heads=2)
    keep = _encoder_mask((6, 4), 6).bool()
    mask = eager_mask(2, 3, 6, mask_function=lambda *idx: torch.ones((), dtype=torch.bool), attention_mask=keep)
    out, weights = hf_deco.deco_ops_attention(_Layer(), q, k, v, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, keep[:, None, None], scale=0.3, enable_gqa=True)
    assert weights is None
    assert_close(out, expected.transpose(1, 2), torch.float32)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 0, 1, 1, 0], [1] * 6]).bool()[:, None, None],  # holes
        torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]),  # 2D left padding, integer keep-mask
        torch.zeros(2, 1, 3, 6).masked_fill(torch.eye(3, 6, dtype=torch.bool), -2.0),  # additive bias
        torch.zeros(2, 1, 3, 6).masked_fill(torch.rand(2, 1, 3, 6, generator=torch.Generator().manual_seed(5)) > 0.6,
                                            torch.finfo(torch.float32).min),  # eager-style 0 / dtype minimum
        torch.ones(2, 1, 3, 6, dtype=torch.bool).tril(),  # per query
        torch.rand(2, 4, 1, 6, generator=torch.Generator().manual_seed(6)) > 0.3,  # per head
    ],
    ids=["holes", "left-padding-2d", "additive", "eager-min", "per-query", "per-head"],
)
def test_every_mask_passes_through_to_the_kernels(mask, monkeypatch):
    """Whatever mask a layer passes reaches the fused kernels as it is and matches SDPA, with
    value checks off (CUDA's default)."""
    from hot_path import Launches

    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    q, k, v = (t.to(DEVICE) for t in _qkv())
    mask = mask.to(DEVICE)
    with deco_ops.use_backend("triton"), Launches() as launches:
        out, _ = hf_deco.deco_ops_attention(_Layer(), q, k, v, mask, scaling=0.4)
    assert launches.counts["cross_attention_fwd_kernel"] == 1
    sdpa_mask = mask[:, None, None, :].bool() if mask.dim() == 2 else mask
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), sdpa_mask if sdpa_mask.dtype == torch.bool else sdpa_mask.double(), scale=0.4)
    assert_close(out, expected.transpose(1, 2), torch.float32)


@pytest.mark.parametrize("mask", [None, "bool", "float", "int-2d"])
def test_position_bias_joins_the_mask_as_sdpa_joins_them(mask):
    """A T5-style relative position bias (B or 1, H, M, N) with no mask, a bool keep-mask, a float
    mask or a 2D integer keep-mask (B, N) (a keep-mask as the bool one, not added): the output of
    transformers' own SDPA attention function, in float64."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    bias = torch.randn(1, 4, 3, 6, generator=torch.Generator().manual_seed(7)) * 2
    keep = _encoder_mask((6, 4), 6).bool()[:, None, None]
    masks = {None: None, "bool": keep, "float": torch.zeros(keep.shape).masked_fill(~keep, -3.0), "int-2d": _encoder_mask((6, 4), 6)}
    out, _ = hf_deco.deco_ops_attention(_Layer(), q, k, v, masks[mask], scaling=0.4, position_bias=bias)
    m64 = {"float": masks["float"].double(), "int-2d": keep}.get(mask, masks[mask])
    expected, _ = sdpa_attention_forward(_Layer(), q.double(), k.double(), v.double(), m64, scaling=0.4,
                                         position_bias=bias.double())
    assert_close(out, expected, torch.float32)


def test_position_bias_fill_fits_the_16_bit_keys():
    """fp16 keys with an fp32 position bias (autocast) and a bool mask that hides every key of a
    batch row: the masked scores take the smallest value both dtypes hold (fp16's), as
    transformers' ``create_position_bias_mask`` fills them, so that row still follows its scores
    (float32's minimum would swamp them: a uniform average)."""
    q, k, v = (t.half() for t in _qkv())
    bias = torch.randn(1, 4, 3, 6, generator=torch.Generator().manual_seed(9))
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[0, ..., 4:] = False
    keep[1] = False  # nothing to attend to
    out, _ = hf_deco.deco_ops_attention(_Layer(), q, k, v, keep, scaling=0.4, position_bias=bias)
    filled = torch.where(keep, bias.double(), torch.finfo(torch.float16).min)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), filled, scale=0.4)
    assert_close(out, expected.transpose(1, 2), torch.float16)


def test_layoutlmv3_relative_position_bias_matches_eager():
    """LayoutLMv3 passes its 1D and 2D relative position biases (gathered without grad) as
    ``position_bias``, nothing else carries them: output and every gradient match eager attention
    in float64, with padding."""
    from transformers import LayoutLMv3Config, LayoutLMv3Model

    config = LayoutLMv3Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              has_relative_attention_bias=True, has_spatial_attention_bias=True, visual_embed=False,
                              rel_pos_bins=8, max_rel_pos=16, rel_2d_pos_bins=8, max_rel_2d_pos=32, vocab_size=100,
                              coordinate_size=6, shape_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours, eager = _pair(LayoutLMv3Model, config)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():  # bias tables far from their near-zero initialisation
        for (name, p), p64 in zip(ours.named_parameters(), eager.parameters()):
            if "rel_pos" in name:
                p64.copy_(p.normal_(0, 2.0, generator=gen))
    ids = torch.randint(0, 100, (2, 12), generator=gen)
    corner = torch.randint(0, 400, (2, 12, 2), generator=gen)
    bbox = torch.cat([corner, corner + torch.randint(1, 90, (2, 12, 2), generator=gen)], -1)
    mask = _encoder_mask((12, 9), 12)
    dy = torch.randn(2, 12, 32, generator=gen)
    with _through_deco_ops(config.num_hidden_layers):
        got = ours.train()(input_ids=ids, bbox=bbox, attention_mask=mask).last_hidden_state
    expected = eager.train()(input_ids=ids, bbox=bbox, attention_mask=mask).last_hidden_state
    got.backward(dy)
    expected.backward(dy.double())
    assert_close(got, expected, torch.float32)
    for (name, p), p64 in zip(ours.named_parameters(), eager.parameters()):
        if name.endswith("key.bias"):  # softmax ignores a shift shared by all keys: 0 up to rounding
            assert p.grad.abs().max() < 1e-5 and p64.grad.abs().max() < 1e-12
        elif p64.grad is not None:
            assert_close(p.grad, p64.grad, torch.float32, f"grad {name}")


def test_position_bias_that_requires_grad_raises():
    """A learned bias in training (T5's relative attention bias): no silent zero gradient."""
    bias = torch.randn(1, 4, 3, 6, requires_grad=True)
    with pytest.raises(ValueError, match="position_bias.*requires grad"):
        hf_deco.deco_ops_attention(_Layer(), *_qkv(), None, position_bias=bias)


def test_mask_of_the_wrong_shape_raises():
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 1, 5\) does not broadcast"):
        hf_deco.deco_ops_attention(_Layer(), *_qkv(), torch.ones(2, 1, 1, 5, dtype=torch.bool))


def test_causal_layers_and_unsupported_arguments_raise():
    """A causal layer, or a call that asks for causality (the ``is_causal`` argument overrides the
    layer's attribute, as in transformers' SDPA function), and every argument the kernels do not
    implement raise; ``is_causal=False`` runs a layer marked causal."""
    causal = _Layer()
    causal.is_causal = True
    with pytest.raises(ValueError, match="non-causal"):
        hf_deco.deco_ops_attention(causal, *_qkv(), None)
    with pytest.raises(ValueError, match="non-causal"):
        hf_deco.deco_ops_attention(_Layer(), *_qkv(), None, is_causal=True)
    out, _ = hf_deco.deco_ops_attention(causal, *_qkv(), None, is_causal=False)
    assert_close(out, hf_deco.deco_ops_attention(_Layer(), *_qkv(), None)[0], torch.float32)
    out, _ = hf_deco.deco_ops_attention(torch.nn.Module(), *_qkv(), None)  # a layer that says nothing is not causal
    assert_close(out, hf_deco.deco_ops_attention(_Layer(), *_qkv(), None)[0], torch.float32)
    with pytest.raises(ValueError, match="query has 4 heads, not a multiple of key/value's 3"):
        hf_deco.deco_ops_attention(_Layer(), *_qkv(kv_heads=3), None)
    for name, value in (("sliding_window", 4), ("softcap", 30.0), ("s_aux", torch.zeros(4))):
        with pytest.raises(ValueError, match=f"does not implement {name}="):
            hf_deco.deco_ops_attention(_Layer(), *_qkv(), None, **{name: value})


def test_attention_dropout_reaches_the_kernels():
    """A layer in training passes its attention dropout: the call is ``cross_attention`` with that
    ``dropout_p`` under the same seed, not the undropped attention."""
    q, k, v = _qkv()
    torch.manual_seed(5)
    out, _ = hf_deco.deco_ops_attention(_Layer(), q, k, v, None, scaling=0.4, dropout=0.5)
    torch.manual_seed(5)
    want = deco_ops.cross_attention(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=0.4, dropout_p=0.5)
    assert torch.equal(out, want)
    assert not torch.equal(out, hf_deco.deco_ops_attention(_Layer(), q, k, v, None, scaling=0.4)[0])


def test_padding_mask_longer_than_the_keys_is_cut_to_them():
    """transformers may pass a 2D padding mask longer than ``kv_length`` (a padded cache): the mask
    function keeps its first ``kv_length`` columns, as its own padding-mask helpers do."""
    from transformers.masking_utils import bidirectional_mask_function

    padding = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    mask = hf_deco.deco_ops_mask(2, 3, 4, mask_function=bidirectional_mask_function, attention_mask=padding)
    assert mask.shape == (2, 1, 1, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0, 0], padding[:, :4].bool())


def test_a_padding_mask_that_keeps_every_key_is_dropped_as_for_sdpa(monkeypatch):
    """Without padding (BLIP-2's all-ones image mask) the mask function returns no mask where
    transformers asks it to skip one (``allow_is_bidirectional_skip``, as its SDPA mask does), so the
    mask-free kernels run; a mask with padding, a model that asks for the mask, and a traced call
    keep it."""
    from transformers.masking_utils import bidirectional_mask_function

    mask = functools.partial(hf_deco.deco_ops_mask, 2, 3, 4, mask_function=bidirectional_mask_function)
    ones, padded = torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert mask(attention_mask=ones, allow_is_bidirectional_skip=True) is None
    assert torch.equal(mask(attention_mask=padded, allow_is_bidirectional_skip=True)[:, 0, 0], padded.bool())
    assert mask(attention_mask=ones, allow_is_bidirectional_skip=False).all()
    assert mask(attention_mask=ones).all()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mask(attention_mask=ones, allow_is_bidirectional_skip=True).all()


def test_blip2_qformer_without_image_padding_runs_without_a_mask(qformers):
    """A Q-Former given an all-ones image mask (what Blip2ForConditionalGeneration passes) calls
    the kernels without a mask, and matches eager."""
    ours, eager = qformers
    gen = torch.Generator().manual_seed(3)
    q, enc = torch.randn(2, 8, 32, generator=gen), torch.randn(2, 20, 24, generator=gen)
    ones = torch.ones(2, 20, dtype=torch.long)
    with mock.patch.object(hf_attention, "cross_attention", wraps=hf_attention.cross_attention) as calls:
        y = ours(query_embeds=q, encoder_hidden_states=enc, encoder_attention_mask=ones).last_hidden_state
    assert calls.call_count >= 1 and all(call.kwargs["attn_mask"] is None for call in calls.call_args_list)
    y64 = eager(query_embeds=q.double(), encoder_hidden_states=enc.double(), encoder_attention_mask=ones).last_hidden_state
    assert_close(y, y64, torch.float32, tol=1e-5)


def test_cached_key_offsets_raise():
    """A mask over keys past a cache offset (kv_offset != 0) is not the padding mask's first
    columns: refused, not returned for the wrong keys."""
    from transformers.masking_utils import bidirectional_mask_function

    padding = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"cached key/value offsets \(kv_offset=2\)"):
        hf_deco.deco_ops_mask(2, 3, 4, kv_offset=2, mask_function=bidirectional_mask_function, attention_mask=padding)


def test_missing_transformers_says_how_to_install():
    """(That ``import deco_ops`` never imports transformers is checked in the installed wheel,
    tests/test_packaging.py.)"""
    with pytest.raises(ImportError, match='pip install "transformers>=5"'):
        transformers_module("transformers.no_such_module")
