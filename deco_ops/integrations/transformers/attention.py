"""``attn_implementation="deco_ops"``: Hugging Face models on transformers' attention interface run
``deco_ops.cross_attention``.

transformers selects attention through two registries, both keyed by ``config._attn_implementation``:
``AttentionInterface`` (the attention function each layer calls) and ``AttentionMaskInterface``
(the function ``create_bidirectional_mask``/``create_causal_mask`` call to build the mask). A name
missing from the second makes transformers return *no mask at all* for it, silently dropping the
padding; so both are registered here.

What deco_ops expresses: bidirectional (non-causal) attention with any mask the layer passes. The
mask function below gives transformers' 2D padding mask back as a ``(B, 1, 1, N)`` bool keep-mask
(SDPA's convention, so model code that slices 4D masks still works), and the attention function
passes every mask straight to ``deco_ops.cross_attention``'s ``attn_mask``, computed in the fused
kernels: 2D ``(B, N)`` keep-masks, 4D ``(B or 1, 1 or H, 1 or M, N)`` bool keep-masks or additive
float masks (0 / the dtype's minimum, or any bias), padding on either side, holes, per query or
per head. That covers the BLIP-2 / InstructBLIP Q-Former (self-attention among the learned queries
and text, cross-attention to the image tokens with an encoder padding mask) and ViT-style encoders.
A ``position_bias`` (T5-style relative position bias: LayoutLMv3, Pix2Struct, the T5 encoder) joins
the mask as SDPA's path joins them: the bias where the mask keeps a key, the dtype's minimum
elsewhere, added to a float mask. One mask value is read on the host, where transformers reads it
for SDPA: a padding mask that keeps every key is dropped (the mask-free kernels run), unless the
model is being traced or asks for the mask (``allow_is_bidirectional_skip=False``).

Raises ``ValueError`` for what the layer asks and deco_ops does not run: causal layers and causal,
sliding-window or chunked mask functions, soft-capping, attention sinks, a ``position_bias`` that
requires grad (the kernels give masks no gradient: a learned bias in training). Never a silent
fallback to another implementation.
"""

from __future__ import annotations

import torch

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
    a bool ``(B, 1, 1, kv_length)`` keep-mask (True = attend; any pattern). Raises for any mask
    function other than bidirectional (causal, sliding window, chunked, custom overlays)."""
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
    if kwargs.get("allow_is_bidirectional_skip") and _keeps_every_key(keep):
        return None  # the mask-free kernels (as transformers skips it for SDPA: flash and cuDNN take no mask)
    return keep[:, None, None, :]


def _keeps_every_key(keep: torch.Tensor) -> bool:
    """Whether a padding mask keeps every key, read on the host where transformers reads it for
    SDPA (``_ignore_bidirectional_mask_sdpa``: one sync on a GPU): not while torch.compile, export or
    ``torch.jit.trace`` traces the model (a branch on values; fake and functional tensors have none),
    where the mask is kept."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(keep) is not torch.Tensor:
        return False
    return bool(keep.all())


def _attn_mask(mask: torch.Tensor) -> torch.Tensor:
    """The mask a layer passes as ``cross_attention``'s ``attn_mask`` (SDPA's convention): 2D
    ``(B, N)`` keep-masks (1/True = keep) become ``(B, 1, 1, N)`` bool; 4D bool or integer masks
    are keep-masks, floating ones additive. Shapes are checked by ``cross_attention``."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be (B, N) or (B, H, M, N), got shape {tuple(mask.shape)}")
    return mask if mask.is_floating_point() else mask.bool()


def _with_position_bias(position_bias: torch.Tensor, mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """One additive mask from a layer's ``position_bias`` and its mask, as transformers' SDPA path
    builds it (``create_position_bias_mask``, non-causal): the bias where a bool mask keeps a key
    and the smallest value both dtypes hold elsewhere, the bias plus a float mask."""
    if position_bias.requires_grad:
        raise ValueError(
            f"attn_implementation='{NAME}' computes no gradient for position_bias (an additive mask to the kernels), "
            "and this one requires grad (a learned relative position bias in training): use 'sdpa' for this layer"
        )
    if mask is None:
        return position_bias
    mask = _attn_mask(mask)
    if mask.dtype == torch.bool:
        fill = max(torch.finfo(key.dtype).min, torch.finfo(position_bias.dtype).min)
        return torch.where(mask, position_bias, fill)
    return position_bias + mask


def deco_ops_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention function for ``"deco_ops"``: ``query`` ``(B, H, M, D)``, ``key``/``value``
    ``(B, H_kv, N, D)`` (grouped heads are repeated), returns ``((B, M, H, D), None)`` like SDPA's,
    or with ``output_attentions=True`` the ``(B, H, M, N)`` weights in place of None, as eager's."""
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
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, key)
    # ``output_attentions=True``: the probabilities eager attention returns (after dropout, per head),
    # from the kernels' saved log-sum-exp; otherwise none are formed
    need_weights = bool(kwargs.get("output_attentions"))
    out = cross_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        attn_mask=None if attention_mask is None else _attn_mask(attention_mask), softmax_scale=scaling, dropout_p=dropout,
        need_weights=need_weights, average_attn_weights=False,
    )
    return out if need_weights else (out, None)


def register() -> None:
    """Registers ``"deco_ops"`` in transformers' attention and attention-mask interfaces (idempotent)."""
    transformers_module().AttentionInterface.register(NAME, deco_ops_attention)
    _masking_utils.AttentionMaskInterface.register(NAME, deco_ops_mask)
