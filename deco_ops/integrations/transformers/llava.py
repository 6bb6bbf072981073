"""Hugging Face LLaVA -> DeCo: the projector becomes a ``DeCoProjector`` (adaptive pooling fused into
the same two Linear layers, weights kept) and the image-token count everywhere becomes the pooled
grid's.

transformers 5.24's LLaVA feeds the projector the vision tower's tokens of one layer
(``vision_feature_layer``), without the CLS token when ``vision_feature_select_strategy ==
"default"``, and scatters the projector's output rows into the ``<image>`` placeholders of
``input_ids``; ``LlavaProcessor`` writes ``(H // patch_size) * (W // patch_size) +
num_additional_image_tokens`` placeholders per image, minus one for ``"default"``. After the
conversion the projector returns ``prod(out_grid)`` rows per image (a CLS token kept by
``"full"`` is dropped, DeCo pools only the patch grid), and ``DeCoLlavaProcessor`` writes as many
placeholders; ``config.image_seq_length`` says the same.

A converted model saves its projector under Hugging Face's names (``linear_1``, ``linear_2``), so
``save_pretrained`` writes a checkpoint ``LlavaForConditionalGeneration.from_pretrained`` loads
(as the plain LLaVA, with the trained weights); call ``llava_to_deco`` again after loading it.

Not covered: vision towers called with ``image_sizes`` (Pixtral-style variable resolution), which
split the projector's output by their own patch counts; a Pixtral tower is refused with a ``ValueError``.
"""

from __future__ import annotations

import math

from ... import _validate
from ...modules import DeCoProjector
from ._require import transformers_module

_transformers = transformers_module()
_MultiModalData = transformers_module("transformers.processing_utils").MultiModalData


class DeCoLlavaProcessor(_transformers.LlavaProcessor):
    """``LlavaProcessor`` that writes ``num_image_tokens`` ``<image>`` placeholders per image (the
    DeCo projector's pooled grid) instead of one per vision patch."""

    # LlavaProcessor's settings named, not taken as **kwargs: transformers saves a processor's
    # attributes named in its ``__init__`` signature (``ProcessorMixin.to_dict``), and a saved
    # processor without its patch size and feature strategy reloaded unable to process an image
    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 144, patch_size=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>", num_additional_image_tokens=0,
                 **kwargs):
        super().__init__(image_processor, tokenizer, patch_size=patch_size,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs)
        if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
        self.num_image_tokens = num_image_tokens

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.num_image_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return _MultiModalData()
        return _MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def _prefix_tokens(vision_tower, grid: tuple[int, int], strategy: str) -> int:
    """Tokens before the patch grid in what LLaVA hands its projector: none after ``"default"``
    drops the CLS token, else the tower's extra positions (CLIP: the CLS token, SigLIP: none)."""
    embeddings = getattr(getattr(vision_tower, "vision_model", vision_tower), "embeddings", None)
    positions = getattr(embeddings, "num_positions", None)
    if strategy == "default":
        # "default" drops each image's first token as its CLS token; a tower without one (SigLIP)
        # loses a patch, and the projector gets prod(grid) - 1 tokens, which no grid pools
        if positions == math.prod(grid):
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the first token as a CLS token, but "
                f"{type(vision_tower).__name__} emits no CLS token before its {grid} patch grid: LLaVA hands the "
                f"projector {math.prod(grid) - 1} of the {math.prod(grid)} patches, which no grid pools; use "
                "vision_feature_select_strategy='full' for this tower"
            )
        return 0
    if not isinstance(positions, int) or positions < math.prod(grid):
        raise ValueError(
            f"cannot tell how many prefix (CLS) tokens {type(vision_tower).__name__} emits before its {grid} patch grid; "
            "pass num_prefix_tokens"
        )
    return positions - math.prod(grid)


