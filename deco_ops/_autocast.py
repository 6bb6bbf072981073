"""How every ``torch.ops.deco.*`` op behaves inside ``torch.autocast``, on CPU and CUDA.

Two rules, declared once for every op:

* ``LOWER_PRECISION``: the ops built on GEMMs or attention run in the autocast dtype, the way
  ``nn.Linear`` and ``F.scaled_dot_product_attention`` do: floating inputs on the autocast device
  (float64 excepted, as autocast does) are cast to ``torch.get_autocast_dtype(device)``; index
  tensors (lengths, geometry tables, RNG seeds) and ``None`` pass through. The casts are ordinary
  differentiable ``Tensor.to`` calls, so an fp32 parameter gets an fp32 gradient.
* ``OWN_DTYPE``: pooling (``F.adaptive_avg_pool2d`` has no autocast rule either) and the ops that
  only autograd formulas call (their inputs already carry the forward's dtypes) run in the dtype of
  their inputs. PyTorch's autocast runs ``F.interpolate`` in fp32 on CUDA and
  ``F.adaptive_avg_pool3d`` in fp32 on CPU; the pooling kernels accumulate in fp32 whatever their
  input dtype, so they keep one rule on every device.

The public functions check dtypes as the op will see them (``_validate.dtype_under_autocast``):
fp32 weights with bf16 tokens are accepted inside an autocast region, refused outside it.

Either way the op body runs with autocast switched off for its device, so the PyTorch reference
path inside an op (``F.linear``, ``F.adaptive_avg_pool3d``) computes in the dtype the op's fake
implementation promises, and ``torch.compile`` under autocast gives the dtypes eager gives.

``torch.library.register_autocast`` is not used: it casts to one dtype fixed at registration,
while ``torch.autocast(device, dtype=...)`` chooses fp16 or bf16 per region.
"""

from __future__ import annotations

import torch

from ._validate import AUTOCAST_DEVICE_TYPES, dtype_under_autocast

LOWER_PRECISION = ("pool_linear", "pool_mlp", "pool_mlp_packed", "mlp_pool_packed", "cross_attention", "merge_mlp")
OWN_DTYPE = (
    "adaptive_avg_pool_tokens",
    "unpool_tokens",
    "pool_tokens_packed",
    "unpool_tokens_packed",
    "mlp_activation_backward",
    "mlp_pool_act_backward",
    "cross_attention_backward",
    "cross_attention_weights",  # q, k and the fp32 LSE as given: an fp16 LSE would cost the weights 3 digits
    "cross_attention_weights_backward",
    "merge_norm_backward",
)

_lib = torch.library.Library("deco", "FRAGMENT")


def _cast(value):
    """Tensors (also inside lists) as ``_validate.dtype_under_autocast`` says: the one rule that
    the public functions' dtype checks apply too."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype_under_autocast(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v) for v in value)
    return value


def _register(name: str, device_type: str, cast: bool) -> None:
    key = "Autocast" + device_type.upper()  # AutocastCPU, AutocastCUDA
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = getattr(torch.ops.deco, name).default

    def kernel(_keyset, *args):
        if cast:
            args = _cast(args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    _lib.impl(name, kernel, key, with_keyset=True)


for _device_type in AUTOCAST_DEVICE_TYPES:
    for _name in LOWER_PRECISION:
        _register(_name, _device_type, cast=True)
    for _name in OWN_DTYPE:
        _register(_name, _device_type, cast=False)
