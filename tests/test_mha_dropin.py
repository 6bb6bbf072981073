"""``CrossAttention`` as a drop-in for ``nn.MultiheadAttention``: same constructor (positional
order, defaults), forward signature and return values, state_dict both ways; compared with a
float64 ``nn.MultiheadAttention`` on the same weights over every option the kernel runs
(batch_first, kdim/vdim, bias, add_bias_kv, add_zero_attn, bool and float padding masks,
unbatched input), forward and gradients, on both backends; need_weights, attn_mask and is_causal
on the kernels too (tests/test_masks.py: any mask pattern); rejected combinations raise; a Hugging
Face keep-mask is recognised."""

import contextlib
import inspect
import itertools
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deco_ops
from deco_ops import CrossAttention, _checks, attention_modules
from deco_ops.attention_modules import mha_masks_to_bias
from harness import assert_close, leaf, randn

E, H, B, L, S = 16, 2, 3, 4, 7
LENGTHS = torch.tensor([S, 3, 1])

# each constructor configuration flips batch_first too, so both layouts meet every option
CONFIGS = {
    "defaults": {},
    "kdim_vdim_no_bias_batch_first": {"kdim": 12, "vdim": 10, "bias": False, "batch_first": True},
    "bias_kv": {"add_bias_kv": True, "batch_first": True},
    "zero_attn_bias_kv_kdim": {"add_zero_attn": True, "add_bias_kv": True, "kdim": 12, "vdim": 10},
}


def _ignore_the_interpreters_own_warning():
    """Triton 3.6's interpreter raises NumPy's "Conversion of an array with ndim > 0 to a scalar"
    deprecation itself when a kernel's ``range()`` bound is a loaded value; no GPU run goes through
    an interpreter, and the tests here are about the warnings of the module."""
    warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)


@contextlib.contextmanager
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ignore_the_interpreters_own_warning()
        yield


