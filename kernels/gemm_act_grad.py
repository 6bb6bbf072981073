"""Backward through the MLP projector's activation, fused into the GEMM that needs it.

    dz[m, n] = (sum_k dy[m, k] * w2[k, n]) * act'(z[m, n])     (dy @ w2, then the chain rule)
    a[m, n]  = act(z[m, n])                                   (rebuilt for dW2 = dy.T @ a)

``z`` is the saved pre-activation. The epilogue reads each z tile once and writes both dz and the
recomputed activation, so the activation never had to be kept from the forward pass and the
elementwise GELU backward costs no extra pass over memory. dW2, dW1 and the input gradient are
plain GEMMs on these tensors and stay on cuBLAS.

Counts: flops = 2*M*N*K;  bytes = (M*K + K*N + 3*M*N) * elem.
"""

import torch
import triton
import triton.language as tl

from . import activations
from ._device import on_input_device
from .dot import dot
from .tiling import INTERPRET_CONFIG, gemm_configs, output_tile, tile_grid
from ._tuning import autotuned, dot_dtype_workaround, input_precision


def cuda_configs() -> list[triton.Config]:
    return gemm_configs([
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
    ])


def fits(config: triton.Config, elem_bytes: int) -> bool:
    """Whether ``config`` compiles without spills (measured by ``python -m deco_ops.aot``):
    fp32 operands (tf32 or exact) only fit 64x64 tiles; 16-bit ones fit every tile."""
    return elem_bytes < 4 or config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 64


def _prune(configs, named_args, **constexprs):
    return [c for c in configs if fits(c, named_args["dy_ptr"].element_size())]


@autotuned(cuda_configs(), INTERPRET_CONFIG, key=["M", "N", "K"], buckets=("M",), prune=_prune)
@triton.jit
def gemm_act_grad_kernel(
    dy_ptr, w_ptr, z_ptr, dz_ptr, a_ptr,
    M, N, K,
    sdym, sdyk, swk, swn, szm, szn,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n, rows, cols, row_mask, col_mask = output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        g = tl.load(dy_ptr + rows[:, None] * sdym + k[None, :] * sdyk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + k.to(tl.int64)[:, None] * swk + cols[None, :] * swn, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(g, wt, acc, DOT_FP32, INPUT_PRECISION)

    # Epilogue in two column halves (as Triton's persistent-matmul tutorial's EPILOGUE_SUBTILE): a
    # full BLOCK_M x BLOCK_N tile of z, act'(z) and act(z) next to the accumulator spills registers.
    first_row = (pid_m * BLOCK_M).to(tl.int64)
    # Wide tiles (BLOCK_N >= 256) go in quarters.
    col0 = pid_n * BLOCK_N
    acc_lo, acc_hi = _halves(acc)
    if BLOCK_N >= 256:
        q0, q1 = _halves(acc_lo)
        q2, q3 = _halves(acc_hi)
        quarter = col0 + tl.arange(0, BLOCK_N // 4)
        _act_grad_tile(q0, z_ptr, dz_ptr, a_ptr, first_row, quarter, M, N, szm, szn, ACTIVATION, BLOCK_M)
        _act_grad_tile(q1, z_ptr, dz_ptr, a_ptr, first_row, quarter + BLOCK_N // 4, M, N, szm, szn, ACTIVATION, BLOCK_M)
        _act_grad_tile(q2, z_ptr, dz_ptr, a_ptr, first_row, quarter + BLOCK_N // 2, M, N, szm, szn, ACTIVATION, BLOCK_M)
        _act_grad_tile(q3, z_ptr, dz_ptr, a_ptr, first_row, quarter + 3 * (BLOCK_N // 4), M, N, szm, szn, ACTIVATION, BLOCK_M)
    else:
        half = col0 + tl.arange(0, BLOCK_N // 2)
        _act_grad_tile(acc_lo, z_ptr, dz_ptr, a_ptr, first_row, half, M, N, szm, szn, ACTIVATION, BLOCK_M)
        _act_grad_tile(acc_hi, z_ptr, dz_ptr, a_ptr, first_row, half + BLOCK_N // 2, M, N, szm, szn, ACTIVATION, BLOCK_M)


@triton.jit
def _halves(t):
    """(left, right) column halves of a 2D tile."""
    return tl.split(tl.permute(tl.reshape(t, (t.shape[0], 2, t.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _act_grad_tile(acc, z_ptr, dz_ptr, a_ptr, first_row, cols, M, N, szm, szn, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Stores dz = acc * act'(z) and act(z) for rows first_row + [0, BLOCK_M) and columns ``cols``."""
    local = tl.arange(0, BLOCK_M)
    mask = ((first_row + local) < M)[:, None] & (cols < N)[None, :]
    z = tl.load(z_ptr + first_row * szm + (local[:, None] * szm + cols[None, :] * szn), mask=mask, other=0.0).to(tl.float32)
    offsets = local[:, None] * N + cols[None, :]
    tl.store(dz_ptr + first_row * N + offsets, (acc * activations.derivative(z, ACTIVATION)).to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + first_row * N + offsets, activations.apply(z, ACTIVATION).to(a_ptr.dtype.element_ty), mask=mask)


@on_input_device
def gemm_act_grad(dy: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, K) , w2 (K, N) in nn.Linear layout (out=K, in=N), z (M, N) -> (dz, act(z)), both (M, N)."""
    M, K = dy.shape
    N = w2.shape[1]
    dz = torch.empty((M, N), device=dy.device, dtype=z.dtype)
    a = torch.empty((M, N), device=dy.device, dtype=z.dtype)
    if M == 0 or N == 0:
        return dz, a

    gemm_act_grad_kernel[tile_grid(M, N)](
        dy, w2, z, dz, a, M, N, K,
        *dy.stride(), *w2.stride(), *z.stride(),
        ACTIVATION=activations.CODES[activation],
        DOT_FP32=dot_dtype_workaround(dy.dtype == torch.bfloat16),
        INPUT_PRECISION=input_precision(dy.dtype),
    )
    return dz, a


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K
