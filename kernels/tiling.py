"""How the GEMM kernels cut their (M, N) output into BLOCK_M x BLOCK_N tiles: the candidate tile
configs, the launch grid (one program per tile) and each program's tile."""

import triton
import triton.language as tl

from ._host_arith import cdiv


def gemm_configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Autotune candidates from ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` rows, all
    with grouped tile order (``GROUP_M`` 8)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in tiles
    ]


# The interpreter runs one small tile (its cost is per program and per op, and it cannot autotune).
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4})


def tile_grid(M: int, N: int):
    """The launch grid of an (M, N) output: one program per tile of the config being launched."""
    return lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid`` in grouped order: GROUP_M row tiles sweep the
    columns together, so their A rows and the B tiles they share stay in L2 (Triton's matmul
    tutorial, "L2 cache optimizations")."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile: ``(pid_m, pid_n, rows, cols, row_mask, col_mask)``, rows as int64 (row
    offsets times a row stride overflow int32 at a few million elements)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, rows, cols, rows < M, cols < N
