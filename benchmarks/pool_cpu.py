"""``python -m benchmarks.pool_cpu``: ``adaptive_avg_pool_tokens`` on CPU tensors (the default
PyTorch backend, what a vision tower training on a CPU runs) against the eager code it replaces,
``F.adaptive_avg_pool2d``/``3d`` on the tokens viewed as an image.

For each shape: forward (no autograd), forward + backward, and the backward alone (their
difference), in milliseconds of CPU time on one intra-op thread (``timing.interleaved_ms``: the
implementations timed in turn, fastest call), and deco_ops / eager. The issue's bar: the backward
at most 1.2x eager's.

    python -m benchmarks.pool_cpu [--quick]
"""

from __future__ import annotations

import argparse
import math

import torch

import deco_ops

from .cases import eager_pool_tokens
from .timing import interleaved_ms

# (name, batch, grid, out_grid, channels): LLaVA-1.5's CLIP ViT-L/14-336 grid pooled 2x2 at
# batch 8, SigLIP's uneven 27 -> 12, and 8 video frames of PLLaVA (3D).
SHAPES = [
    ("llava15_b8", 8, (24, 24), (12, 12), 1024),
    ("siglip_b8", 8, (27, 27), (12, 12), 1152),
    ("pllava_8f", 1, (8, 24, 24), (8, 12, 12), 1024),
]


def measure(batch: int, grid, out_grid, C: int, quick: bool) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, math.prod(grid), C, generator=gen).requires_grad_(True)
    dy = torch.randn(batch, math.prod(out_grid), C, generator=gen)

    def forward(pool):
        def run():
            with torch.no_grad():
                pool(x, grid, out_grid)
        return run

    def forward_backward(pool):
        def run():
            pool(x, grid, out_grid).backward(dy)
            x.grad = None
        return run

    deco = deco_ops.adaptive_avg_pool_tokens
    fns = {"deco fwd": forward(deco), "eager fwd": forward(eager_pool_tokens),
           "deco fwd+bwd": forward_backward(deco), "eager fwd+bwd": forward_backward(eager_pool_tokens)}
    for fn in fns.values():
        fn()
    return interleaved_ms(fns, quick=quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with deco_ops.use_backend("auto"):
        print(f"torch {torch.__version__}, CPU, fp32, 1 thread; ms of CPU time, fastest call")
        print("| shape | direction | deco_ops ms | eager ms | deco / eager |")
        print("|---|---|---|---|---|")
        for name, batch, grid, out_grid, C in SHAPES:
            t = measure(batch, grid, out_grid, C, args.quick)
            rows = {"fwd": (t["deco fwd"], t["eager fwd"]), "fwd+bwd": (t["deco fwd+bwd"], t["eager fwd+bwd"])}
            rows["bwd"] = tuple(fb - f for fb, f in zip(rows["fwd+bwd"], rows["fwd"]))
            for direction, (deco, eager) in rows.items():
                print(f"| {name} B={batch} {grid}->{out_grid} C={C} | {direction} | {deco:.2f} | {eager:.2f} | {deco / eager:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
