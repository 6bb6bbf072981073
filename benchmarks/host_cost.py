"""``python -m benchmarks.host_cost``: the host cost of one deco_ops call against the eager PyTorch
code it replaces, on tiny CPU tensors on the default backend (the PyTorch path), where the host
path is all there is to measure (issue 20: ours ≤ 1.2× eager, ≤ 60 Python-level calls).

For each op and mode it reports, deco_ops and eager side by side, measured in the same run:

* ``us``: microseconds per call, the best of many short rounds in which the two alternate (a
  shared, busy machine slows rounds, never speeds them up: the minimum is the cost of the code);
* ``calls``: ``cProfile``'s ``total_calls`` for one call (deterministic, unlike the time): Python
  functions and C functions called from Python, including the case's own function and the
  profiler's ``disable``, as ``python -m cProfile`` counts them.

Modes: ``infer`` (no input requires grad), ``grad`` (the forward only, inputs and parameters
requiring grad: what autograd records), ``fwd+bwd`` (forward and ``backward``); and the same fp32
inputs inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` (mixed-precision training, as
Hugging Face's Trainer runs it): ``autocast`` (inference, the whole measurement inside one region)
and ``autocast+bwd`` (each call's forward inside a region, ``backward`` after it, as a training
step does; entering the region is part of both sides' time).

    python -m benchmarks.host_cost [--ops NAMES] [--modes NAMES] [--rounds N]

``tests/test_host_path.py`` pins the ``calls`` of deco_ops' side of every case.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import pstats
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import deco_ops

MODES = ("infer", "grad", "fwd+bwd", "autocast", "autocast+bwd")
AUTOCAST_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    """One op on fixed tiny inputs: ``ours(*inputs)`` and ``eager(*inputs)`` compute the same."""

    name: str
    ours: Callable
    eager: Callable
    inputs: Callable[[], list[torch.Tensor]]  # fresh inputs (float32, CPU, seeded)
    differentiable: int  # how many leading inputs take gradients in the grad modes


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator)


def _pool_tokens_eager(x, grid, out_grid):
    B, _, C = x.shape
    pooled = F.adaptive_avg_pool2d(x.view(B, *grid, C).permute(0, 3, 1, 2), out_grid)
    return pooled.flatten(2).transpose(1, 2)


GRID, OUT_GRID = (4, 4), (2, 2)


def _projector_inputs():
    g = torch.Generator().manual_seed(0)
    return [_randn(1, 16, 16, generator=g), _randn(32, 16, generator=g), _randn(32, generator=g),
            _randn(16, 32, generator=g), _randn(16, generator=g)]


def _attention_inputs():
    g = torch.Generator().manual_seed(1)
    return [_randn(2, 4, 2, 8, generator=g), _randn(2, 8, 2, 8, generator=g), _randn(2, 8, 2, 8, generator=g)]


def _packed_inputs():
    """Two images of 4x4 and 3x4 tokens (16 channels), each pooled to 2x2; the grid tables on the CPU."""
    g = torch.Generator().manual_seed(4)
    return [_randn(28, 16, generator=g), _randn(32, 16, generator=g), _randn(32, generator=g), _randn(16, 32, generator=g),
            _randn(16, generator=g), torch.tensor([[4, 4], [3, 4]]), torch.tensor([[2, 2], [2, 2]])]


def _pool_packed_eager(x, grids, out_grids):
    """A loop over the images, what a user writes without a packed op (the tables read once)."""
    parts, start = [], 0
    for (h, w), out_grid in zip(grids.tolist(), out_grids.tolist()):
        parts.append(_pool_tokens_eager(x[None, start: start + h * w], (h, w), out_grid)[0])
        start += h * w
    return torch.cat(parts)


def _merge_inputs(pre: bool):
    """Tokens (1, 16, 8) of a 4x4 grid merged 2x2: rows of 32 channels, hidden 32, out 16; the
    norm spans 8 channels (pre-merge) or 32 (post-merge)."""
    g = torch.Generator().manual_seed(3)
    width = 8 if pre else 32
    return [_randn(1, 16, 8, generator=g), 1 + 0.1 * _randn(width, generator=g), _randn(width, generator=g),
            _randn(32, 32, generator=g), _randn(32, generator=g), _randn(16, 32, generator=g), _randn(16, generator=g)]


def _merge_eager(merged, nw, nb, w1, b1, w2, b2):
    """The projector's MLP (HF's ``mlp`` / ``linear_1, act, linear_2``) on merged rows."""
    return F.linear(F.gelu(F.linear(merged, w1, b1)), w2, b2)


def _pixel_shuffle(x, grid):
    """InternVL's ``pixel_shuffle`` (2x2) of row-major tokens, as ``merge_reference._blocks``."""
    B, _, C = x.shape
    H, W = grid
    return x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(2, 3).reshape(B, -1, 4 * C)


