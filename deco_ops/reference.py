"""Plain-PyTorch implementations of every op: the default CPU backend, and the references the
tests compare with (in float64). Tokens are (B, N, C) with N = prod(grid) in row-major order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": lambda z: F.gelu(z),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def _as_image(x: torch.Tensor, grid) -> torch.Tensor:
    B, _, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *grid)


def adaptive_avg_pool_tokens(x: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """F.adaptive_avg_pool2d/3d applied to the token grid."""
    B, _, C = x.shape
    pool = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d
    return pool(_as_image(x, grid), tuple(out_grid)).reshape(B, C, -1).transpose(1, 2)


def unpool_tokens(grad: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """Gradient of ``adaptive_avg_pool_tokens`` w.r.t. its input, by PyTorch's own backward."""
    B, _, C = grad.shape
    like = grad.new_empty(()).expand(B, C, *grid)
    backward = torch.ops.aten._adaptive_avg_pool2d_backward if len(grid) == 2 else torch.ops.aten._adaptive_avg_pool3d_backward
    dx = backward(_as_image(grad, out_grid).contiguous(), like)
    return dx.reshape(B, C, -1).transpose(1, 2)


def pool_linear(x, w, b, grid, out_grid):
    return F.linear(adaptive_avg_pool_tokens(x, grid, out_grid), w, b)


def pool_mlp(x, w1, b1, w2, b2, grid, out_grid, activation="gelu"):
    """Linear2(act(Linear1(pool(x)))): the DeCo projector in eager PyTorch."""
    return F.linear(ACTIVATIONS[activation](F.linear(adaptive_avg_pool_tokens(x, grid, out_grid), w1, b1)), w2, b2)


def mlp_activation_backward(dy, w2, pre, activation):
    """(dy @ w2 * act'(pre), act(pre)), with act' from PyTorch's own autograd formula."""
    with torch.enable_grad():
        z = pre.detach().requires_grad_(True)
        a = ACTIVATIONS[activation](z)
        (dz,) = torch.autograd.grad(a, z, dy @ w2)
    return dz, a.detach()
