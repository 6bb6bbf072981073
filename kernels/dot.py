"""The tensor-core step every Triton matmul here shares (the GEMMs and both attention passes)."""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (fp64 for the interpreter's float64 checks: named as
    ``out_dtype``, which triton 3.6 otherwise takes as fp32 and asserts on); ``DOT_FP32`` upcasts the
    operands (the interpreter's bf16 dots are wrong, see ``_tuning.dot_dtype_workaround``; compiled
    kernels keep bf16 dots)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