def _pair(config):
    """Our module (fp32) and nn.MultiheadAttention (float64) holding the same weights."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **config).double()
    ours = CrossAttention(E, H, **config)
    ours.load_state_dict(mha.state_dict())
    return ours, mha


def _inputs(config, batched=True, seed=1):
    g = torch.Generator().manual_seed(seed)

    def make(n, d):
        if not batched:
            return randn(n, d, generator=g)
        return randn(B, n, d, generator=g) if config.get("batch_first") else randn(n, B, d, generator=g)

    return make(L, E), make(S, config.get("kdim", E)), make(S, config.get("vdim", E))


def _mask(kind, batched=True):
    ignore = torch.arange(S)[None, :] >= LENGTHS[:, None]
    ignore = ignore if batched else ignore[1]
    if kind == "bool":
        return ignore
    if kind == "float":
        return torch.zeros(ignore.shape).masked_fill(ignore, float("-inf"))
    return None


def _run(module, inputs, dtype, **kwargs):
    """Forward and backward in ``dtype`` (float masks too: MHA wants them in the query dtype)."""
    leaves = [leaf(t, dtype) for t in inputs]
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    out, weights = module(*leaves, **kwargs)
    out.backward(randn(*out.shape, generator=torch.Generator().manual_seed(7)).to(dtype))
    grads = {n: p.grad for n, p in module.named_parameters()} | {f"input {i}": t.grad for i, t in enumerate(leaves)}
    return out.detach(), weights, grads


def _compare(ours, mha, inputs, **kwargs):
    out, weights, grads = _run(ours, inputs, torch.float32, **kwargs)
    ref, ref_weights, ref_grads = _run(mha, inputs, torch.float64, **kwargs)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.float32, "attn_output")
    assert (weights is None) == (ref_weights is None)
    if weights is not None:
        assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    assert grads.keys() == ref_grads.keys()
    for name, got in grads.items():
        name = name.removeprefix("_orig_mod.")  # the compiled wrapper's names for ours
        assert_close(got, ref_grads[name], torch.float32, f"grad {name}")


def test_signature_is_multihead_attentions():
    for ours, theirs in ((CrossAttention.__init__, nn.MultiheadAttention.__init__), (CrossAttention.forward, nn.MultiheadAttention.forward)):
        mine, ref = inspect.signature(ours).parameters, inspect.signature(theirs).parameters
        assert [(p.name, p.default, p.kind) for p in mine.values()] == [(p.name, p.default, p.kind) for p in ref.values()]


MASKS = (None, "bool", "float")
OPTIONS = ("batch_first", "bias", "add_bias_kv", "add_zero_attn", "kdim_vdim")


def _config(flags: dict) -> dict:
    config = {k: v for k, v in flags.items() if k != "kdim_vdim"}
    return config | ({"kdim": 12, "vdim": 10} if flags["kdim_vdim"] else {})


def test_every_option_combination_matches_multihead_attention():
    """All 32 combinations of the constructor's options, the padding mask kind (none, bool,
    float) rotating so that every (add_bias_kv, add_zero_attn) pair meets every kind, on the
    default backend (the module's logic does not depend on the backend)."""
    seen = set()
    for i, values in enumerate(itertools.product((False, True), repeat=len(OPTIONS))):
        flags = dict(zip(OPTIONS, values))
        config, mask = _config(flags), MASKS[i % len(MASKS)]
        seen.add((flags["add_bias_kv"], flags["add_zero_attn"], mask))
        ours, mha = _pair(config)
        with deco_ops.use_backend("auto"):
            _compare(ours, mha, _inputs(config), key_padding_mask=_mask(mask), need_weights=False)
    assert len(seen) == 4 * len(MASKS)


@pytest.mark.parametrize("config,mask", [(c, MASKS[i % len(MASKS)]) for i, c in enumerate(CONFIGS)], ids=str)
def test_fused_path_on_triton_kernels(config, mask):
    """Each configuration, each mask once, through the Triton kernels (their key lengths are
    tested in depth in test_cross_attention.py)."""
    ours, mha = _pair(CONFIGS[config])
    with deco_ops.use_backend("triton"):
        _compare(ours, mha, _inputs(CONFIGS[config]), key_padding_mask=_mask(mask), need_weights=False)


@pytest.mark.parametrize("config", ["zero_attn_bias_kv_kdim", "kdim_vdim_no_bias_batch_first"])
def test_unbatched_fused_path(backend, config):
    """Unbatched (L, E) inputs, whatever batch_first says (it concerns batched inputs only)."""
    ours, mha = _pair(CONFIGS[config])
    inputs = _inputs(CONFIGS[config], batched=False)
    _compare(ours, mha, inputs, key_padding_mask=_mask("bool", batched=False), need_weights=False)


@pytest.mark.parametrize("config", [{"kdim": 12}, {"vdim": 10, "batch_first": True}], ids=["kdim", "vdim"])
def test_kdim_or_vdim_alone_matches_multihead_attention(config):
    """One of kdim / vdim given, the other defaulting to embed_dim (not to each other): separate
    projection weights exactly where nn.MultiheadAttention has them, so its state_dict loads."""
    ours, mha = _pair(config)
    assert ours.state_dict().keys() == mha.state_dict().keys()
    _compare(ours, mha, _inputs(config), key_padding_mask=_mask("bool"), need_weights=False)


@pytest.mark.parametrize("average", [True, False])
def test_learned_padding_mask_weights_per_head_or_averaged(average):
    """A key_padding_mask that requires grad (the PyTorch path) returns the weights as asked:
    averaged over the heads, or per head, as nn.MultiheadAttention."""
    config = {"batch_first": True}
    ours, mha = _pair(config)
    learned = torch.zeros(B, S).masked_fill(_mask("bool"), -3.0).requires_grad_(True)
    _compare(ours, mha, _inputs(config), key_padding_mask=learned, average_attn_weights=average)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_learned_padding_mask_on_every_configuration(config):
    """A key_padding_mask that requires grad runs PyTorch's path with each constructor option
    (separate kdim/vdim projections, bias_k/bias_v and the zero key appended, batch_first), batched
    and unbatched, as nn.MultiheadAttention: output, weights and gradients."""
    g = torch.Generator().manual_seed(9)
    for batched, shape in ((True, (B, S)), (False, (S,))):
        ours, mha = _pair(CONFIGS[config])
        learned = randn(*shape, generator=g).requires_grad_(True)
        _compare(ours, mha, _inputs(CONFIGS[config], batched=batched), key_padding_mask=learned)


def test_learned_attn_mask_with_is_causal_runs_as_multihead_attention():
    """is_causal with an attn_mask that requires grad, need_weights=False and no padding mask: MHA
    runs SDPA's top-left causal mask in place of the given one (its contract), on this path too."""
    ours, mha = _pair({})
    learned = (_causal("float") + randn(L, S, generator=torch.Generator().manual_seed(10))).requires_grad_(True)
    _compare(ours, mha, _inputs({}), attn_mask=learned, is_causal=True, need_weights=False)


def test_unbatched_inputs_take_a_per_head_attn_mask(auto_backend):
    """Unbatched inputs take an attn_mask of shape (num_heads, L, S), as nn.MultiheadAttention does."""
    ours, mha = _pair({})
    blocked = torch.rand(H, L, S, generator=torch.Generator().manual_seed(11)) > 0.6
    blocked[..., 0] = False
    _compare(ours, mha, _inputs({}, batched=False), attn_mask=blocked, average_attn_weights=False)


def test_float_padding_mask_never_warns():
    """The every-key-ignored warning concerns bool masks only: a float mask of any values is a bias."""
    ours, _ = _pair({})
    q, k, _ = _inputs({})
    with _warnings_are_errors():
        ours(q, k, k, torch.full((B, S), 0.5), need_weights=False)


def test_learned_padding_mask_in_eval_drops_nothing():
    """A float key_padding_mask that requires grad takes the PyTorch path; in eval mode its
    attention dropout is off, as nn.MultiheadAttention's."""
    config = {"dropout": 0.5, "batch_first": True}
    ours, mha = _pair(config)
    ours.eval(), mha.eval()
    learned = torch.zeros(B, S).masked_fill(_mask("bool"), -3.0).requires_grad_(True)
    _compare(ours, mha, _inputs(config), key_padding_mask=learned, need_weights=False)


@pytest.mark.parametrize("config", ["defaults", "bias_kv", "zero_attn_bias_kv_kdim"])
def test_empty_batch_matches_multihead_attention(backend, config):
    """A batch of no entry (B = 0, a data loader's last empty shard) gives what
    nn.MultiheadAttention gives with its default need_weights=True: outputs and weights of no
    element, of its shapes; without the weights (where MHA's own reshape fails), the output."""
    ours, mha = _pair(CONFIGS[config])
    layout = (lambda n, d: torch.randn(0, n, d)) if CONFIGS[config].get("batch_first") else (lambda n, d: torch.randn(n, 0, d))
    inputs = layout(L, E), layout(S, CONFIGS[config].get("kdim", E)), layout(S, CONFIGS[config].get("vdim", E))
    kpm = torch.zeros(0, S, dtype=torch.bool)
    got, want = ours(*inputs, key_padding_mask=kpm), mha(*(t.double() for t in inputs), key_padding_mask=kpm)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    out, weights = ours(*inputs, key_padding_mask=kpm, need_weights=False)
    assert out.shape == want[0].shape and weights is None


@pytest.mark.parametrize("config", ["defaults", "bias_kv", "zero_attn_bias_kv_kdim"])
@pytest.mark.parametrize("queries,keys", [(0, S), (L, 0), (0, 0)])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_no_query_or_no_key_matches_multihead_attention(backend, config, queries, keys, need_weights, average):
    """No query or no key (L or S = 0), which nn.MultiheadAttention takes: its output (zero
    attention, out_proj's bias, or with add_bias_kv / add_zero_attn the keys those add) and weights
    of its shapes, forward and backward; a bool padding mask of no key warns of nothing."""
    ours, mha = _pair(CONFIGS[config])
    g = torch.Generator().manual_seed(queries + 3 * keys)
    first = CONFIGS[config].get("batch_first")
    layout = (lambda n, d: randn(B, n, d, generator=g)) if first else (lambda n, d: randn(n, B, d, generator=g))
    inputs = layout(queries, E), layout(keys, CONFIGS[config].get("kdim", E)), layout(keys, CONFIGS[config].get("vdim", E))
    kwargs = {"need_weights": need_weights, "average_attn_weights": average, "key_padding_mask": torch.zeros(B, keys, dtype=torch.bool)}
    with _warnings_are_errors():
        out, weights, grads = _run(ours, inputs, torch.float32, **kwargs)
    if not need_weights and not keys and config == "defaults":  # MHA's SDPA call cannot reshape keys of no element:
        assert weights is None and torch.equal(out, ours.out_proj.bias.detach().expand_as(out))  # its empty softmax's answer
        return
    ref, ref_weights, ref_grads = _run(mha, inputs, torch.float64, **kwargs)
    assert out.shape == ref.shape and (weights is None) == (ref_weights is None)
    assert_close(out, ref, torch.float32, "attn_output")
    if weights is not None:
        assert weights.shape == ref_weights.shape
        assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    for name, grad in grads.items():  # MHA's (zeros where its are), not None: optimizers step them
        assert (grad is None) == (ref_grads[name] is None), name
        assert grad is None or not grad.numel() or (grad.double() - ref_grads[name]).abs().max() <= 1e-5 * (1 + ref_grads[name].abs().max()), name


@pytest.mark.parametrize("config", ["defaults", "zero_attn_bias_kv_kdim"])
def test_dropout_of_one_matches_multihead_attention(backend, config):
    """``dropout=1.0``, which nn.MultiheadAttention takes: in training every probability is dropped
    (the output is out_proj's bias, the weights zeros, gradients to the projections zeros); in eval
    no dropout at all. The QueryResampler takes it too."""
    config = {**CONFIGS[config], "dropout": 1.0}
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, **config).double()
    ours = CrossAttention(E, H, **config)
    ours.load_state_dict(mha.state_dict())
    inputs = _inputs(config)
    _compare(ours, mha, inputs, key_padding_mask=_mask("bool"))
    ours.eval(), mha.eval()
    _compare(ours, mha, inputs, key_padding_mask=_mask("bool"))
    resampler = deco_ops.QueryResampler(4, E, 6, H, dropout=1.0)
    x = randn(B, S, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(resampler(x), resampler.out_proj.bias.expand(B, 4, E))
    assert not torch.equal(resampler.eval()(x), resampler.out_proj.bias.expand(B, 4, E))


@pytest.mark.parametrize("mask", [None, "bool"])
def test_transformer_encoder_layer_takes_it_as_self_attention(mask):
    """In ``nn.TransformerEncoderLayer`` as ``self_attn`` (MHA's parameters and state_dict keys),
    training and the inference fast path (``merge_masks``, then PyTorch's fused layer on the same
    parameters) give the layer's outputs with MHA."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).double()
    ours = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True).double()
    ours.self_attn = CrossAttention(E, H, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(layer.state_dict())
    x = randn(B, S, E, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kpm = None if mask is None else _mask("bool")
    # float64: the Triton kernels take it only in the CPU interpreter; a GPU runs the PyTorch path
    def backend():
        return contextlib.nullcontext() if x.device.type == "cpu" else deco_ops.use_backend("torch")

    with backend():
        assert_close(ours(x, src_key_padding_mask=kpm), layer(x, src_key_padding_mask=kpm), torch.float32, "train")
    ours.eval(), layer.eval()
    with torch.no_grad(), backend():
        got, want = ours(x, src_key_padding_mask=kpm), layer(x, src_key_padding_mask=kpm)
    if kpm is not None:  # the fast path returns a nested tensor's padding as zeros: compare the real tokens
        keep = ~kpm[..., None]
        got, want = got * keep, want * keep
    assert_close(got, want, torch.float32, "fast path")


def _causal(kind):
    """A bottom-right aligned causal mask (SDPA's ``is_causal`` aligns top-left: another mask), or
    ``per_head``: a random additive mask of shape (B * H, L, S), each batch and head its own."""
    if kind == "per_head":
        return randn(B * H, L, S, generator=torch.Generator().manual_seed(5)) * 2
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    return ~allowed if kind == "bool" else torch.zeros(L, S).masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"average_attn_weights": False, "key_padding_mask": "bool"},
        {"attn_mask": "bool", "need_weights": False},
        {"attn_mask": "bool", "is_causal": True, "need_weights": False},
        {"attn_mask": "bool", "is_causal": True},  # need_weights: MHA runs attn_mask itself, not SDPA's is_causal
        {"attn_mask": "float", "key_padding_mask": "float"},
        # with a key_padding_mask, MHA runs attn_mask itself, not SDPA's is_causal
        {"attn_mask": "bool", "is_causal": True, "need_weights": False, "key_padding_mask": "bool"},
        {"attn_mask": "per_head", "key_padding_mask": "bool"},  # batch-major (B * H) rows
    ],
    ids=str,
)
@pytest.mark.parametrize("config", ["defaults", "zero_attn_bias_kv_kdim"])
def test_weights_and_attn_mask_match_multihead_attention(config, kwargs):
    """need_weights=True (the default), an attn_mask, is_causal with its mask: on the kernels."""
    ours, mha = _pair(CONFIGS[config])
    kwargs = dict(kwargs)
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = _mask(kwargs["key_padding_mask"])
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = _causal(kwargs["attn_mask"])
    _compare(ours, mha, _inputs(CONFIGS[config]), **kwargs)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_initialisation_is_multihead_attentions(config):
    """The same seed gives the same parameters as nn.MultiheadAttention (_reset_parameters: xavier
    projections, zero in/out-projection biases, normal bias_k/bias_v)."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, H, **CONFIGS[config])
    torch.manual_seed(3)
    ours = CrossAttention(E, H, **CONFIGS[config])
    theirs = mha.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs[name]), name


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("config", ["defaults", "kdim_vdim_no_bias_batch_first"])
def test_queries_without_keys_match_multihead_attention(backend, config, need_weights):
    """A batch row whose padding mask ignores every key, and a query whose attn_mask row blocks
    every key: NaN (output and weights) where MHA returns weights (its softmax of a row of -inf);
    without weights MHA's SDPA call attends to nothing, so the output is out_proj's bias and the
    gradients are finite. (``add_bias_kv`` / ``add_zero_attn`` keys are never masked.)"""
    ours, mha = _pair(CONFIGS[config])
    ignore = torch.zeros(B, S, dtype=torch.bool)
    ignore[1] = True
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[0] = True
    kwargs = dict(key_padding_mask=ignore, attn_mask=blocked, need_weights=need_weights)
    inputs = _inputs(CONFIGS[config])
    if not need_weights:
        _compare(ours, mha, inputs, **kwargs)
        return
    with torch.no_grad():  # MHA's gradients are NaN throughout here
        out, weights = ours(*inputs, **kwargs)
        ref, ref_weights = mha(*(t.double() for t in inputs), **kwargs)
    assert out.isnan().any() and weights.isnan().any()
    assert_close(out, ref, torch.float32, "attn_output")  # NaN exactly where MHA's are
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")


@pytest.mark.parametrize("average", [True, False])
def test_a_query_without_keys_in_one_head_matches_multihead_attention(backend, average):
    """A per-head attn_mask ``(B * H, L, S)`` that blocks every key of one query in one head only:
    MHA's weights of that query are NaN in that head and, averaged over the heads, NaN for the
    query; the other heads' weights and the other queries stay finite."""
    ours, mha = _pair({})
    blocked = torch.zeros(B * H, L, S, dtype=torch.bool)
    blocked[1, 0] = True  # batch 0, head 1, query 0
    inputs = _inputs({})
    with torch.no_grad():
        out, weights = ours(*inputs, attn_mask=blocked, average_attn_weights=average)
        ref, ref_weights = mha(*(t.double() for t in inputs), attn_mask=blocked, average_attn_weights=average)
    assert weights.isnan().any() and not weights.isnan().all()
    assert_close(out, ref, torch.float32, "attn_output")
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_both_ways(config):
    ours, mha = _pair(CONFIGS[config])
    assert list(ours.state_dict()) == list(mha.state_dict())
    fresh_mha = nn.MultiheadAttention(E, H, **CONFIGS[config])
    fresh_mha.load_state_dict(CrossAttention(E, H, **CONFIGS[config]).state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), mha.named_parameters()):
        assert torch.equal(a, b.float()), name


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m, q, k: m(q, k, k, need_weights=False, is_causal=True), ValueError, "is_causal is a hint"),
        (lambda m, q, k: m(q, k, k, _mask("bool").int(), need_weights=False), TypeError, "bool or float"),
        (lambda m, q, k: m(q, k, k, attn_mask=torch.zeros(L, S, dtype=torch.int8)), TypeError, "attn_mask must be a bool or float"),
        (lambda m, q, k: m(q, k, k, attn_mask=torch.zeros(L, S + 1)), ValueError, r"attn_mask must have shape \(queries, keys\)"),
        (lambda m, q, k: m(q, k, k, attn_mask=torch.zeros(B, L, S)), ValueError, r"\(batch \* num_heads, queries, keys\)"),
        (lambda m, q, k: m(q, k, k, _mask("bool")[:, 1:], need_weights=False), ValueError, "shape"),
        (lambda m, q, k: m(q, k[:, :2], k[:, :2], need_weights=False), ValueError, "query has batch 3 but key has 2"),
        (lambda m, q, k: m(q[..., :8], k, k), ValueError, "query has 8 features"),
        (lambda m, q, k: m(q, k[:3], k, need_weights=False), ValueError, "same tokens and batch"),
        (lambda m, q, k: m(q, k, k[:, :2], need_weights=False), ValueError, "same tokens and batch"),  # batch differs
        (lambda m, q, k: m(q[0], k, k), ValueError, "all be batched"),
        (lambda m, q, k: m(q[:, 0], k[:, 0], k[:, 0], _mask("bool"), need_weights=False), ValueError, "unbatched inputs take"),
    ],
)
def test_rejected_combinations_raise(call, error, match):
    ours, _ = _pair({})
    q, k, _ = _inputs({})
    with pytest.raises(error, match=match):
        call(ours, q, k)


