"""The bias + activation epilogue shared by the fused first-Linear GEMMs (``pool_gemm.py``,
``merge_gemm.py``), which differ only in how they form their A tiles."""

import triton
import triton.language as tl

from . import activations


@triton.jit
def bias_act_store(acc, rows64, cols, row_mask, col_mask, N, b_ptr, pre_ptr, out_ptr,
                   HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr):
    """Stores ``act(acc + b)`` (and the pre-activation ``acc + b`` when ``STORE_PRE``) into
    row-major ``(M, N)`` outputs."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_offsets = rows64[:, None] * N + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    acc = activations.apply(acc, ACTIVATION)
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
