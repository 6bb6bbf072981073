"""Float arguments of the kernels, as fp32 whoever launches them."""

import triton
import triton.language as tl


@triton.jit
def fp32_scalar(x):
    """``x`` (a float argument) as fp32. Triton's own launcher passes Python floats as fp32, but
    torch.compile's Inductor, launching the same kernel through ``wrap_triton``, types them fp64
    (seen on the H200, torch 2.11): a softmax scale or dropout rate in fp64 promotes every tile it
    touches to fp64, and a loop-carried fp32 accumulator then fails to compile. fp32 in the float64
    kernels too: Triton's launcher gives them fp32 floats on a GPU, and now the interpreter computes
    what a GPU does (an fp32-rounded scale, ~1e-8 from the float64 reference)."""
    return tl.cast(x, tl.float32)
