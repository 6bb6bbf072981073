"""Plain-PyTorch implementations of every op: the default CPU backend, and the references the
tests compare with (in float64). Tokens are (B, N, C) with N = prod(grid) in row-major order."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
}


# ATen's CPU 3D average pooling sums 16-bit windows in 16 bits: 5.5x the error of a sum in fp32
# rounded once (bf16 16x24x24 -> 5x7x9; its backward 1.6x); its 2D and CUDA kernels accumulate in
# fp32. The 3D functions below pool a 16-bit CPU image in fp32 and round once, as the kernels
# accumulate and as torch.autocast runs F.adaptive_avg_pool3d on the CPU.
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_pool3d, _pool3d_backward = torch._C._nn.adaptive_avg_pool3d, torch.ops.aten._adaptive_avg_pool3d_backward.default


def adaptive_avg_pool3d(image: torch.Tensor, out_grid) -> torch.Tensor:
    """``F.adaptive_avg_pool3d`` of a (B, C, T, H, W) image, its ATen binding; summed in fp32 for a
    16-bit image on the CPU (above)."""
    if image.dtype in _SIXTEEN_BIT and image.device.type == "cpu":
        return _pool3d(image.float(), out_grid).to(image.dtype)
    return _pool3d(image, out_grid)


def _adaptive_avg_pool3d_backward(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ATen's 3D pooling backward of ``grad`` into ``like``'s shape and layout; summed in fp32 for
    16-bit CPU gradients, as ``adaptive_avg_pool3d`` pools."""
    if grad.dtype in _SIXTEEN_BIT and grad.device.type == "cpu":
        return _pool3d_backward(grad.float(), torch.empty_like(like, dtype=torch.float32)).to(grad.dtype)
    return _pool3d_backward(grad, like)


# F.adaptive_avg_pool2d/3d's ATen bindings: their Python wrappers only fill in None entries of the
# output size (out_grid has none) for three more Python calls; the bindings dispatch
# ``__torch_function__`` overrides and modes as the wrappers do
_ADAPTIVE_AVG_POOL = {2: torch._C._nn.adaptive_avg_pool2d, 3: adaptive_avg_pool3d}
_ADAPTIVE_AVG_POOL_BACKWARD = {2: torch.ops.aten._adaptive_avg_pool2d_backward.default, 3: _adaptive_avg_pool3d_backward}