def llava_to_deco(model, processor=None, *, out_grid=None, num_prefix_tokens: int | None = None, order: str = "pool_mlp", mode: str = "average"):
    """Turns a ``LlavaForConditionalGeneration`` (or ``LlavaModel``) into its DeCo variant, in place.

    Args:
        model: the LLaVA model. Its ``multi_modal_projector`` (``linear_1``, act, ``linear_2``) is
            replaced by a ``DeCoProjector`` holding the same two Linear modules (the same parameter
            objects; LoRA layers, accelerate's hooks and quantised Linears kept and run) in the same
            train/eval mode, with ``config.projector_hidden_act`` as its activation.
        processor: optional ``LlavaProcessor``; a ``DeCoLlavaProcessor`` built from its parts is
            returned, writing ``prod(out_grid)`` ``<image>`` tokens per image.
        out_grid: the pooled grid, default half the patch grid per side rounded up (DeCo's 2x2
            pooling: CLIP ViT-L/14-336's 24x24 -> 12x12, 576 -> 144 tokens).
        num_prefix_tokens: tokens before the patch grid in the projector's input; default read
            from ``vision_feature_select_strategy`` and the vision tower.
        order, mode: as ``DeCoProjector``.

    Returns:
        ``(model, processor)``: the same model object, and the new processor (or None).
    """
    base = getattr(model, "model", model)
    projector = getattr(base, "multi_modal_projector", None)
    # LLaVA-NeXT / OneVision (model_type "llava_next", "llava_onevision") share the projector's
    # layout but tile each image into a variable number of crops: one fixed out_grid breaks them
    if getattr(getattr(model, "config", None), "model_type", None) != "llava" or not all(
            hasattr(projector, name) for name in ("linear_1", "linear_2")):
        raise TypeError(
            f"model must be a Hugging Face LlavaForConditionalGeneration or LlavaModel with a linear_1/act/linear_2 "
            f"multi_modal_projector, got {type(model).__name__}"
        )
    config = model.config
    vision = config.vision_config
    # Pixtral towers (LLaVA checkpoints of Pixtral / Mistral) take each image at its own size and
    # LLaVA splits the projector's output by every image's patch count: no fixed grid pools them
    if getattr(vision, "model_type", None) == "pixtral":
        raise ValueError(
            "llava_to_deco does not support a Pixtral vision tower (vision_config.model_type='pixtral'): it emits a "
            "variable patch grid per image (image_sizes), which one fixed grid/out_grid cannot pool"
        )
    grid = tuple(s // p for s, p in zip(_pair(vision.image_size, "image_size"), _pair(vision.patch_size, "patch_size")))
    out_grid = tuple(math.ceil(g / 2) for g in grid) if out_grid is None else _validate.grid("out_grid", out_grid)
    if num_prefix_tokens is None:
        num_prefix_tokens = _prefix_tokens(base.vision_tower, grid, config.vision_feature_select_strategy)
    first, second = projector.linear_1, projector.linear_2
    deco = DeCoProjector(
        first.in_features, second.out_features, hidden_features=first.out_features, grid=grid, out_grid=out_grid,
        activation=config.projector_hidden_act, order=order, mode=mode, num_prefix_tokens=num_prefix_tokens,
        bias=first.bias is not None, keys="hf", device="meta",
    )
    # The projector's own Linear modules, not copies of their weights: the same parameter objects
    # (an optimizer built before the conversion still trains them), and whatever wraps them stays
    # and runs (peft's LoRA layers, accelerate's offloading hooks holding meta weights, quantised
    # Linears): DeCoProjector calls such children (deco_ops._children). Copying lost all of these.
    deco.linear_1, deco.linear_2 = first, second
    deco.training = projector.training  # the children keep their own modes
    # accelerate's hook on the projector itself (a device_map dispatch: moves its input to the
    # projector's device) goes with it, as it would for the module replaced
    hook = getattr(projector, "_hf_hook", None)
    if hook is not None:  # set by accelerate, so installed
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(deco, hook)
    base.multi_modal_projector = deco
    config.image_seq_length = math.prod(deco.out_grid)
    if processor is None:
        return model, None
    return model, DeCoLlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        num_image_tokens=config.image_seq_length,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        chat_template=processor.chat_template,
        image_token=processor.image_token,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
