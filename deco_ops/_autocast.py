"""How every ``torch.ops.deco.*`` op behaves inside ``torch.autocast``, on CPU and CUDA.

Two rules, declared once for every op:

* ``LOWER_PRECISION``: the ops built on GEMMs or attention run in the autocast dtype, the way
  ``nn.Linear`` and ``F.scaled_dot_product_attention`` do: floating inputs on the autocast device
  (float64 excepted, as autocast does) are cast to ``torch.get_autocast_dtype(device)``; index
  tensors (lengths, geometry tables, RNG seeds) and ``None`` pass through. The casts are ordinary
  differentiable ``Tensor.to`` calls, so an fp32 parameter gets an fp32 gradient.
* ``NORM_IN_FP32``: of the ops that normalise before their GEMMs (``merge_mlp``), the leading
  arguments that feed the norm (tokens, the norm's weight and bias) are cast to float32 instead,
  as autocast runs ``F.layer_norm`` in float32 and the Linears after it in its dtype (what the
  Hugging Face mergers compute under autocast: a norm in the autocast dtype would lose the
  tokens' low bits before their mean is taken, 10-25x their error at a mean of 30-100).
* ``OWN_DTYPE``: pooling (``F.adaptive_avg_pool2d`` has no autocast rule either) and the ops that
  only autograd formulas call (their inputs already carry the forward's dtypes) run in the dtype of
  their inputs. PyTorch's autocast runs ``F.interpolate`` in fp32 on CUDA and
  ``F.adaptive_avg_pool3d`` in fp32 on CPU; the pooling kernels accumulate in fp32 whatever their
  input dtype, and the PyTorch path does on the CPU (``reference.adaptive_avg_pool3d``), so they keep
  one rule on every device.

The public functions check dtypes as the op will see them (``_validate.dtype_under_autocast``,
``norm_dtype_under_autocast``): fp32 weights with bf16 tokens are accepted inside an autocast
region, refused outside it (``merge_mlp`` takes fp32 tokens and norm before a 16-bit MLP anywhere).

Either way the op body runs with autocast switched off for its device, so the PyTorch reference
path inside an op (``F.linear``, ``F.adaptive_avg_pool3d``) computes in the dtype the op's fake
implementation promises, and ``torch.compile`` under autocast gives the dtypes eager gives.

``torch.library.register_autocast`` is not used: it casts to one dtype fixed at registration,
while ``torch.autocast(device, dtype=...)`` chooses fp16 or bf16 per region.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch

from . import _plan
from ._direct import deco
from ._validate import AUTOCAST_DEVICE_TYPES, FLOAT_DTYPES, dtype_under_autocast, norm_dtype_under_autocast

LOWER_PRECISION = ("pool_linear", "pool_mlp", "pool_mlp_packed", "mlp_pool_packed", "cross_attention", "merge_mlp")
NORM_IN_FP32 = {"merge_mlp": 3}  # op -> how many leading arguments feed its norm (x, norm_weight, norm_bias)
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


def cast_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``_validate.dtype_under_autocast`` says where its dtype is one the ops take (fp16,
    bf16, fp32), else as it is: a float8 tensor, which the rule would cast, stays float8 for the
    public functions' checks to refuse as they do outside autocast (``plain_call`` casts before
    them); none reaches an op. Also what ``cross_attention``'s full path casts for its weights.
    ``Tensor.to`` by keyword: its positional overloads cost a third more to resolve."""
    if t.dtype not in FLOAT_DTYPES:
        return t
    dtype = dtype_under_autocast(t)
    return t if t.dtype is dtype else t.to(dtype=dtype)


def norm_cast_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``_validate.norm_dtype_under_autocast`` says (float32 inside autocast), for the
    arguments of ``NORM_IN_FP32``."""
    if t.dtype not in FLOAT_DTYPES:
        return t
    dtype = norm_dtype_under_autocast(t)
    return t if t.dtype is dtype else t.to(dtype=dtype)


def _cast(value):
    """Tensors (also inside lists) as ``_validate.dtype_under_autocast`` says: the one rule that
    the public functions' dtype checks apply too."""
    if isinstance(value, torch.Tensor):
        return cast_tensor(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v) for v in value)
    return value