def test_out_proj_is_multihead_attentions_class_and_stays_float_under_quantize_dynamic():
    """quantize_dynamic({nn.Linear}) quantizes neither module's out_proj (MHA's forward reads
    out_proj.weight, which a dynamically quantized Linear does not have) and both outputs stay close."""
    ours, mha = _pair({})
    mha = mha.float()
    assert type(ours.out_proj) is type(mha.out_proj)
    q, k, _ = _inputs({})
    for module in (ours, mha):
        quantized = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
        assert type(quantized.out_proj) is type(module.out_proj)
        assert_close(quantized(q, k, k)[0], module(q, k, k)[0], torch.float32, "attn_output")


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("change,error,match", [
    (lambda t: t.int(), TypeError, "{name} must be a floating tensor, got torch.int32"),
    (lambda t: t > 0, TypeError, "{name} must be a floating tensor, got torch.bool"),
    (lambda t: t.half(), TypeError, r"{name} has dtype torch.float16 but the module's parameters have torch.float32; cast"),
    (lambda t: t.double(), TypeError, r"{name} has dtype torch.float64 but the module's parameters have torch.float32"),
    (lambda t: t.to("meta"), ValueError, "{name} is on meta but the module's parameters are on cpu"),
], ids=["int", "bool", "fp16", "fp64", "meta"])
def test_inputs_the_parameters_cannot_take_are_named(name, change, error, match):
    """Named before F.linear's RuntimeError, on both paths (a mask that requires grad runs PyTorch's)."""
    ours, _ = _pair({})
    inputs = dict(zip(("query", "key", "value"), _inputs({})))
    inputs[name] = change(inputs[name])
    for mask in (None, torch.zeros(B, S, requires_grad=True)):
        with pytest.raises(error, match=match.format(name=name)):
            ours(**inputs, key_padding_mask=mask)


