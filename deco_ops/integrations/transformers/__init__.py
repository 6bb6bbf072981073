"""Hugging Face transformers integration (``pip install "transformers>=5"``; ``import deco_ops`` never
needs it).

Importing this module registers ``attn_implementation="deco_ops"``: the attention function and the
mask function (see ``attention``), so BLIP-2 / InstructBLIP Q-Formers and other models on
transformers' attention interface run ``deco_ops.cross_attention``::

    import deco_ops.integrations.transformers
    model = Blip2ForConditionalGeneration(config)        # or from_pretrained(...)
    # the vision encoder and the Q-Former; the language model stays causal (sdpa)
    model.set_attn_implementation({"vision_config": "deco_ops", "qformer_config": "deco_ops"})

``llava_to_deco`` turns a ``LlavaForConditionalGeneration`` and its processor into the DeCo
variant (see ``llava``).
"""

from .attention import NAME, deco_ops_attention, deco_ops_mask, register
from .llava import DeCoLlavaProcessor, llava_to_deco

register()

__all__ = ["NAME", "DeCoLlavaProcessor", "deco_ops_attention", "deco_ops_mask", "llava_to_deco", "register"]
