"""Hugging Face LLaVA -> DeCo, one training step, then ``generate``.

    python examples/llava_deco.py [--device cuda] [--autocast]

``llava_to_deco`` swaps LLaVA's ``multi_modal_projector`` for a ``DeCoProjector`` holding the same
weights (2x2 adaptive pooling fused into its first GEMM: 576 -> 144 image tokens for CLIP
ViT-L/14-336) and returns a processor that writes the pooled number of ``<image>`` tokens. The
model here is a tiny random-init LLaVA built locally (``tiny_models.py``); for a real one use
``LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf")`` and
``AutoProcessor.from_pretrained`` of the same name.
"""

from __future__ import annotations

import argparse

import torch

from deco_ops.integrations.transformers import llava_to_deco
from tiny_models import PROMPT, image, tiny_llava


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", action="store_true", help="run the training step under bf16 autocast (fp32 weights)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    model, processor = tiny_llava()
    before = processor(images=image(), text=PROMPT, return_tensors="pt")["input_ids"]
    model, processor = llava_to_deco(model, processor)
    model.to(device)
    image_token = model.config.image_token_id
    after = processor(images=image(), text=PROMPT, return_tensors="pt")["input_ids"]
    print(f"projector: {model.model.multi_modal_projector}")
    print(f"<image> tokens per image: {int((before == image_token).sum())} -> {int((after == image_token).sum())}")

    # LLaVA stage 2: the vision tower stays frozen, the projector and the language model train.
    model.model.vision_tower.requires_grad_(False)
    model.train()
    batch = processor(images=[image(1), image(2)], text=[f"{PROMPT} a cat", f"{PROMPT} a dog"], return_tensors="pt").to(device)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == image_token, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    weight = model.model.multi_modal_projector.fc1.weight
    print(f"training step{' under bf16 autocast' if args.autocast else ''}: loss {loss.item():.4f}, projector grad {weight.grad.dtype} "
          f"(weights {weight.dtype}), finite: {bool(torch.isfinite(weight.grad).all())}")

    model.eval()
    prompt = processor(images=image(), text=PROMPT, return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:]
    print(f"generate: {new.tolist()} -> {processor.decode(new)!r} (random weights)")


if __name__ == "__main__":
    main()