def _cast_args(args: tuple, norm_args: int) -> tuple:
    """``args`` cast by the lower-precision rule, the first ``norm_args`` by the norm's."""
    return (*(norm_cast_tensor(a) if isinstance(a, torch.Tensor) else a for a in args[:norm_args]), *_cast(args[norm_args:]))


def _excluding(device_types: tuple[str, ...]) -> torch._C.DispatchKeySet:
    """The autocast dispatch keys of ``device_types`` (AutocastCPU, AutocastCUDA): excluded, their
    autocast is off (``torch.is_autocast_enabled`` reads that exclusion)."""
    keys = [torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, "Autocast" + t.upper())) for t in device_types]
    return functools.reduce(operator.or_, keys)


_EVERY_DEVICE = _excluding(AUTOCAST_DEVICE_TYPES)


def _cast_then(call, cast: bool, excluded: torch._C.DispatchKeySet, norm_args: int = 0):
    """``run(*args)``: ``call(*args)`` on arguments cast by the op's rule (``cast``: lower
    precision, the first ``norm_args`` to float32; else as they are), with autocast off for the
    devices of ``excluded``."""

    def run(*args):
        if cast:
            args = _cast_args(args, norm_args) if norm_args else _cast(args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return call(*args)

    return run


def _register(name: str, cast: bool) -> None:
    """The op's autocast rule twice: as the dispatcher's autocast kernel of each device type (for
    calls through ``torch.ops.deco``, its own device's autocast off), and as ``deco.<name>``'s
    ``under_autocast`` (a call that is plain but for autocast, ``deco_ops._direct``: every rule's
    device off, so the op called again is a plain call, not the dispatcher's)."""
    norm_args = NORM_IN_FP32.get(name, 0)
    for device_type in AUTOCAST_DEVICE_TYPES:
        run = _cast_then(getattr(torch.ops.deco, name).default, cast, _excluding((device_type,)), norm_args)
        _lib.impl(name, lambda _keyset, *args, run=run: run(*args), "Autocast" + device_type.upper(), with_keyset=True)
    op = getattr(deco, name)
    op.under_autocast = _cast_then(op, cast, _EVERY_DEVICE, norm_args)


def register() -> None:
    """Every op's autocast rule, once every op exists (``deco_ops/__init__.py``)."""
    for name in LOWER_PRECISION:
        _register(name, cast=True)
    for name in OWN_DTYPE:
        _register(name, cast=False)


NOT_PLAIN = object()  # ``plain_call``'s answer for a call it does not run


def plain_call(public: Callable, name: str, args: tuple, kwargs: dict | None = None, norm_args: int = 0):
    """``public(*args, **kwargs)``, the front of op ``name`` (its public function, or the helper
    that runs it), as a plain eager call where the call is plain but for autocast
    (``_plan.plain_but_autocast``): its tensors cast by the op's rule, then ``public`` called
    again with autocast off, where it takes its plan (checks, choice and bookkeeping made once per
    signature) instead of checking every call and crossing the dispatcher. ``NOT_PLAIN`` for any
    other call, and for one whose cast arguments its plan refuses to be built for: the caller then
    takes its full path, whose checks name the arguments as given (the refusal came from the
    checks, before any launch; an error of the call's run propagates as it is). A cast call that
    has no plan (a ``torch.Generator``, packed keys) takes its full path inside, autocast off.
    ``norm_args``: how many leading ``args`` feed the op's norm (``NORM_IN_FP32``)."""
    kwargs = kwargs or {}
    if not _plan.plain_but_autocast((*args, *kwargs.values())):
        return NOT_PLAIN
    if name in LOWER_PRECISION:  # a public function's tensors are its arguments (no list of them)
        if norm_args:  # ``_cast_args`` inline: one frame fewer per call
            args = (*(norm_cast_tensor(a) if isinstance(a, torch.Tensor) else a for a in args[:norm_args]),
                    *(cast_tensor(a) if isinstance(a, torch.Tensor) else a for a in args[norm_args:]))
        else:
            args = tuple(cast_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {key: cast_tensor(a) if isinstance(a, torch.Tensor) else a for key, a in kwargs.items()}
    with torch._C._ExcludeDispatchKeyGuard(_EVERY_DEVICE):
        try:
            return public(*args, **kwargs)
        except (TypeError, ValueError) as e:
            if getattr(e, "deco_refusal", False):
                return NOT_PLAIN
            raise
