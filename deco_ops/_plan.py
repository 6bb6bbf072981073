"""Per-signature call plans: the host work of an op call that depends only on the call's
*signature* runs once per signature, not once per call (docs/host-path.md).

A public op (``pool_mlp``, ``cross_attention``, ...) validates its arguments, normalises the
geometry (grids as lists, the softmax scale), decides whether autograd needs the residuals, picks
its implementation (``deco_ops.strategy``: fused kernel or composed twin) and wraps it in its
autograd Function. All of that reads only the signature:

* each tensor's type, shape, dtype, device and ``requires_grad``, and whether its last dim's stride
  is 1 (a plan may call an ATen kernel that assumes it: SDPA's CPU kernel); not its values, not its
  other strides (no check and no choice reads them; the kernels read strides at every launch);
* the other arguments, by value *and type* (``(4, 4)`` and ``(4, 4.0)`` or ``True`` and ``1`` are
  equal in Python but not to validation);
* the global state: grad mode, deterministic mode (and its warn-only flag), the backend and
  strategy settings (their ``with`` blocks and environment variables, ``Setting.state``), whether
  Triton runs through its interpreter, whether torch.distributed's default process group is up.

``Plans`` remembers the result (a *plan*: a tuple the public function unpacks, or for an op that
autograd formulas call, ``deco.<name>`` registered with ``plan=``, the callable that runs it) per
signature. Changing any of
the above gives another signature, hence another plan. ``strategy.forget``/``preload`` drop every
plan (a plan holds a strategy decision). At most ``MAX_PLANS`` per op; the oldest is dropped first.

An op called again with one of the last two signatures that took the key (a model's every step)
does not build the key at all: ``Recent`` checks the arguments against each directly, the tensors
with dynamo's C++ ``TensorGuards`` (shape, dtype, device, ``requires_grad``, type and dispatch keys,
the last dim's stride), the rest by type and value, in a closure installed as ``Plans.get`` for the
last signature: about a third of the key's cost (docs/host-path.md).

Only *plain eager* calls use plans (``plain``: not compiling, no dispatch mode, no functorch
transform, no autocast region, no forward-mode AD level, no ``torch.jit.trace``, no lazily negated
or zero tensor, every tensor a plain ``torch.Tensor`` or
``nn.Parameter``; for a plan, every other argument None, a bool, int, float, str, a ``torch.dtype``
or a tuple/list of them); every other call takes the op's full path (validation, then ``torch.ops.deco``), which is
also what ``torch.compile`` traces.
A plan never holds a tensor. Checks that read tensor *values* (``kv_lens`` in range) are not part
of a plan: the ops run them on every call.
"""

from __future__ import annotations

import collections
import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat

import torch
from torch._C._dynamo.guards import TensorGuards

from . import _backend, strategy
from ._validate import AUTOCAST_DEVICE_TYPES
from ._validate import tracing_state as _tracing_state  # None outside ``torch.jit.trace``

MAX_PLANS = 256  # per op; a real model calls each op with a handful of signatures

_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter
_VALUES = (bool, int, float, str, torch.dtype)
_tensor_signature = operator.attrgetter("shape", "dtype", "device", "requires_grad", "layout")  # one C call for the five
# A strided nested tensor aborts the process inside ``TensorGuards.check`` (its strides throw a C++
# error there): the checks look for one first, inline (``True in map(...)`` profiles as no call).
_is_nested = operator.attrgetter("is_nested")
_is_compiling = torch.compiler.is_compiling
# What a check asks first: True only while dynamo traces it (dynamo answers the call), one call
# where ``is_compiling`` makes two. The other tracers (export's non-strict mode, AOT autograd) run
# the ops on FakeTensors under a dispatch mode: no check passes them (``_state``, the guards).
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
# A lazily negated view (``z.conj().imag``) holds -value in its memory, and a lazy zero tensor
# (``torch._efficientzerotensor``, which autograd may pass as a gradient) has none; the kernels read
# memory. The dispatcher's fallbacks for the negative bit and for zero tensors hand an op a resolved
# copy or real zeros, so such a call is not plain and has no plan (an output gradient reaches a
# backward op as one). C calls in ``map``.
_is_neg = operator.methodcaller("is_neg")
_is_zerotensor = operator.methodcaller("_is_zerotensor")
_dispatch_modes = torch._C._len_torch_dispatch_stack
_any_autocast = torch._C._is_any_autocast_enabled
_autocast_enabled = torch.is_autocast_enabled  # (device_type)
_grad_enabled = torch.is_grad_enabled
_deterministic = torch._C._get_deterministic_algorithms  # torch.are_deterministic_algorithms_enabled's answer
_warn_only = torch._C._get_deterministic_algorithms_warn_only  # ... and is_deterministic_algorithms_warn_only_enabled's
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_peek_functorch = getattr(torch._C._functorch, "peek_interpreter_stack", lambda: None)
_forward_ad = torch.autograd.forward_ad  # its _current_level: -1 outside ``dual_level()``