def test_mixed_dtypes_inside_autocast_run_as_in_multihead_attention():
    """Inside torch.autocast an fp32 module takes bf16 or fp16 tokens, as nn.MultiheadAttention does."""
    ours, mha = _pair({})
    mha = mha.float()
    q, k, v = _inputs({})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.bfloat16, torch.float16):
            out, ref = ours(q.to(dtype), k, v.to(dtype))[0], mha(q.to(dtype), k, v.to(dtype))[0]
            assert out.dtype == ref.dtype == torch.bfloat16
            assert_close(out, ref, torch.bfloat16, "attn_output")


@pytest.mark.parametrize("requires_grad", [False, True], ids=["kernels", "learned_mask"])
@pytest.mark.parametrize("masks,error,match", [
    (lambda: {"attn_mask": torch.zeros(L, S + 1)}, ValueError, r"attn_mask must have shape \(queries, keys\) = \(4, 7\)"),
    (lambda: {"attn_mask": torch.zeros(B, H, L, S)}, ValueError, r"\(batch \* num_heads, queries, keys\) = \(6, 4, 7\), got \(3, 2, 4, 7\)"),
    (lambda: {"attn_mask": torch.zeros(B + 2, L, S)}, ValueError, r"\(batch \* num_heads, queries, keys\) = \(6, 4, 7\), got \(5, 4, 7\)"),
    (lambda: {"attn_mask": torch.zeros(L, S, device="meta")}, ValueError, "attn_mask is on meta but the inputs are on cpu"),
    (lambda: {"key_padding_mask": torch.zeros(B, S - 1)}, ValueError, r"key_padding_mask must have shape \(batch, keys\)"),
    (lambda: {"key_padding_mask": torch.zeros(B, S, device="meta")}, ValueError, "key_padding_mask is on meta but the inputs are on cpu"),
], ids=["attn_mask_keys", "attn_mask_4d", "attn_mask_batch", "attn_mask_meta", "kpm_keys", "kpm_meta"])
def test_masks_are_checked_on_both_paths(masks, error, match, requires_grad):
    """A mask that requires grad runs PyTorch's F.multi_head_attention_forward: it is checked as on
    the kernels' path first (not the functional's RuntimeError / AssertionError, nor a meta mask
    accepted with weights on meta)."""
    ours, _ = _pair({})
    q, k, v = _inputs({})
    masks = {name: mask.requires_grad_(requires_grad) for name, mask in masks().items()}
    with pytest.raises(error, match=match):
        ours(q, k, v, **masks)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_learned_masks_of_another_float_dtype_run_as_on_the_kernels(name, mask_dtype):
    """A float64 or fp16 mask beside fp32 inputs runs on the kernels; one that requires grad runs on
    PyTorch's path with the same result and gets its gradient (the functional alone raises)."""
    ours, mha = _pair({})
    q, k, v = _inputs({})
    mask = (_mask("float") if name == "key_padding_mask" else _causal("float")).to(mask_dtype)
    learned = mask.clone().requires_grad_(True)
    out, weights = ours(q, k, v, **{name: learned})
    ref, ref_weights = mha(q.double(), k.double(), v.double(), **{name: mask.double()})
    assert_close(out, ref, torch.float32, "attn_output", eager=ours(q, k, v, **{name: mask})[0])
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    out.sum().backward()
    assert learned.grad is not None and learned.grad.dtype == mask_dtype


