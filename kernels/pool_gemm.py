"""Adaptive pooling fused into a GEMM's A-operand load, with bias and activation in the epilogue.

    out[m, n] = act( sum_k pooled[m, k] * w[n, k] + b[n] ),   m = (batch, output cell)

``pooled`` never exists in memory: each A tile (BLOCK_M pooled rows x BLOCK_K channels) is formed
in registers by summing the tokens of every row's window (an unrolled loop over the largest window,
masked per row, so overlapping and uneven windows cost only their own loads), scaling by
1/|window| in fp32 and rounding to the operand dtype exactly once, as PyTorch's pooling output is.
Then a tensor-core ``tl.dot`` with fp32 accumulation; the epilogue adds the bias, optionally stores
the pre-activation (the one hidden-sized tensor kept for backward), applies the activation and
stores the result. When autograd needs it, the programs of the first N tile also store the pooled
tile they formed (the small tensor kept for backward) so the patch tokens are never saved.

``PACKED=True`` (``pool_gemm_packed``): rows of a ragged batch of images with their own grids;
each row's geometry comes from the int32 tables of ``packed_pool.py`` and its A row is formed by
``packed_pool.pooled_tile`` (``MODE`` 0 adaptive average, 1 bilinear; runtime window loops, so one
compiled variant serves every mix of grids; WT/WH/WW are unused and passed as 1).

Used for the first Linear of the DeCo MLP projector (and the whole "linear" projector). The second
Linear of the MLP runs on cuBLAS (``torch.addmm``): its A operand is an ordinary activation tensor,
so there is nothing to fuse into its loads, and cuBLAS is the fastest plain GEMM we could write.

Counts (the benchmarks report TFLOP/s and GB/s from these):
    flops = 2 * M * N * K                                  (pooling adds M*K*|window| adds)
    bytes = (B*N_tok*K + N*K + N + M*N * (1 + stored_pre) + M*K * stored_pooled) * elem
"""

import functools

import torch
import triton
import triton.language as tl

from . import activations
from ._device import on_input_device
from ._traceable import tracing
from .dot import dot
from .gemm_epilogue import bias_act_store
from .tiling import INTERPRET_CONFIG, gemm_configs, output_tile, tile_grid
from ._tuning import INTERPRET, autotuned, device_smem_limit, dot_dtype_workaround, input_precision
from .adaptive_window import max_window, window
from .packed_pool import MODES, dense_geometry, image_index, packed_geometry, pooled_tile


def cuda_configs() -> list[triton.Config]:
    """Tiles for Hopper/Ampere; M = batch * pooled cells is a few thousand, N and K are 1-5k.
    ``fits`` keeps, per call, the ones whose staged window taps fit in shared memory."""
    return gemm_configs([
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 2),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
        (64, 128, 32, 8, 2),
        (64, 64, 32, 4, 2),
        (32, 64, 32, 4, 2),
    ])


def fits(config: triton.Config, taps: int, elem_bytes: int, ieee_fp32: bool, smem_limit: int, packed: bool = False) -> bool:
    """Whether ``config`` can launch for windows of ``taps`` tokens without spilling.

    ``packed``: the ragged path's runtime window loops keep per-row geometry live beside the
    accumulator; of our tiles only 32x64 compiles without spills on sm_80 and sm_90 in every dtype
    and mode. The dense path keeps to 64-row tiles and up (Hopper's wgmma needs 64 rows).

    Triton's pipeliner stages every window-tap load of the A tile through shared memory, so a
    stage holds ``taps`` A tiles and one W tile: ``num_stages * (taps*BM*BK + BK*BN) * elem`` is
    an upper bound (checked against the cubins of ``python -m deco_ops.aot``) that must fit the
    device. Exact fp32 dots (no tf32) run on FMA units and spill beyond 64x64 tiles.
    """
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if packed:
        return (bm, bn) == (32, 64)
    if bm < 64:
        return False
    if ieee_fp32 and bm * bn > 64 * 64:
        return False
    return config.num_stages * (taps * bm * bk + bk * bn) * elem_bytes <= smem_limit


