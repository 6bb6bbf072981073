"""``attn_implementation="deco_ops"``: Hugging Face models on transformers' attention interface run
``deco_ops.cross_attention``.

transformers selects attention through two registries, both keyed by ``config._attn_implementation``:
``AttentionInterface`` (the attention function each layer calls) and ``AttentionMaskInterface``
(the function ``create_bidirectional_mask``/``create_causal_mask`` call to build the mask). A name
missing from the second makes transformers return *no mask at all* for it, silently dropping the
padding; so both are registered here.

What deco_ops expresses: bidirectional (non-causal) attention, every query seeing every key, with
optional **key padding on the right** (each batch row's valid keys are a prefix). That covers the
BLIP-2 / InstructBLIP Q-Former (self-attention among the learned queries and text, cross-attention
to the image tokens with an encoder padding mask) and ViT-style encoders. The mask function below
turns transformers' 2D padding mask into a ``(B, 1, 1, N)`` bool keep-mask (SDPA's convention, so
model code that slices 4D masks still works); the attention function turns it into ``kv_lens``.

Anything else raises ``ValueError`` naming what cannot be expressed: causal or sliding-window
masks, per-head or per-query masks, additive biases other than 0 / dtype-minimum, left padding or
holes, soft-capping, attention sinks. Never a silent fallback to another implementation.

Checks that read mask values (right padding, a 4D mask equal across queries, a float mask of 0 and
-inf only) run only where ``deco_ops._checks.value_checks`` allows them: on CPU, or on CUDA with
``DECO_OPS_CHECKS=1``. The default CUDA path never synchronises with the host.
"""

from __future__ import annotations

import torch

from ... import _checks
from ...attention import cross_attention
from ._require import transformers_module

NAME = "deco_ops"

_masking_utils = transformers_module("transformers.masking_utils")

# Arguments of transformers' attention interface that change the result and that the kernels do
# not implement; passing any of them with a value raises.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux")


def deco_ops_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask function for ``"deco_ops"``: None without padding, else the key padding as
    a bool ``(B, 1, 1, kv_length)`` keep-mask (True = attend). Raises for any pattern other than
    bidirectional (causal, sliding window, chunked, custom overlays)."""
    if mask_function is not _masking_utils.bidirectional_mask_function:
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise ValueError(
            f"attn_implementation='{NAME}' runs bidirectional attention with key padding only; this layer builds a "
            f"{name!r} mask (causal, sliding-window or a custom overlay), which it cannot express. Use '{NAME}' for "
            "the Q-Former / vision encoder only, e.g. attn_implementation={'qformer_config': 'deco_ops', "
            "'vision_config': 'deco_ops', 'text_config': 'sdpa'}"
        )
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        raise ValueError(f"attn_implementation='{NAME}' does not serve cached key/value offsets (kv_offset={kv_offset})")
    if attention_mask is None:
        return None
    keep = _masking_utils.prepare_padding_mask(attention_mask.bool(), kv_length, 0)[:, :kv_length]
    return keep[:, None, None, :]


def _keep_mask(mask: torch.Tensor, batch: int, queries: int, keys: int) -> torch.Tensor:
    """A ``(B, N)`` bool keep-mask from the attention mask a layer passes: 2D ``(B, N)`` (1/True =
    keep), or 4D ``(B or 1, 1, 1 or M, N)`` bool (True = keep) or float (0 = keep, dtype minimum or
    -inf = drop)."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be (B, N) or (B, 1, M, N), got shape {tuple(mask.shape)}")
    b, h, m, n = mask.shape
    if n != keys or b not in (1, batch) or m not in (1, queries):
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)}; attn_implementation='{NAME}' needs key padding of "
            f"shape ({batch} or 1, 1, 1 or {queries}, {keys}) for queries {queries} and keys {keys}"
        )
    if h != 1:
        raise ValueError(f"attention_mask has {h} heads; attn_implementation='{NAME}' expresses one padding mask for every head")
    check = _checks.value_checks(mask.device) and not torch.compiler.is_compiling()
    if mask.is_floating_point():
        drop = mask <= torch.finfo(mask.dtype).min / 2
        if check and not bool(((mask == 0) | drop).all()):
            raise ValueError(
                f"attention_mask holds additive biases other than 0 (keep) and the dtype's minimum or -inf (drop); "
                f"attn_implementation='{NAME}' cannot express them"
            )
        keep = ~drop
    else:
        keep = mask.bool()
    if m > 1:
        if check and not bool((keep == keep[:, :, :1]).all()):
            raise ValueError(f"attention_mask differs between queries; attn_implementation='{NAME}' expresses key padding only")
        keep = keep[:, :, :1]
    return keep.reshape(b, n).expand(batch, n)


def _kv_lens(keep: torch.Tensor) -> torch.Tensor:
    """Per-row count of kept keys, after checking (where values may be read) that they are a prefix."""
    kv_lens = keep.sum(-1, dtype=torch.int32)
    if _checks.value_checks(keep.device) and not torch.compiler.is_compiling():
        prefix = torch.arange(keep.shape[-1], device=keep.device) < kv_lens[:, None]
        if not bool((keep == prefix).all()):
            raise ValueError(
                f"attention_mask keeps keys that are not a prefix of each row (left padding or holes); "
                f"attn_implementation='{NAME}' expresses padding as lengths: pad on the right"
            )
    return kv_lens


def deco_ops_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``"deco_ops"``: ``query`` ``(B, H, M, D)``, ``key``/``value``
    ``(B, H_kv, N, D)`` (grouped heads are repeated), returns ``((B, M, H, D), None)`` like SDPA's
    (attention weights are never formed)."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    if is_causal:
        raise ValueError(f"attn_implementation='{NAME}' runs non-causal attention; {type(module).__name__} is causal")
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='{NAME}' does not implement {name}={kwargs[name]!r}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value must be (B, H, L, D), got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        if heads % kv_heads:
            raise ValueError(f"query has {heads} heads, not a multiple of key/value's {kv_heads}")
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    kv_lens = None
    if attention_mask is not None:
        batch = max(query.shape[0], key.shape[0])
        kv_lens = _kv_lens(_keep_mask(attention_mask, batch, query.shape[2], key.shape[2]))
    out = cross_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        kv_lens=kv_lens, softmax_scale=scaling, dropout_p=dropout,
    )
    return out, None


def register() -> None:
    """Registers ``"deco_ops"`` in transformers' attention and attention-mask interfaces (idempotent)."""
    transformers_module().AttentionInterface.register(NAME, deco_ops_attention)
    _masking_utils.AttentionMaskInterface.register(NAME, deco_ops_mask)
