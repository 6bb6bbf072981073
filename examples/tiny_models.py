"""Tiny random-init Hugging Face models built entirely locally (no hub download): a LLaVA (CLIP
vision tower, Llama language model) with its processor and word-level tokenizer, and a BLIP-2
Q-Former config. The examples and the tests share them; swap in ``from_pretrained`` for real
checkpoints."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Blip2QFormerConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "image", "a", "cat", "dog"]
PROMPT = "USER: <image> what is in the image ASSISTANT:"
IMAGE_SIZE, PATCH_SIZE = 32, 4  # an 8x8 patch grid (CLIP ViT-L/14-336: 24x24)


def tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_llava(vision_feature_select_strategy: str = "default", seed: int = 0, image_size: int = IMAGE_SIZE,
               tower: str = "clip_vision_model", text_hidden_size: int = 32,
               projector_bias: bool = True) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA-1.5-shaped model (a CLIP tower, whose tokens start with a CLS token, or with
    ``tower="siglip_vision_model"`` a SigLIP tower, without one; an mlp2x_gelu projector; a Llama
    LM) at hidden size 32 (the LM's ``text_hidden_size``; the projector's Linears with biases
    unless ``projector_bias=False``), and its processor; ``image_size / PATCH_SIZE`` patches per side."""
    config = LlavaConfig(
        vision_config=dict(model_type=tower, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=PATCH_SIZE,
                           **({"projection_dim": 16} if tower == "clip_vision_model" else {})),
        text_config=dict(model_type="llama", hidden_size=text_hidden_size, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(WORDS), max_position_embeddings=256),
        image_token_index=WORDS.index("<image>"), projector_hidden_act="gelu", multimodal_projector_bias=projector_bias,
        vision_feature_layer=-2,
        vision_feature_select_strategy=vision_feature_select_strategy, image_seq_length=(image_size // PATCH_SIZE) ** 2,
        pad_token_id=0,
    )
    from transformers import CLIPImageProcessor  # imported here: without torchvision it warns on import

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer(), patch_size=PATCH_SIZE, vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1 if tower == "clip_vision_model" else 0,
    )
    return model, processor


def image(seed: int = 0) -> np.ndarray:
    """A random 40x48 RGB image (the processor resizes and crops it to 32x32)."""
    return np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def qformer_config(**overrides) -> Blip2QFormerConfig:
    """A BLIP-2 Q-Former (cross-attention in every layer) at hidden size 32 over 24-wide image tokens."""
    args = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, encoder_hidden_size=24,
                cross_attention_frequency=1, vocab_size=50, max_position_embeddings=64)
    return Blip2QFormerConfig(**(args | overrides))