def _prune(configs, named_args, **constexprs):
    x = named_args["x_ptr"]
    taps = constexprs["WT"] * constexprs["WH"] * constexprs["WW"]
    ieee = x.dtype == torch.float32 and constexprs["INPUT_PRECISION"] == "ieee"
    return [c for c in configs if fits(c, taps, x.element_size(), ieee, device_smem_limit(x.device), constexprs["PACKED"])]


def unrolled_windows_fit(x: torch.Tensor, taps: int) -> bool:
    """Whether some config of the dense path (window loop unrolled, taps staged in shared memory)
    fits windows of ``taps`` tokens on ``x``'s device. Always true under the interpreter."""
    if INTERPRET:
        return True
    return _windows_fit(x.device, x.dtype, taps, input_precision(x.dtype))


@functools.lru_cache(maxsize=None)
def _windows_fit(device: torch.device, dtype: torch.dtype, taps: int, precision: str) -> bool:
    """``unrolled_windows_fit`` once per setting: every dense call asks, and the answer builds and
    checks the whole config list against the device's shared memory."""
    ieee = dtype == torch.float32 and precision == "ieee"
    smem_limit = device_smem_limit(device)
    return any(fits(c, taps, dtype.itemsize, ieee, smem_limit) for c in cuda_configs())