@pytest.mark.parametrize("requires_grad", [False, True], ids=["kernels", "learned_mask"])
@pytest.mark.parametrize("kpm_kind,attn_kind", [("bool", "float"), ("float", "bool")])
def test_mismatched_mask_types_warn_as_multihead_attention(kpm_kind, attn_kind, requires_grad):
    """The same warning as nn.MultiheadAttention's (category and text), once per call."""
    ours, mha = _pair({})
    q, k, v = _inputs({})
    kpm, attn = _mask(kpm_kind), _causal(attn_kind)
    for mask in (kpm, attn):
        mask.requires_grad_(requires_grad and mask.is_floating_point())
    caught = {}
    for module, inputs in ((mha, [t.double() for t in (q, k, v)]), (ours, [q, k, v])):
        with warnings.catch_warnings(record=True) as caught[module]:
            warnings.simplefilter("always")
            _ignore_the_interpreters_own_warning()
            module(*inputs, kpm.double() if module is mha and kpm.is_floating_point() else kpm,
                   attn_mask=attn.double() if module is mha and attn.is_floating_point() else attn)
    assert [(w.category, str(w.message)) for w in caught[ours]] == [(w.category, str(w.message)) for w in caught[mha]]
    assert len(caught[ours]) == 1 and "Support for mismatched key_padding_mask and attn_mask" in str(caught[ours][0].message)
    assert caught[ours][0].filename == __file__  # the caller's line, not torch's module call


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        CrossAttention(16, 2, 1.5)
    with pytest.raises(ValueError, match="kdim"):
        CrossAttention(16, 2, kdim=0)


