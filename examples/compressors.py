"""DeCo projector vs Q-Former resampler at the same visual-token budget: parameters, forward FLOPs,
bytes autograd keeps for backward, and forward+backward time on this device.

    python examples/compressors.py compressors.png [--device cuda] [--preset llava15|small]

Both compress a 24x24 patch grid (CLIP ViT-L/14-336: 576 tokens) to 144 tokens for the language
model: ``DeCoProjector`` pools 2x2 and runs LLaVA's two-layer MLP projector (pooling fused into the
first GEMM), ``QueryResampler`` lets 144 learned queries cross-attend once to the 576 tokens
(``deco_ops.cross_attention``). The vision tower is frozen, as in LLaVA training: the tokens need
no gradient, the compressor's weights do. Prints a markdown table and writes a bar chart to the
PNG path given. ``--preset llava15`` (the default on a GPU) uses LLaVA-1.5-7B's widths (1024 ->
4096); ``small`` (the default on a CPU) narrows them so the run takes seconds. On a CPU deco_ops
runs its PyTorch path, so CPU times compare the two designs, not the kernels.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

import deco_ops

GRID, OUT_GRID = (24, 24), (12, 12)
PRESETS = {  # vision width, LLM width, attention heads, batch
    "llava15": dict(vision=1024, llm=4096, heads=32, batch=8),
    "small": dict(vision=256, llm=512, heads=8, batch=2),
}


def deco_flops(B: int, N: int, P: int, C: int, D: int) -> int:
    """Pooling adds (B*N*C) plus the two GEMMs on the P pooled rows."""
    return B * N * C + 2 * B * P * C * D + 2 * B * P * D * D


def resampler_flops(B: int, N: int, M: int, C: int, D: int) -> int:
    """Query projection (once, shared by the batch), K and V projections of the N tokens,
    QK^T and PV, output projection."""
    return 2 * M * D * D + 2 * 2 * B * N * C * D + 4 * B * M * N * D + 2 * B * M * D * D


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters (and views of them) excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values())


def step_ms(module: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median forward+backward time in milliseconds (synchronised on CUDA)."""
    times = []
    for i in range(reps + 2):  # two warm-up steps (compilation, autotuning)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        module(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("png", type=Path, help="where to write the bar chart")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="widths (default: llava15 on a GPU, small on a CPU)")
    parser.add_argument("--batch", type=int, help="images per batch (default: the preset's)")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per compressor")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    preset = args.preset or ("llava15" if device.type == "cuda" else "small")
    C, D, H, B = (PRESETS[preset][k] for k in ("vision", "llm", "heads", "batch"))
    B = args.batch or B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    N, P = math.prod(GRID), math.prod(OUT_GRID)

    torch.manual_seed(0)
    compressors = {
        "DeCo (2x2 pool + MLP)": (deco_ops.DeCoProjector(C, D, grid=GRID, out_grid=OUT_GRID), deco_flops(B, N, P, C, D)),
        "Q-Former resampler": (deco_ops.QueryResampler(P, D, C, H), resampler_flops(B, N, P, C, D)),
    }
    x = torch.randn(B, N, C, device=device, dtype=dtype)  # frozen vision tower: no grad
    rows = []
    for name, (module, flops) in compressors.items():
        module.to(device, dtype)
        rows.append({
            "compressor": name,
            "params (M)": sum(p.numel() for p in module.parameters()) / 1e6,
            "fwd GFLOP": flops / 1e9,
            "saved for bwd (MiB)": saved_bytes(module, x) / 2**20,
            "fwd+bwd (ms)": step_ms(module, x, args.reps),
        })

    print(f"{B} x {N} tokens of width {C} -> {P} tokens of width {D} ({preset}, {dtype}, {device})\n")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] if isinstance(row[c], str) else f"{row[c]:.3g}" for c in columns) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns) - 1, figsize=(4 * (len(columns) - 1), 3.2))
    for ax, column in zip(axes, columns[1:]):
        ax.bar([r["compressor"] for r in rows], [r[column] for r in rows], color=["tab:blue", "tab:orange"])
        ax.set_title(column)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{N} -> {P} visual tokens, {C} -> {D} ({preset}, {dtype}, {device.type})")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=100)
    print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