@autotuned(
    cuda_configs(), INTERPRET_CONFIG,
    key=["M", "N", "K", "WT", "WH", "WW", "STORE_PRE", "STORE_POOLED", "PACKED", "MODE", "INPUT_PRECISION"],
    buckets=("M",), prune=_prune,
)
@triton.jit
def pool_gemm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, pre_ptr, pooled_ptr, image_ptr, geometry_ptr,
    M, N, K,
    T, H, W, OT, OH, OW,
    sxb, sxn, sxc, swn, swk,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_POOLED: tl.constexpr,
    WT: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
    PACKED: tl.constexpr, MODE: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, pid_n, rows64, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)

    if PACKED:
        # Ragged batch: each row's image geometry from the tables (packed_pool.py), any MODE.
        T, H, W, OT, OH, OW, tok0, row0 = packed_geometry(rows64, row_mask, image_ptr, geometry_ptr)
        cell = rows64 - row0
    else:
        # Each pooled row's batch and window, once per program.
        P = OT * OH * OW
        batch = rows64 // P
        cell = rows64 % P
        t0, t1 = window(cell // (OH * OW), T, OT)
        h0, h1 = window((cell // OW) % OH, H, OH)
        w0, w1 = window(cell % OW, W, OW)
        inv_count = 1.0 / ((t1 - t0) * (h1 - h0) * (w1 - w0)).to(tl.float32)
        x_rows = x_ptr + batch * sxb

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_tile = w_ptr + cols.to(tl.int64)[None, :] * swn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        if PACKED:
            a = pooled_tile(x_ptr, sxn, sxc, cell, T, H, W, OT, OH, OW, tok0, row_mask, k, k_mask, MODE)
        else:
            a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for dt in tl.static_range(WT):
                for dh in tl.static_range(WH):
                    for dw in tl.static_range(WW):
                        t, h, w = t0 + dt, h0 + dh, w0 + dw
                        inside = row_mask & (t < t1) & (h < h1) & (w < w1)
                        token = (t * H + h) * W + w
                        ptrs = x_rows[:, None] + token[:, None] * sxn + k[None, :] * sxc
                        a += tl.load(ptrs, mask=inside[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            a = a * inv_count[:, None]
        a = a.to(x_ptr.dtype.element_ty)
        if STORE_POOLED:
            if pid_n == 0:
                pooled_ptrs = pooled_ptr + rows64[:, None] * K + k[None, :]
                tl.store(pooled_ptrs, a, mask=row_mask[:, None] & k_mask[None, :])
        wt = tl.load(w_tile + k[:, None] * swk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)

    bias_act_store(acc, rows64, cols, row_mask, col_mask, N, b_ptr, pre_ptr, out_ptr, HAS_BIAS, STORE_PRE, ACTIVATION)


@on_input_device
def pool_gemm(
    x: torch.Tensor,
    grid: tuple[int, int, int],
    out_grid: tuple[int, int, int],
    w: torch.Tensor,
    b: torch.Tensor | None,
    activation: str,
    store_pre: bool,
    store_pooled: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """act(pool(x) @ w.T + b) for x (B, T*H*W, K), w (N, K) -> (B*P, N) plus, on request, the
    pre-activation (B*P, N) and the pooled rows (B*P, K). ``w`` and ``b`` must be contiguous."""
    B, _, K = x.shape
    T, H, W = grid
    OT, OH, OW = out_grid
    M = B * OT * OH * OW
    windows = (max_window(T, OT), max_window(H, OH), max_window(W, OW))
    if M and not unrolled_windows_fit(x, windows[0] * windows[1] * windows[2]):
        # Windows too large to unroll on this device (e.g. 24x24 -> 3x3): the ragged path's
        # runtime window loops serve the batch as B images of one grid.
        geometry = (dense_geometry.__wrapped__ if tracing((x,)) else dense_geometry)(grid, out_grid, B, x.device)  # no fakes cached
        return pool_gemm_packed(
            x.reshape(B * T * H * W, K), geometry, M, "average", w, b,
            activation, store_pre, store_pooled,
        )
    return _launch(x, x.stride(), (T, H, W, OT, OH, OW), windows, None, None, M, "average", w, b, activation,
                   store_pre, store_pooled)


@on_input_device
def pool_gemm_packed(
    x: torch.Tensor,
    geometry: torch.Tensor,
    num_out: int,
    mode: str,
    w: torch.Tensor,
    b: torch.Tensor | None,
    activation: str,
    store_pre: bool,
    store_pooled: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The same fused GEMM over a packed ragged batch: x (total_tokens, K) with per-image
    ``geometry`` (packed_pool.py layout) -> (num_out, N) plus the optional residuals. ``mode`` is
    ``"average"`` (adaptive average) or ``"bilinear"``. One launch for the whole batch."""
    image = image_index(geometry, "out_rows", num_out) if num_out else None
    return _launch(x, (0, *x.stride()), (1,) * 6, (1, 1, 1), image, geometry, num_out, mode, w, b, activation,
                   store_pre, store_pooled)


def _launch(x, x_strides, dims, windows, image, geometry, M, mode, w, b, activation, store_pre, store_pooled):
    """Allocates the outputs and launches ``pool_gemm_kernel`` over M pooled rows: dense (``dims``
    the grids, ``windows`` unrolled) or packed (``geometry`` tables, ``dims`` unused)."""
    N, K = w.shape
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    pre = torch.empty((M, N), device=x.device, dtype=x.dtype) if store_pre else None
    pooled = torch.empty((M, K), device=x.device, dtype=x.dtype) if store_pooled else None
    if N == 0 and M and store_pooled:
        # A layer of width 0 still owes its pooled rows (the op's residual output), but a grid of
        # no column tiles runs no program: pool through one zero column and keep the rows alone.
        pooled = _launch(x, x_strides, dims, windows, image, geometry, M, mode, w.new_zeros((1, K)), None,
                         activation, False, True)[2]
    if M == 0 or N == 0:
        return out, pre, pooled
    packed = geometry is not None
    pool_gemm_kernel[tile_grid(M, N)](
        x, w, b if b is not None else out, out, pre if store_pre else out, pooled if store_pooled else out,
        image if packed else out, geometry if packed else out,
        M, N, K, *dims, *x_strides, *w.stride(),
        HAS_BIAS=b is not None, ACTIVATION=activations.CODES[activation],
        STORE_PRE=store_pre, STORE_POOLED=store_pooled,
        WT=windows[0], WH=windows[1], WW=windows[2], PACKED=packed, MODE=MODES[mode],
        DOT_FP32=dot_dtype_workaround(x.dtype == torch.bfloat16),
        INPUT_PRECISION=input_precision(x.dtype),
    )
    return out, pre, pooled


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K
