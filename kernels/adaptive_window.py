"""Adaptive-pooling window geometry, shared by every pooling kernel and its launcher.

Output cell ``i`` of an axis of input length ``L`` pooled to ``O`` averages inputs
``floor(i*L/O) .. ceil((i+1)*L/O) - 1`` (PyTorch's definition; windows overlap when O does not
divide L). Conversely input ``j`` lies in the windows ``floor(j*O/L) .. ceil((j+1)*O/L) - 1``.
Grids are handled as (T, H, W); a 2D grid is (1, H, W).
"""

import functools

import triton
import triton.language as tl  # noqa: F401  (Triton's interpreter asserts every jit function's module sees it)
from torch.fx.experimental.symbolic_shapes import statically_known_true


@triton.jit
def window(i, L, O):
    """[start, end) of the inputs averaged by output cell ``i``."""
    return (i * L) // O, ((i + 1) * L + O - 1) // O


@triton.jit
def windows_containing(j, L, O):
    """[first, last + 1) of the output cells whose window contains input ``j``."""
    return (j * O) // L, ((j + 1) * O + L - 1) // L


def max_window(L: int, O: int) -> int:
    """Largest window along one axis: the unrolled trip count of the pooled A-tile loads (0 for
    an axis of no output: an empty batch's rows, run as one image). A constexpr of the kernels, so
    symbolic sizes (``torch.compile``'s dynamic shapes) are specialised here, but an axis pooled to
    its own length (``mlp_pool``'s first GEMM, over the batch's tokens), whose windows are 1 for
    every length; a SymInt cannot be a cache key."""
    if type(L) is not int or type(O) is not int:
        if statically_known_true(L == O):  # symbolic sizes are at least 2: no empty axis
            return 1
        L, O = int(L), int(O)  # a guard on each
    return _max_window(L, O)


@functools.lru_cache(maxsize=None)
def _max_window(L: int, O: int) -> int:
    return max((((i + 1) * L + O - 1) // O - (i * L) // O for i in range(O)), default=0)