def test_hugging_face_keep_mask_warns():
    """An unpadded row of a keep-mask (all True) ignores every key in PyTorch's convention."""
    ours, _ = _pair({})
    q, k, _ = _inputs({})
    keep = ~_mask("bool")
    keep[1:] = True
    for need_weights in (False, True):
        with pytest.warns(UserWarning, match=r"ignores every key of batch rows \[0, 1, 2\].*Hugging Face") as caught:
            ours(q, k, k, keep, need_weights=need_weights)
        ours_warning = next(w for w in caught if "ignores every key" in str(w.message))
        assert ours_warning.filename == __file__  # the caller's line, not torch's module call
    with _warnings_are_errors():
        ours(q, k, k, _mask("bool"), need_weights=False)


def test_value_checks_are_off_on_cuda_by_default_and_off_everywhere_at_0(monkeypatch):
    """The keep-mask warning reads the mask on the host: by default on CPU tensors only (on CUDA
    the read would synchronise every call), ``DECO_OPS_CHECKS=1`` everywhere, and
    ``DECO_OPS_CHECKS=0`` nowhere: a CPU keep-mask then passes without the warning."""
    monkeypatch.delenv("DECO_OPS_CHECKS", raising=False)
    assert _checks.value_checks(torch.device("cpu")) and not _checks.value_checks(torch.device("cuda"))
    monkeypatch.setenv("DECO_OPS_CHECKS", "1 ")  # spaces around, as in an env file
    assert _checks.value_checks(torch.device("cuda"))
    monkeypatch.setenv("DECO_OPS_CHECKS", " 0")
    ours, _ = _pair({})
    q, k, _ = _inputs({})
    keep = ~_mask("bool")
    keep[1:] = True
    with _warnings_are_errors():
        ours(q, k, k, keep, need_weights=False)


