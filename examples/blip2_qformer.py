"""BLIP-2's Q-Former on ``deco_ops.cross_attention`` through ``attn_implementation="deco_ops"``,
checked against the same model's eager attention.

    python examples/blip2_qformer.py [--device cuda]

``import deco_ops.integrations.transformers`` registers the attention function and the mask
function; the image tokens' padding mask reaches the kernels as ``attn_mask`` (any pattern).
For a whole ``Blip2ForConditionalGeneration`` keep the causal language model on its own
implementation:
``model.set_attn_implementation({"vision_config": "deco_ops", "qformer_config": "deco_ops"})``.
The Q-Former here is a tiny random-init one (``tiny_models.py``).
"""

from __future__ import annotations

import argparse

import torch

# deco_ops before transformers: with DECO_OPS_BACKEND=triton on a CPU, deco_ops must switch on
# Triton's interpreter before anything imports triton.
import deco_ops.integrations.transformers  # noqa: F401, I001  (registers attn_implementation="deco_ops")
from transformers import Blip2QFormerModel
from tiny_models import qformer_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args(argv).device)

    torch.manual_seed(0)
    ours = Blip2QFormerModel(qformer_config()).to(device).eval()
    eager = Blip2QFormerModel(qformer_config()).to(device).eval()
    eager.load_state_dict(ours.state_dict())
    ours.set_attn_implementation("deco_ops")
    eager.set_attn_implementation("eager")

    queries = torch.randn(2, 8, 32, device=device)      # BLIP-2's learned query tokens, expanded to the batch
    images = torch.randn(2, 20, 24, device=device)      # image tokens; the second image has 13 valid ones
    padding = (torch.arange(20, device=device) < torch.tensor([[20], [13]], device=device)).long()
    grad_out = torch.randn(2, 8, 32, device=device)

    print("| encoder mask | output rel. error | grad queries | grad image tokens | grad weights (max) |")
    print("|---|---|---|---|---|")
    for name, mask in (("none", None), ("padding 20/13", padding)):
        results = []
        for model in (ours, eager):
            model.zero_grad()
            q, img = queries.clone().requires_grad_(), images.clone().requires_grad_()
            out = model(query_embeds=q, encoder_hidden_states=img, encoder_attention_mask=mask).last_hidden_state
            out.backward(grad_out)
            results.append((out, q.grad, img.grad, [p.grad for p in model.parameters()]))
        (o1, q1, i1, w1), (o2, q2, i2, w2) = results
        # key biases get exactly zero gradient (softmax is shift-invariant): no relative error to take
        weights = max(_rel(a, b) for a, b in zip(w1, w2) if b is not None and b.norm() > 1e-6 * b.numel())
        print(f"| {name} | {_rel(o1, o2):.1e} | {_rel(q1, q2):.1e} | {_rel(i1, i2):.1e} | {weights:.1e} |")


if __name__ == "__main__":
    main()