_all: list[Plans] = []  # every op's plans, for clear()

# The settings enter a signature as their state (``Setting.state``: the override and the
# environment variable as stored; read here as it reads them, without its frame and tuple);
# building a plan reads them checked (``selected``), so a bad value still raises there. Whether
# Triton interprets is read as ``_backend.interpreting`` reads it.
_backend_override, _backend_env, _backend_key = _backend.SETTING.overrides.get, _backend.SETTING.environ.get, _backend.SETTING.env_key
_strategy_override, _strategy_env, _strategy_key = strategy.SETTING.overrides.get, strategy.SETTING.environ.get, strategy.SETTING.env_key
_interpret_environ, _interpret_key = _backend.INTERPRET_ENTRY
_interpret_env = _interpret_environ.get


# Whether torch.distributed's default process group is up: a plan built before
# ``init_process_group`` holds a choice its rank made alone, which another rank may have made
# otherwise; so plans are per side of the start, and each key is decided again for the group
# (``strategy._agree``). Read as ``dist.is_initialized`` reads it, past
# its two property calls (a signature check runs on every op call).
try:
    _c10d = torch.distributed.distributed_c10d
    _c10d._world._default_pg
except AttributeError:  # torch built without distributed, or c10d's internals moved: the public call
    _c10d = None


def _process_group_up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _state() -> tuple:
    """The global state a signature starts with (module docstring), then what makes a call not
    plain (module docstring; ``_PLAIN`` in every signature): one tuple for ``Recent`` to compare."""
    return (_grad_enabled(), _deterministic(), _warn_only(), _backend_override(), _backend_env(_backend_key),
            _strategy_override(), _strategy_env(_strategy_key), _interpret_env(_interpret_key),
            _c10d._world._default_pg is not None if _c10d is not None else _process_group_up(),
            _dispatch_modes(), _any_autocast(), _peek_functorch(), _forward_ad._current_level, _tracing_state())


# no dispatch mode, no autocast, no functorch transform, no forward-mode AD level (dual tensors),
# no ``torch.jit.trace`` (it records the dispatcher's ops: a traced call goes through ``torch.ops.deco``)
_PLAIN = (0, False, None, -1, None)
_STATE_SIZE = len(_state())  # a signature's first entries
_SETTINGS_SIZE = _STATE_SIZE - len(_PLAIN)  # ... of which the settings, then what ``_PLAIN`` compares


def plain(args: tuple) -> bool:
    """Whether a call with ``args`` is plain eager (module docstring), compiling apart (its callers
    ask that first): the global state ``_PLAIN``, every tensor a plain ``torch.Tensor`` or
    ``nn.Parameter``. The one definition: ``signature`` admits such calls only, and ``_direct``
    runs the ones without a plan past the dispatcher by it."""
    if _state()[_SETTINGS_SIZE:] != _PLAIN:
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return (all(type(a) is _TENSOR or type(a) is _PARAMETER for a in tensors)
            and not (True in map(_is_neg, tensors) or True in map(_is_zerotensor, tensors)))


_AUTOCAST_ONLY = (0, True, None, -1, None)  # ``_PLAIN`` but for an autocast region


def plain_but_autocast(args: tuple) -> bool:
    """Whether a call with ``args`` would be plain eager (``plain``) outside the autocast region
    it runs in, one of a device type the ops have autocast rules for (CPU, CUDA):
    ``deco_ops._autocast`` casts its arguments and runs it as a plain call, with those switched off."""
    if _is_compiling() or _state()[_SETTINGS_SIZE:] != _AUTOCAST_ONLY:
        return False
    if not any(map(_autocast_enabled, AUTOCAST_DEVICE_TYPES)):
        return False
    return all(type(a) is _TENSOR or type(a) is _PARAMETER for a in args if isinstance(a, torch.Tensor))