CASES = [
    Case(
        "pool_mlp",
        lambda x, w1, b1, w2, b2: deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
        lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(_pool_tokens_eager(x, GRID, OUT_GRID), w1, b1)), w2, b2),
        _projector_inputs, 5,
    ),
    Case(
        "pool_linear",
        lambda x, w1, b1, *_: deco_ops.pool_linear(x, w1, b1, grid=GRID, out_grid=OUT_GRID),
        lambda x, w1, b1, *_: F.linear(_pool_tokens_eager(x, GRID, OUT_GRID), w1, b1),
        _projector_inputs, 3,
    ),
    Case(
        "adaptive_avg_pool_tokens",
        lambda x, *_: deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID),
        lambda x, *_: _pool_tokens_eager(x, GRID, OUT_GRID),
        _projector_inputs, 1,
    ),
    Case(
        "mlp_pool",
        lambda x, w1, b1, w2, b2: deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
        lambda x, w1, b1, w2, b2: _pool_tokens_eager(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), GRID, OUT_GRID),
        _projector_inputs, 5,
    ),
    Case(
        "pool_mlp_packed",
        lambda x, w1, b1, w2, b2, grids, out_grids: deco_ops.pool_mlp_packed(x, grids, w1, b1, w2, b2, out_grids=out_grids)[0],
        lambda x, w1, b1, w2, b2, grids, out_grids: F.linear(F.gelu(F.linear(_pool_packed_eager(x, grids, out_grids), w1, b1)), w2, b2),
        _packed_inputs, 5,
    ),
    Case(  # Qwen2-VL's PatchMerger: LayerNorm per token, the 2x2 block's tokens consecutive
        "merge_mlp",
        lambda x, nw, nb, *mlp: deco_ops.merge_mlp(x, nw, nb, *mlp),
        lambda x, nw, nb, *mlp: _merge_eager(F.layer_norm(x, (8,), nw, nb, 1e-6).view(-1, 32), nw, nb, *mlp),
        lambda: _merge_inputs(pre=True), 7,
    ),
    Case(  # InternVL's projector: pixel_shuffle of the row-major grid, LayerNorm over the merged row
        "merge_mlp_grid",
        lambda x, nw, nb, *mlp: deco_ops.merge_mlp(x, nw, nb, *mlp, grid=GRID, order="grid", norm_position="post", eps=1e-5),
        lambda x, nw, nb, *mlp: _merge_eager(F.layer_norm(_pixel_shuffle(x, GRID), (32,), nw, nb, 1e-5), nw, nb, *mlp),
        lambda: _merge_inputs(pre=False), 7,
    ),
    Case(
        "cross_attention",
        lambda q, k, v: deco_ops.cross_attention(q, k, v),
        lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2),
        _attention_inputs, 3,
    ),
]


def call_of(case: Case, impl: Callable, mode: str) -> Callable[[], object]:
    """A zero-argument function that makes one call of ``impl`` in ``mode`` (``autocast``: to be
    run inside ``region(mode)``)."""
    inputs = case.inputs()
    if mode not in ("infer", "autocast"):
        inputs = [t.requires_grad_(i < case.differentiable) for i, t in enumerate(inputs)]
    if mode in ("infer", "grad", "autocast"):
        return lambda: impl(*inputs)
    forward = (lambda: impl(*inputs)) if mode == "fwd+bwd" else _in_autocast(impl, inputs)
    grad = torch.randn(forward().shape, generator=torch.Generator().manual_seed(2))
    return lambda: forward().backward(grad)


def _in_autocast(impl: Callable, inputs: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    def forward():
        with torch.autocast("cpu", dtype=AUTOCAST_DTYPE):
            return impl(*inputs)

    return forward


def region(mode: str) -> contextlib.AbstractContextManager:
    """Where ``mode``'s calls run: ``autocast`` inside one autocast region, the others outside."""
    return torch.autocast("cpu", dtype=AUTOCAST_DTYPE) if mode == "autocast" else contextlib.nullcontext()


def python_calls(run: Callable[[], object]) -> int:
    """``cProfile``'s total_calls of one call of ``run`` (warm: the first call of a signature
    builds its plan). Garbage is collected first and the collector held off during the call: a
    collection inside it runs whatever weakref callbacks the freed objects carry (49 of dynamo's
    ``_remove_id`` after a compiled test), calls that are not the op's."""
    run()
    gc.collect()
    gc.disable()
    try:
        profile = cProfile.Profile()
        profile.enable()
        run()
        profile.disable()
    finally:
        gc.enable()
    return pstats.Stats(profile).total_calls


def best_us(runs: list[Callable[[], object]], rounds: int, calls_per_round: int = 50) -> list[float]:
    """Microseconds per call of each run: the best round, the runs alternating round by round."""
    best = [float("inf")] * len(runs)
    for run in runs:
        for _ in range(calls_per_round):
            run()
    for _ in range(rounds):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            for _ in range(calls_per_round):
                run()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls_per_round * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # host cost, not intra-op parallelism (and no oversubscribed cores)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU tensors, backend {deco_ops._backend.selected()}")
    print(f"{'op':<26}{'mode':<13}{'ours_us':>9}{'eager_us':>10}{'ratio':>7}{'ours_calls':>12}{'eager_calls':>13}")
    for case in CASES:
        if case.name not in args.ops:
            continue
        for mode in args.modes:
            ours, eager = call_of(case, case.ours, mode), call_of(case, case.eager, mode)
            with region(mode):
                ours_us, eager_us = best_us([ours, eager], args.rounds)
                ours_calls, eager_calls = python_calls(ours), python_calls(eager)
            print(f"{case.name:<26}{mode:<13}{ours_us:>9.1f}{eager_us:>10.1f}{ours_us / eager_us:>7.2f}"
                  f"{ours_calls:>12}{eager_calls:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