@pytest.mark.parametrize("checks", ["", "1"])
def test_a_meta_padding_mask_is_never_read(checks, monkeypatch, auto_backend):
    """A bool key_padding_mask on the meta device has no values for the keep-mask warning to read:
    the module runs as ``nn.MultiheadAttention`` does there (shapes), with value checks on by
    default or forced (it raised NotImplementedError from ``nonzero`` on meta)."""
    monkeypatch.setenv("DECO_OPS_CHECKS", checks)
    mha, ours = (cls(E, H, device="meta") for cls in (nn.MultiheadAttention, CrossAttention))
    q, k = torch.empty(L, B, E, device="meta"), torch.empty(S, B, E, device="meta")
    kpm = torch.empty(B, S, dtype=torch.bool, device="meta")
    for need_weights in (True, False):
        want = mha(q, k, k, kpm, need_weights=need_weights)
        got = ours(q, k, k, kpm, need_weights=need_weights)
        assert got[0].shape == want[0].shape and got[0].device.type == "meta"
        assert (got[1] is None) == (want[1] is None) and (got[1] is None or got[1].shape == want[1].shape)


def test_masks_become_a_bias_without_reading_values():
    """Any key_padding_mask / attn_mask becomes an additive bias on the device: no host read (so no
    synchronisation), whatever the pattern (left padding here) and the value-check setting."""
    host_read = mock.Mock(side_effect=AssertionError("host read"))
    kpm, attn = _mask("bool").flip(1), _causal("bool")
    with mock.patch.object(torch.Tensor, "__bool__", host_read), mock.patch.object(torch.Tensor, "tolist", host_read), \
            mock.patch.object(torch.Tensor, "item", host_read), mock.patch("torch.equal", host_read):
        bias = mha_masks_to_bias(kpm, attn, B, H, L, S)
    want = torch.zeros(B, 1, L, S).masked_fill(kpm[:, None, None, :] | attn, float("-inf"))
    assert bias.shape == (B, 1, L, S) and torch.equal(bias, want)