def needs_residuals(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must keep what its backward reads (pooled input, pre-activation, the LSE):
    autograd records it (grad mode on, a tensor requires grad), or ``torch.jit.trace`` records it,
    whose graph must not depend on grad mode (its check replays the function under ``no_grad``;
    the traced module may be differentiated). A functorch-wrapped tensor (inside ``vmap``) reports
    ``requires_grad=False`` whatever the tensor under it does (stacked models' weights differentiated
    after ``vmap(functional_call)``): with grad mode on, its residuals are kept."""
    if _tracing_state() is not None:
        return True
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    # (dynamo cannot trace the wrapper test; a compiled graph holds no functorch wrappers)
    return not _is_compiling() and any(t is not None and _functorch_wrapped(t) for t in tensors)


def signature(args: tuple) -> tuple | None:
    """The key of a plain eager call with ``args`` (module docstring), None for any other call."""
    if _is_compiling():
        return None
    key = [*_state()]
    if tuple(key[_SETTINGS_SIZE:]) != _PLAIN:  # ``plain``'s test, on the state the key holds anyway
        return None
    for a in args:  # one entry per argument: its position says which argument it is
        kind = type(a)
        if kind is _TENSOR or kind is _PARAMETER:  # its type too: a Parameter's plan checks for a Parameter (``Recent``)
            if a.is_neg() or a._is_zerotensor():  # no plan and no plain call (``plain``): the dispatcher resolves them
                return None
            key += (kind, _tensor_signature(a), _unit_last_stride(a))
        elif a is None:
            key += (None,)
        elif kind in _VALUES:
            key += ((kind, a),)
        elif kind is tuple or kind is list:
            key += ((kind, tuple(a), tuple(map(type, a))),)
        else:
            return None
    return tuple(key)


def _unit_last_stride(t: torch.Tensor) -> bool:
    """Whether ``t``'s last dim has stride 1 (False for a 0-dim tensor)."""
    return t.stride()[-1:] == (1,)


def _picker(positions: Sequence[int]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in positions)`` in one C call where there are two or more."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


_MISS = object()  # ``Recent.test``'s answer for a call of another signature
_NO_STATE = (object(),)  # a global state that ``_state()`` never returns


def _missed(args: tuple, state: tuple) -> object:
    return _MISS


def _no_plan(*args) -> None:
    return None


class Recent:
    """One signature and its plan, with two checks of a call against it that build no key:
    ``get(*args)`` (``Plans.get`` while this is the last signature; any other call goes on to
    ``Plans._miss``) and ``test(*args)`` (``_MISS`` for any other call). Each checks the global
    state, the tensors' shape, dtype, device, ``requires_grad`` and last dim's stride (and,
    stricter than the key, their exact type and dispatch keys) through dynamo's C++
    ``TensorGuards``, which also fails a non-tensor where a tensor was; then the other arguments'
    types, the types of a sequence's items (``(4, 4) == (4, 4.0)``) and last their values, so no
    tensor meets ``==``. Holds no tensor (the guard keeps metadata only)."""

    __slots__ = ("plan", "get", "test")

    def __init__(self, args: tuple, state: list, plan: object, miss: Callable[[tuple, tuple], object]):
        self.plan = plan
        self.get, self.test = _checkers(args, tuple(state), plan, (miss, _missed))


def _checkers(args: tuple, state: tuple, plan: object, misses: tuple[Callable[[tuple, tuple], object], ...]) -> tuple[Callable[..., object], ...]:
    """Per ``otherwise`` in ``misses``, ``check(*call_args)``: ``plan`` for a plain call of
    ``args``' signature (``Recent``), else ``otherwise(call_args, the global state)``; None while compiling. A
    closure over what it compares: no attribute loads and no frame but its own (≈ 0.45 µs of a
    1.1 µs lookup for three tensors)."""
    types = tuple(map(type, args))
    tensors = [i for i, kind in enumerate(types) if kind is _TENSOR or kind is _PARAMETER]
    others = [i for i, kind in enumerate(types) if not (kind is _TENSOR or kind is _PARAMETER)]
    sequences = [i for i, kind in enumerate(types) if kind is tuple or kind is list]
    pick_tensors, pick_values = _picker(tensors), _picker(others) if others else None
    value_types = tuple(types[i] for i in others)
    values = tuple([*args[i]] if types[i] is list else args[i] for i in others)  # a copy of each list: the caller may change theirs
    pick_sequences = _picker(sequences) if sequences else None
    item_types = pick_sequences and _item_types(pick_sequences(args))
    picked = pick_tensors(args)
    shapes = [list(a.shape) for a in picked]
    strides = [[None] * (len(shape) - 1) + [a.stride(-1)] if shape else [] for a, shape in zip(picked, shapes)]
    check = TensorGuards(*picked, dynamic_dims_sizes=shapes, dynamic_dims_strides=strides).check

    def checker(otherwise: Callable[[tuple, tuple], object]) -> Callable[..., object]:
        def checked(*call):
            if _is_dynamo_compiling():  # first, before any state is read: a traced call takes the full path, never guards on it
                return None
            now = _state()
            tensors = pick_tensors(call)
            try:
                nested = True in map(_is_nested, tensors)
            except AttributeError:  # not a tensor where the signature had one: the guard fails it
                nested = False
            if now == state and not nested and check(*tensors):
                if pick_values is None:
                    return plan
                given = pick_values(call)
                if (tuple(map(type, given)) == value_types
                        and (pick_sequences is None or tuple(map(tuple, map(map, repeat(type), pick_sequences(call)))) == item_types)
                        and given == values):  # last: every item is a plain value by now
                    return plan
            return otherwise(call, now)

        return checked

    return tuple(map(checker, misses))


def _item_types(sequences: tuple) -> tuple:
    """The types of each sequence's items, as a check computes them inline (C calls only)."""
    return tuple(map(tuple, map(map, repeat(type), sequences)))


class Plans:
    """The plans of one op: ``plans.get(*args)`` returns ``build(*args)`` for a plain eager call,
    built (and so validated) once per signature of ``args``, and None for any other call (it
    takes the op's full path). ``build`` raises on bad arguments, and then nothing is remembered;
    it may return None for a signature that has no plan (the call then takes the full path).

    ``get`` is an instance attribute: the last signature's ``Recent.get``, which checks a call
    against that signature and hands any other to ``_miss`` (the signature before, then the key)."""

    def __init__(self, build: Callable[..., object]):
        self._build = build
        # insertion-ordered; ``popitem(last=False)`` drops the oldest in one call, where picking it by
        # ``next(iter(...))`` and then deleting it raised ``KeyError`` (another thread dropped it in
        # between) or "dictionary changed size during iteration" (another thread added one)
        self._plans: collections.OrderedDict[tuple, Recent] = collections.OrderedDict()
        self._recent: tuple[Recent, ...] = ()  # the last two signatures used, the last first

        # ``get`` while no signature is recent: a check that no state passes, so every call goes
        # to ``_miss``. The same code as every signature's check: ``torch.compile`` guards on
        # ``get.__code__``, and a compiled caller would recompile once an eager call installed one.
        self._first = _checkers((), _NO_STATE, None, (self._miss,))[0]
        self._install()
        _all.append(self)

    def _install(self) -> None:
        self.get = _no_plan if _unplanned else self._recent[0].get if self._recent else self._first

    def _miss(self, args: tuple, state: tuple) -> object:
        """A call of any signature but the last one's, or no plain call (the full path's: one
        test), in the global ``state``."""
        if state[_SETTINGS_SIZE:] != _PLAIN:  # ``signature``'s answer, sooner
            return None
        recents = self._recent
        if len(recents) > 1:
            plan = recents[1].test(*args)
            if plan is not _MISS:  # most recent first: alternating signatures check one each
                self._recent = (recents[1], recents[0])
                self._install()
                return plan
        try:
            key = signature(args)
            if key is None:
                return None
            recent = self._plans.get(key)
        except (TypeError, RuntimeError):  # an unhashable argument (a list inside a grid), a nested
            return None  # tensor's shape: the full path says what is wrong
        if recent is None:
            provisional = strategy.provisional
            try:
                plan = self._build(*args)
            except (TypeError, ValueError) as e:  # the arguments refused (``build`` validates them first)
                e.deco_refusal = True  # what ``_autocast.plain_call`` falls back on; nothing else
                raise
            if strategy.provisional != provisional:  # a choice made inside a CUDA graph capture, untimed:
                return plan  # not kept, so the first call after the capture measures
            recent = Recent(args, key[:_STATE_SIZE], plan, self._miss)
            self._plans[key] = recent
            if len(self._plans) > MAX_PLANS:  # one C call: threads building plans at once may both drop one
                with contextlib.suppress(KeyError):  # (another thread's ``clear`` emptied them meanwhile)
                    self._plans.popitem(last=False)
        recents = self._recent  # again: the build may have cleared the plans (a strategy decision changed)
        self._recent = (recent, recents[0]) if recents and recents[0] is not recent else (recent,)
        self._install()
        return recent.plan

    def clear(self) -> None:
        self._plans.clear()
        self._recent = ()
        self._install()


_unplanned = False  # ``unplanned()``: every Plans.get answers None


@contextlib.contextmanager
def unplanned() -> Iterator[None]:
    """Inside the block every call takes its op's full path, as if it had no plan (tests compare
    a planned call with the full path's)."""
    global _unplanned
    _unplanned = True
    try:
        for plans in _all:
            plans._install()
        yield
    finally:
        _unplanned = False
        for plans in _all:
            plans._install()


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
