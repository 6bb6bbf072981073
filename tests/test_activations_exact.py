"""The activations of kernels/activations.py, value and derivative, against float64 PyTorch at a
few fp32 ulps, through a tiny elementwise kernel of this test's own.

Through a GEMM, the fp32 tolerance of 1e-4 hides a wrong constant: tanh-GELU's 0.044715 written
as 0.0447 moves the activation by ~3e-6 relative and every projector test still passes (issue 14).
Here each fp32 result is compared with the float64 value of the same function at the same fp32
input, so an error of a few ulps is all the room there is.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deco_ops import _backend, reference
from deco_ops.kernels import activations

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or _backend.interpreting()), reason="needs a GPU or Triton's interpreter"
)

# float64 references, by the kernels' activation names. A new activation in activations.CODES
# fails test_every_activation_has_a_reference until it gets one here.
REFERENCES = {
    "identity": lambda z: z,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
}

BLOCK = 1024


@triton.jit
def _activation_kernel(z_ptr, act_ptr, grad_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
    tl.store(act_ptr + offsets, activations.apply(z, ACTIVATION), mask=mask)
    tl.store(grad_ptr + offsets, activations.derivative(z, ACTIVATION), mask=mask)


def _inputs(device) -> torch.Tensor:
    """fp32 points: a dense sweep of [-10, 10] (the tails, the roots of act' near -0.75, 0) and
    random normals (where pre-activations live)."""
    sweep = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64)
    normal = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    return torch.cat([sweep, normal]).to(torch.float32).to(device)


def _kernel_values(z: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    act, grad = torch.empty_like(z), torch.empty_like(z)
    _activation_kernel[(triton.cdiv(z.numel(), BLOCK),)](z, act, grad, z.numel(), ACTIVATION=activations.CODES[name], BLOCK=BLOCK)
    return act.cpu().double(), grad.cpu().double()


def _reference(z: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    z64 = z.cpu().double().requires_grad_(True)
    value = REFERENCES[name](z64)
    (grad,) = torch.autograd.grad(value.sum(), z64)
    return value.detach(), grad


def _ulps(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of fp32's spacing at ``scale`` (at least the smallest normal's)."""
    spacing = torch.clamp(scale.abs(), min=torch.finfo(torch.float32).tiny) * torch.finfo(torch.float32).eps
    return (got - want).abs() / spacing


def test_every_activation_has_a_reference():
    assert set(activations.CODES) == set(REFERENCES), "add a float64 reference for each new activation"


# The bound, in ulps of max(|result|, |z| / 16): fp32 evaluation of these formulas rounds several
# times (erf, exp, the sigmoid-based tanh), and where the result cancels towards 0 (GELU's left
# tail, act' at its roots) the error is bounded by the size of the terms, ~|z|, not of the result.
# Measured worst cases: 3.5 ulps for the values, 16.3 for tanh-GELU' near z = 5 (its 1 - tanh^2
# cancels). 0.0447 for 0.044715 is off by up to 683 ulps.
MAX_ULPS = 24


@pytest.mark.parametrize("name", sorted(activations.CODES))
def test_activation_and_derivative_at_fp32_ulps(name, device):
    z = _inputs(device)
    act, grad = _kernel_values(z, name)
    want_act, want_grad = _reference(z, name)
    floor = z.cpu().double().abs() / 16
    act_ulps = _ulps(act, want_act, torch.maximum(want_act.abs(), floor))
    grad_ulps = _ulps(grad, want_grad, torch.maximum(want_grad.abs(), floor))
    worst_act, worst_grad = int(act_ulps.argmax()), int(grad_ulps.argmax())
    assert act_ulps.max() <= MAX_ULPS, f"{name}({z[worst_act].item()}): {act_ulps.max():.1f} ulps"
    assert grad_ulps.max() <= MAX_ULPS, f"{name}'({z[worst_grad].item()}): {grad_ulps.max():.1f} ulps"


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_reference_derivatives_stay_differentiable(name):
    """The references' act' is differentiable where autograd records it: ``_gelu_grad`` runs its
    in-place steps (memory: docs/memory.md) only where nothing is recorded, since they change the
    output exp's backward reads."""
    z = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    assert torch.autograd.gradcheck(reference.ACTIVATION_GRADS[name], (z,))