def adaptive_avg_pool_tokens(x: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """F.adaptive_avg_pool2d/3d applied to the token grid, viewed as a channels-last image (no copy;
    on the CPU the same bits as a (B, C, *grid) copy: each window is summed in the same order; on
    CUDA ATen's channels-last 2D kernel rounds differently in 16 bits); the 2D pooling keeps
    channels-last, so its (B, P, C) result is contiguous. 16-bit 3D pooling on the CPU sums in fp32
    (``adaptive_avg_pool3d``)."""
    pool = _ADAPTIVE_AVG_POOL[len(grid)]
    if not (x.shape[0] and x.shape[2]):  # no element: ATen's 3D pooling rejects 0 channels; no empty launch
        return x.new_empty((x.shape[0], math.prod(out_grid), x.shape[2]))
    return pool(x.reshape(x.shape[0], *grid, x.shape[2]).movedim(-1, 1), out_grid).flatten(2).transpose(1, 2)


def unpool_tokens(grad: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """Gradient of ``adaptive_avg_pool_tokens`` w.r.t. its input, by PyTorch's own backward.

    In the tokens' own layout: (B, N, C) tokens viewed as an image (``movedim``, as the forward
    does) are channels-last, the layout ATen's CPU kernels pool fastest, and the 2D gradient comes
    back (B, N, C)-contiguous without a copy (a contiguous NCHW image would cost a transpose on the
    way in and out, 6x the kernel here). The views keep the batch stride ``N * C`` even for one
    image: ATen reads a channels-last layout from all four strides, and a batch stride of ``C``
    (what ``transpose(1, 2).reshape`` gives at B = 1) made it copy the gradient to NCHW and back
    (the same bits either way: each kernel sums a token's windows in the same order)."""
    B, C = grad.shape[0], grad.shape[2]
    if not (B and C):  # nothing to scatter: ATen's pooling backward rejects 0 channels (and see the forward)
        return grad.new_empty((B, math.prod(grid), C))
    like = grad.new_empty((B, *grid, C)).movedim(-1, 1)  # strides only: the kernel's output layout
    dx = _ADAPTIVE_AVG_POOL_BACKWARD[len(grid)](grad.reshape(B, *out_grid, C).movedim(-1, 1), like)
    return dx.movedim(1, -1).reshape(B, math.prod(grid), C)


def pool_linear(x, w, b, grid, out_grid):
    return F.linear(adaptive_avg_pool_tokens(x, grid, out_grid), w, b)


def pool_mlp(x, w1, b1, w2, b2, grid, out_grid, activation="gelu"):
    """Linear2(act(Linear1(pool(x)))): the DeCo projector in eager PyTorch."""
    return F.linear(ACTIVATIONS[activation](F.linear(adaptive_avg_pool_tokens(x, grid, out_grid), w1, b1)), w2, b2)


def _gelu_grad(z):
    if z.requires_grad and torch.is_grad_enabled():  # recorded by autograd: out of place (the steps below
        # change exp's output, which exp's backward reads)
        return 0.5 * (1.0 + torch.erf(z * math.sqrt(0.5))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    # the same ops in the same order (the same bits), two temporaries of z's size in place (in-place
    # operators: no call of their own), where the expression held three and its result (mlp_pool's
    # backward runs it on every token's hidden row)
    grad = torch.erf(z * math.sqrt(0.5))
    grad += 1.0
    grad *= 0.5
    tail = -0.5 * z
    tail *= z
    tail.exp_()
    tail *= z
    tail /= math.sqrt(2.0 * math.pi)
    grad += tail
    return grad


def _gelu_tanh_grad(z):
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (z + 0.044715 * z**3))
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _quick_gelu_grad(z):
    s = torch.sigmoid(1.702 * z)
    return s * (1.0 + 1.702 * z * (1.0 - s))


# Closed forms (autograd is off inside a custom op's implementation); tests check them against
# torch.autograd on the ACTIVATIONS above.
ACTIVATION_GRADS = {"gelu": _gelu_grad, "gelu_tanh": _gelu_tanh_grad, "silu": _silu_grad, "quick_gelu": _quick_gelu_grad}


# PyTorch's own backward kernels, one elementwise pass each (what eager autograd launches for
# nn.GELU / nn.SiLU): fp32 math inside, one rounding, as the closed forms below in fp32.
# The overloads themselves, partial over the approximation: no Python frame of our own and no
# overload resolution per call.
_ATEN_ACTIVATION_BACKWARD = {
    "gelu": functools.partial(torch.ops.aten.gelu_backward.default, approximate="none"),
    "gelu_tanh": functools.partial(torch.ops.aten.gelu_backward.default, approximate="tanh"),
    "silu": torch.ops.aten.silu_backward.default,
}


def bias_grad(g: torch.Tensor) -> torch.Tensor:
    """db of a Linear with output gradient ``g`` (rows, out): one reduction kernel that accumulates
    16-bit ``g`` in fp32 and rounds once, as cuBLAS accumulates dW (and as eager ``nn.Linear``'s
    backward sums it)."""
    return g.sum(0)


def mlp_activation_backward(dy, w2, pre, activation):
    """(dy @ w2 * act'(pre), act(pre)), the activation math in at least fp32. ``dy @ w2`` is a
    temporary of the first expression: freed before act(pre) is allocated, so the backward holds no
    more hidden-sized buffers at once than eager's (which frees its saved activation before)."""
    backward = _ATEN_ACTIVATION_BACKWARD.get(activation)
    if backward is not None:
        dz = backward(torch.mm(dy, w2), pre)
        return dz, ACTIVATIONS[activation](pre)
    z = pre.float() if pre.dtype in (torch.float16, torch.bfloat16) else pre
    dz = (torch.mm(dy, w2).to(z.dtype) * ACTIVATION_GRADS[activation](z)).to(pre.dtype)
    return dz, ACTIVATIONS[activation](z).to(pre.dtype)
