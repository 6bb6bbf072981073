"""Shared hypothesis strategies and budgets for the property-based suites.

Each fuzzed op runs ``examples(default)`` examples: a small budget that keeps CI inside its time
under Triton's interpreter, and 10x that with ``pytest --runslow`` (or DECO_OPS_RUNSLOW=1).
CI's examples are derandomised (the same every run); DECO_OPS_FUZZ_RANDOM=1 draws new ones each run
to hunt beyond them (hypothesis reports the ``--hypothesis-seed`` that reproduces a failure).
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from harness import DTYPES

SLOW = os.environ.get("DECO_OPS_RUNSLOW") == "1"
RANDOM = os.environ.get("DECO_OPS_FUZZ_RANDOM") == "1"


def examples(default: int):
    """hypothesis settings for one fuzzed op: ``default`` examples (10x under --runslow)."""
    return settings(
        max_examples=default * (10 if SLOW else 1),
        deadline=None,
        derandomize=not RANDOM,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )



# the fuzzed ops run on the Triton kernels and on the default backend (PyTorch's kernels on CPU tensors)
BACKENDS = ["triton", "auto"]

dtypes = st.sampled_from(DTYPES)
LAYOUTS = ("contiguous", "sliced", "transposed", "expanded")
layouts = st.sampled_from(LAYOUTS)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (B, N, C) in a non-contiguous memory layout.

    * sliced: every other channel of a twice-as-wide buffer;
    * transposed: stored as (B, C, N) and transposed back;
    * expanded: one sample broadcast over the batch with a zero batch stride (the values of
      ``t[0]`` are used for every sample, so callers compare against the expanded tensor).
    """
    if layout == "sliced":
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "transposed":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "expanded":
        return t[:1].expand_as(t)
    return t


@st.composite
def grid_pairs(draw, max_side: int = 40, max_tokens: int = 1600):
    """(grid, out_grid): 2D or 3D, sides 1..max_side, out sides 1..side+3."""
    rank = draw(st.sampled_from([2, 2, 3]))
    while True:
        grid = tuple(draw(st.integers(1, max_side if rank == 2 else 12)) for _ in range(rank))
        if torch.Size(grid).numel() <= max_tokens:
            break
    out = tuple(draw(st.integers(1, side + 3)) for side in grid)
    return grid, out
