"""Backward through the MLP projector's activation as one elementwise pass after cuBLAS's ``dh = dy @ W2``
(the composed twin of ``gemm_act_grad``, which fuses the same epilogue into its own GEMM):

    dz[m, n] = dh[m, n] * act'(z[m, n])        (rounded once to the output dtype)
    a[m, n]  = act(z[m, n])                    (rebuilt for dW2 = dy.T @ a)
    db[n]    = sum_m dz[m, n]                  (the first Linear's bias gradient, optional)

``z`` is the saved pre-activation; the math runs in fp32 from the 16-bit loads, one rounding per
output, as ATen's ``gelu_backward``/``silu_backward``. The bias gradient is summed in the same pass:
each program owns ``ROWS`` rows of a column block, adds its rounded ``dz`` tile by tile in fp32 and
writes one partial row; the last program of the column block to finish (an int32 arrival counter
per column block) sums its ``cdiv(M, ROWS)`` partial rows in a fixed order and writes ``db``, rounded
once to dz's dtype: deterministic (no float atomics) and in the same launch (no second reduction
and no cast after it; the only other launch is the counters' zero-fill). Without it ``db1`` would
be another full read of dz.

Counts: flops = 2*M*N*K for ``dh = dy @ W2`` (cuBLAS; the pass itself does no matmul work), the
same as ``gemm_act_grad.flops``, which the benchmarks credit to either twin; pass bytes =
4*M*N*elem (read dh and z, write dz and a) + 8*cdiv(M, ROWS)*N (fp32 partials, written then read)
+ N*elem (db), against 6*M*N*elem for the unfused dh round trip plus a separate db1 reduction.
"""

import torch
import triton
import triton.language as tl

from . import activations
from ._device import on_input_device
from ._host_arith import cdiv
from ._traceable import launcher
from .arrival import last_to_arrive

# One fixed config (an elementwise pass needs no tuning): 16 x 128 tiles, 64 rows per program, so
# the partial sums are 1/64 of dz's rows and a LLaVA-sized pass (B*144 rows, hidden 4096) still
# spreads over hundreds of programs.
BLOCK_M, BLOCK_N, ROWS = 16, 128, 64


@triton.jit
def activation_backward_kernel(
    dh_ptr, z_ptr, dz_ptr, a_ptr, partial_ptr, count_ptr, db_ptr,
    M, N, sdm, sdn, szm, szn,
    ACTIVATION: tl.constexpr, BIAS_GRAD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # row chunks on axis 0 (axis 1 stops at 65535)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, ROWS, BLOCK_M):
        rows = pid_m.to(tl.int64) * ROWS + r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        # masked entries load 0: dz = 0 * act'(0) = 0 adds nothing to the column sums
        dh = tl.load(dh_ptr + rows[:, None] * sdm + cols[None, :] * sdn, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * szm + cols[None, :] * szn, mask=mask, other=0.0).to(tl.float32)
        dz = (dh * activations.derivative(z, ACTIVATION)).to(dz_ptr.dtype.element_ty)
        offsets = rows[:, None] * N + cols[None, :]
        tl.store(dz_ptr + offsets, dz, mask=mask)
        tl.store(a_ptr + offsets, activations.apply(z, ACTIVATION).to(a_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            # the rounded dz, the values dW1 = dz.T @ x sees, as eager sums its stored gradient
            colsum += tl.sum(dz.to(tl.float32), axis=0)
    if BIAS_GRAD:
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, colsum, mask=col_mask)
        chunks = tl.num_programs(0)
        if last_to_arrive(count_ptr + tl.program_id(1), chunks):
            db = tl.zeros([BLOCK_N], dtype=tl.float32)
            for chunk in range(chunks):
                db += tl.load(partial_ptr + tl.cast(chunk, tl.int64) * N + cols, mask=col_mask, other=0.0,
                              cache_modifier=".cg")
            tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_mask)


@on_input_device
def activation_backward(
    dh: torch.Tensor, z: torch.Tensor, activation: str, bias_grad: bool, dh_is_scratch: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dh (M, N) = dy @ W2, z (M, N) the pre-activation -> (dz, act(z), db or None), dz, act(z)
    (M, N) and db (N,) = dz.sum(0) (summed in fp32, rounded once; when ``bias_grad``) in z's dtype.
    ``dh_is_scratch``: the caller's own temporary, which dz may overwrite (each element is read, then
    written, by the same program at the same offset): one hidden-sized buffer less at the backward's
    peak, which then holds what eager's does."""
    M, N = z.shape
    if dh_is_scratch and dh.dtype == z.dtype and dh.is_contiguous():
        dz = dh
    else:
        dz = torch.empty((M, N), device=z.device, dtype=z.dtype)
    a = torch.empty((M, N), device=z.device, dtype=z.dtype)
    if M == 0 or N == 0:
        return dz, a, (torch.zeros(N, device=z.device, dtype=z.dtype) if bias_grad else None)
    chunks, column_blocks = cdiv(M, ROWS), cdiv(N, BLOCK_N)
    if bias_grad:
        partials = torch.empty((chunks, N), device=z.device, dtype=torch.float32)
        counts = torch.zeros(column_blocks, device=z.device, dtype=torch.int32)
        db = torch.empty(N, device=z.device, dtype=z.dtype)
    else:  # unused: dz stands in
        partials = counts = db = dz
    launcher(activation_backward_kernel, z)[(chunks, column_blocks)](
        dh, z, dz, a, partials, counts, db,
        M, N, *dh.stride(), *z.stride(),
        ACTIVATION=activations.CODES[activation], BIAS_GRAD=bias_grad,
        ROWS=ROWS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    return dz, a, db if bias_grad else None