@pytest.mark.parametrize("need_weights", [False, True])
def test_torch_compile_fullgraph_with_padding_mask(need_weights):
    """Both paths trace without graph breaks with a padding mask: the checks that read the mask
    step aside while torch.compile traces."""
    torch._dynamo.reset()
    ours, _ = _pair(CONFIGS["zero_attn_bias_kv_kdim"])
    inputs, mask = _inputs(CONFIGS["zero_attn_bias_kv_kdim"]), _mask("bool")
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with deco_ops.use_backend("auto"):
        (out, weights), (ref, ref_weights) = (m(*inputs, mask, need_weights=need_weights) for m in (compiled, ours))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    else:
        assert weights is None and ref_weights is None


def test_which_path_runs():
    """Every call runs the kernel, need_weights=True (the default) and attn_mask included;
    F.multi_head_attention_forward runs only for a mask that requires grad."""
    ours, _ = _pair(CONFIGS["zero_attn_bias_kv_kdim"])
    q, k, v = _inputs(CONFIGS["zero_attn_bias_kv_kdim"])
    with mock.patch.object(attention_modules, "cross_attention", wraps=attention_modules.cross_attention) as kernel, \
            mock.patch.object(attention_modules.F, "multi_head_attention_forward", wraps=F.multi_head_attention_forward) as pytorch:
        # a TorchFunctionMode (the CUDA suite's default device) re-enters the patched function, so
        # each call is checked for reaching PyTorch at all, not counted
        ours(q, k, v, _mask("bool"), need_weights=False)
        ours(q, k, v, _mask("bool"))
        ours(q, k, v, need_weights=False, attn_mask=_causal("bool"))
        assert (kernel.call_count, pytorch.call_count) == (3, 0)
        ours(q, k, v, attn_mask=_causal("float").requires_grad_(True))
        assert (kernel.call_count, pytorch.call_count > 0) == (3, True)


def test_torch_compile_takes_an_attn_mask_first_seen_after_a_dynamic_recompile():
    """A compiled module called without a mask, then with one at other sizes: the recompile makes
    the query and key counts symbolic while the new mask's shape is static, and the shape check
    compared them with ``in`` (False while Dynamo traces): it raised its ValueError on a mask
    nn.MultiheadAttention takes. Outputs, weights and gradients as MHA's in float64."""
    torch._dynamo.reset()
    ours, mha = _pair(CONFIGS["bias_kv"])
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    compiled(*(randn(B, n, E, generator=g) for n in (L, S, S)))
    inputs = tuple(randn(B, n, E, generator=g) for n in (L + 1, S + 2, S + 2))
    mask = randn(L + 1, S + 2, generator=g)
    out, weights, grads = _run(compiled, inputs, torch.float32, attn_mask=mask)
    ref, ref_weights, ref_grads = _run(mha, inputs, torch.float64, attn_mask=mask)
    assert_close(out, ref, torch.float32, "attn_output")
    assert_close(weights, ref_weights, torch.float32, "attn_output_weights")
    for name, got in grads.items():
        name = name.removeprefix("_orig_mod.")  # the compiled wrapper's names for ours
        assert_close(got, ref_grads[name], torch.float32, f"grad {name}")
