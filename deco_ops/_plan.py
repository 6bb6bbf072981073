"""Per-signature call plans: the host work of an op call that depends only on the call's
*signature* runs once per signature, not once per call (docs/host-path.md).

A public op (``pool_mlp``, ``cross_attention``, ...) validates its arguments, normalises the
geometry (grids as lists, the softmax scale), decides whether autograd needs the residuals, picks
its implementation (``deco_ops.strategy``: fused kernel or composed twin) and wraps it in its
autograd Function. All of that reads only the signature:

* each tensor's type, shape, dtype, device and ``requires_grad`` (not its values, not its strides:
  no check and no choice reads them; the kernels read strides at every launch);
* the other arguments, by value *and type* (``(4, 4)`` and ``(4, 4.0)`` or ``True`` and ``1`` are
  equal in Python but not to validation);
* the global state: grad mode, deterministic mode (and its warn-only flag), the backend and
  strategy settings (their ``with`` blocks and environment variables, ``Setting.state``), whether
  Triton runs through its interpreter.

``Plans`` remembers the result (a *plan*: a tuple the public function unpacks, or for an op that
autograd formulas call, ``deco.<name>`` registered with ``plan=``, the callable that runs it) per
signature. Changing any of
the above gives another signature, hence another plan. ``strategy.forget``/``preload`` drop every
plan (a plan holds a strategy decision). At most ``MAX_PLANS`` per op; the oldest is dropped first.

Only *plain eager* calls use plans (``_direct``: not compiling, no dispatch mode, no functorch
transform, no autocast region, every tensor a plain ``torch.Tensor`` or ``nn.Parameter``, every
other argument None, a bool, int, float, str or a tuple/list of them); every other call takes the
op's full path (validation, then ``torch.ops.deco``), which is also what ``torch.compile`` traces.
A plan never holds a tensor. Checks that read tensor *values* (``kv_lens`` in range) are not part
of a plan: the ops run them on every call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch

from . import _backend, strategy

MAX_PLANS = 256  # per op; a real model calls each op with a handful of signatures

_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_VALUES = (bool, int, float, str)
_tensor_signature = operator.attrgetter("shape", "dtype", "device", "requires_grad")  # one C call for the four
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_any_autocast = torch._C._is_any_autocast_enabled
_grad_enabled = torch.is_grad_enabled
_deterministic = torch._C._get_deterministic_algorithms  # torch.are_deterministic_algorithms_enabled's answer
_warn_only = torch._C._get_deterministic_algorithms_warn_only  # ... and is_deterministic_algorithms_warn_only_enabled's
_peek_functorch = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)

_all: list[Plans] = []  # every op's plans, for clear()

# The settings enter a signature as their state (``Setting.state``: the override and the
# environment variable as stored; read here as it reads them, without its frame and tuple);
# building a plan reads them checked (``selected``), so a bad value still raises there. Whether
# Triton interprets is read as ``_backend.interpreting`` reads it.
_backend_override, _backend_env, _backend_key = _backend.SETTING.overrides.get, _backend.SETTING.environ.get, _backend.SETTING.env_key
_strategy_override, _strategy_env, _strategy_key = strategy.SETTING.overrides.get, strategy.SETTING.environ.get, strategy.SETTING.env_key
_interpret_environ, _interpret_key = _backend.INTERPRET_ENTRY
_interpret_env = _interpret_environ.get


def signature(args: tuple) -> tuple | None:
    """The key of a plain eager call with ``args`` (module docstring), None for any other call."""
    if _is_compiling() or _dispatch_modes() or _any_autocast() or _peek_functorch() is not None:
        return None
    key = [_grad_enabled(), _deterministic(), _warn_only(), _backend_override(), _backend_env(_backend_key),
           _strategy_override(), _strategy_env(_strategy_key), _interpret_env(_interpret_key)]
    for a in args:  # one entry per argument: its position says which argument it is
        kind = type(a)
        if kind is _TENSOR or kind is _PARAMETER:
            key += (_tensor_signature(a),)
        elif a is None:
            key += (None,)
        elif kind in _VALUES:
            key += ((kind, a),)
        elif kind is tuple or kind is list:
            key += ((kind, tuple(a), tuple(map(type, a))),)
        else:
            return None
    return tuple(key)


class Plans:
    """The plans of one op: ``plans.get(*args)`` returns ``build(*args)`` for a plain eager call,
    built (and so validated) once per signature of ``args``, and None for any other call (it
    takes the op's full path). ``build`` raises on bad arguments, and then nothing is remembered;
    it may return None for a signature that has no plan (the call then takes the full path)."""

    def __init__(self, build: Callable[..., object]):
        self._build = build
        self._plans: dict[tuple, object] = {}
        _all.append(self)

    def get(self, *args) -> object:
        try:
            key = signature(args)
            if key is None:
                return None
            return self._plans[key]
        except KeyError:
            pass
        except (TypeError, RuntimeError):  # an unhashable argument (a list inside a grid), a nested
            return None  # tensor's shape: the full path says what is wrong
        plan = self._plans[key] = self._build(*args)
        if len(self._plans) > MAX_PLANS:
            del self._plans[next(iter(self._plans))]
        return plan

    def clear(self) -> None:
        self._plans.clear()


def chosen(implementation: Callable[..., Callable], args: tuple) -> Callable:
    """The implementation that ``implementation(*args)`` chooses for a call with ``args``
    (``strategy.implementation``)."""
    with torch.no_grad():  # a strategy measurement runs the candidates as the op's body runs them: below autograd
        return implementation(*args)


def runner(op, implementation: Callable[..., Callable], args: tuple, records: bool) -> Callable:
    """What a plain eager call of ``op`` (a ``deco.<name>``) with ``args`` runs: the
    implementation that ``implementation(*args)`` chooses, wrapped in the op's autograd Function
    where autograd ``records`` the call."""
    return op.runner(chosen(implementation, args), records)


def clear() -> None:
    """Drop every op's plans (``strategy.forget``/``preload`` changed the decisions they hold)."""
    for plans in _all:
        plans.clear()
