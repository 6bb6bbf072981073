"""Activations of the MLP projector and their derivatives, evaluated in fp32 inside GEMM epilogues.

ACTIVATION codes (constexpr): 0 = identity, 1 = erf-GELU (``nn.GELU()``), 2 = tanh-GELU
(``nn.GELU(approximate="tanh")``), 3 = SiLU, 4 = quick-GELU (``x * sigmoid(1.702 x)``, CLIP's and
Hugging Face's ``quick_gelu``).
"""

import triton
import triton.language as tl

IDENTITY, GELU, GELU_TANH, SILU, QUICK_GELU = 0, 1, 2, 3, 4
CODES = {"identity": IDENTITY, "gelu": GELU, "gelu_tanh": GELU_TANH, "silu": SILU, "quick_gelu": QUICK_GELU}

# Globals read inside @triton.jit functions must be tl.constexpr: compiled Triton rejects plain
# Python floats (the interpreter accepts them, so only an ahead-of-time compile catches it).
# Keep the tensor on the left of each product: in the interpreter `constexpr * tensor` wraps the
# tensor in a constexpr, which tl.math functions then reject.
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_QUICK_GELU_SLOPE = tl.constexpr(1.702)


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend; 2*sigmoid(2x)-1 is exact in fp32 and saturates cleanly.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tanh_gelu_inner(z):
    """sqrt(2/pi) * (z + 0.044715 z^3), the argument of tanh in tanh-GELU."""
    return (z + z * z * z * _TANH_CUBIC) * _SQRT_2_OVER_PI


@triton.jit
def apply(z, ACTIVATION: tl.constexpr):
    """act(z) for fp32 ``z``."""
    if ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT_HALF))
    elif ACTIVATION == 2:
        return 0.5 * z * (1.0 + _tanh(_tanh_gelu_inner(z)))
    elif ACTIVATION == 3:
        return z * tl.sigmoid(z)
    elif ACTIVATION == 4:
        return z * tl.sigmoid(z * _QUICK_GELU_SLOPE)
    else:
        return z


@triton.jit
def derivative(z, ACTIVATION: tl.constexpr):
    """act'(z) for fp32 ``z``."""
    if ACTIVATION == 1:
        return 0.5 * (1.0 + tl.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 2:
        t = _tanh(_tanh_gelu_inner(z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (z * z * (3.0 * _TANH_CUBIC) + 1.0)
    elif ACTIVATION == 3:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 4:
        s = tl.sigmoid(z * _QUICK_GELU_SLOPE)
        return s * (1.0 + z * _QUICK_GELU_SLOPE * (1.0 - s))
    else:
        return tl.full(z.shape, 1.0, tl.float32)
