"""Backward of project-then-pool (PLLaVA / LLaVA-OneVision order), ``y = Linear2(pool(act(Linear1(x))))``.

The forward runs as two ``pool_gemm`` launches: ``act(x @ W1.T + b1)`` over every token (a GEMM
with bias + activation in its epilogue), then ``pool(.) @ W2.T + b2`` with the pooling in the
second GEMM's A-operand load, so the second GEMM runs on pooled rows only (pool weights sum to
one, so pooling commutes with the affine Linear2). The token-sized hidden activation is written
once and read once; nothing token-sized is kept for backward except ``x`` itself.

Backward, with ``dpa = dy @ W2`` (pooled rows only, cuBLAS, kept in fp32: where a token lies in
several windows their gradients may cancel, so they are summed before any 16-bit rounding), this
kernel computes

    dz[m, n] = act'( sum_k x[m, k] * W1[n, k] + b1[n] ) * unpool(dpa)[m, n]      m = token

recomputing the pre-activation with a tensor-core GEMM instead of storing it (tokens x hidden,
the largest tensor of the op) and gathering the un-pooled gradient of each token in its epilogue
(``packed_pool.unpooled_tile``: deterministic, no atomics), so neither the pre-activation nor the
un-pooled gradient ever exists in memory. dW1 = dz.T @ x, db1 and dx = dz @ W1 stay on cuBLAS.

Counts: flops = 2*M*N*K (the recomputed GEMM; the gather adds ~taps*M*N);
bytes = (M*K + N*K + N + M*N) * elem + P*N * taps * 4, P = pooled rows.
"""

import torch
import triton
import triton.language as tl

from . import activations
from ._device import on_input_device
from .dot import dot
from .tiling import INTERPRET_CONFIG, gemm_configs, output_tile, tile_grid
from ._tuning import autotuned, dot_dtype_workaround, input_precision
from .packed_pool import MODES, image_index, packed_geometry, unpooled_tile


def cuda_configs() -> list[triton.Config]:
    return gemm_configs([
        (128, 64, 64, 4, 4),
        (64, 64, 32, 8, 3),
        (32, 64, 32, 8, 2),
    ])


def fits(config: triton.Config, elem_bytes: int, activation: int, mode: int) -> bool:
    """Whether ``config`` runs without register spills (measured by ``python -m deco_ops.aot`` on
    sm_90 with triton 3.9, fp32 gathered gradient): the epilogue holds the gathered fp32 gradient
    tile and its pointers beside the accumulator, so 16-bit operands fit 64x64 on 8 warps, the
    128-row tile only erf-GELU's derivative, the 32-row tile only average pooling's taps (not
    bilinear's weights); fp32 operands only fit 32x64 on 8 warps."""
    tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps)
    if elem_bytes == 4:
        return tile == (32, 64, 8)
    if tile[0] == 128:
        return activation == activations.GELU
    return tile[0] == 64 or mode == MODES["average"]


def _prune(configs, named_args, **constexprs):
    elem = named_args["x_ptr"].element_size()
    return [c for c in configs if fits(c, elem, constexprs["ACTIVATION"], constexprs["MODE"])]


@autotuned(cuda_configs(), INTERPRET_CONFIG, key=["M", "N", "K", "MODE", "ACTIVATION"], buckets=("M",),
           prune=_prune)
@triton.jit
def gemm_unpool_act_grad_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, dz_ptr, image_ptr, geometry_ptr,
    M, N, K,
    sxm, sxk, swn, swk, sgp, sgn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, MODE: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _, _, rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + rows[:, None] * sxm
    w_tile = w_ptr + cols.to(tl.int64)[None, :] * swn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        a = tl.load(x_rows + k[None, :] * sxk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_tile + k[:, None] * swk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # The pre-activation is rounded to the operand dtype, as the forward's stored activation was.
    z = acc.to(x_ptr.dtype.element_ty).to(tl.float32)

    T, H, W, OT, OH, OW, tok0, row0 = packed_geometry(rows, row_mask, image_ptr, geometry_ptr)
    da = unpooled_tile(g_ptr, sgp, sgn, rows - tok0, T, H, W, OT, OH, OW, row0, row_mask, cols, col_mask, MODE)
    # rounded to dpa's dtype as the composed twin's un-pooling stores it (a no-op for fp32 dpa)
    da = da.to(g_ptr.dtype.element_ty).to(tl.float32)
    dz = da * activations.derivative(z, ACTIVATION)
    out_mask = row_mask[:, None] & col_mask[None, :]
    tl.store(dz_ptr + rows[:, None] * N + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=out_mask)


@on_input_device
def gemm_unpool_act_grad(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    dpa: torch.Tensor,
    geometry: torch.Tensor,
    activation: str,
    mode: str,
) -> torch.Tensor:
    """x (tokens, K), w1 (N, K) nn.Linear layout, dpa (pooled rows, N) fp32 -> dz (tokens, N)."""
    M, K = x.shape
    N = w1.shape[0]
    dz = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return dz
    image = image_index(geometry, "tokens", M)

    gemm_unpool_act_grad_kernel[tile_grid(M, N)](
        x, w1, b1 if b1 is not None else dz, dpa, dz, image, geometry,
        M, N, K, *x.stride(), *w1.stride(), *dpa.stride(),
        HAS_BIAS=b1 is not None, ACTIVATION=activations.CODES[activation], MODE=MODES[mode],
        DOT_FP32=dot_dtype_workaround(x.dtype == torch.bfloat16),
        INPUT_PRECISION=input_precision(x.dtype),
    )
    return dz


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K
