"""Launching a Triton kernel straight through its compiled kernel, once Triton has resolved that
kernel for the launch's signature (issue 20's "launch plan per signature", docs/host-path.md).

A launch through ``JITFunction.run`` (and ``Autotuner.run`` above it) costs about 28 us of host time
on the H200: it binds the arguments by name, specialises every argument, formats the options into a
cache key, reads knobs, looks up the device and stream, builds the launch metadata, and only then
calls the compiled kernel's launcher. Triton 3.6 and 3.9 both end ``JITFunction.run`` with

    kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
               launch_metadata, launch_enter_hook, launch_exit_hook, *bound_args.values())

(``bound_args``: every parameter of the kernel in declaration order, constexprs and defaults
included; the launcher's C code skips the constexprs). Everything before that call depends only on
the launch's *signature*. ``CompiledLaunch`` lets the first launch of a signature take Triton's own
path, keeps the compiled kernel it returned together with the config the autotuner chose, and makes
every later launch of that signature the one call above.

The signature (``signature``) is at least as fine as what decides Triton's compiled kernel:

* the current device (Triton keeps its compiled kernels per device);
* each positional argument's type and, for a plain tensor, its dtype and whether its address is a
  multiple of 16 (Triton's pointer specialisation), for anything else its value (Triton specialises
  integers on "equals 1", "divisible by 16" and their range; a value determines all three);
* the keyword arguments (constexprs only) by name, value and type.

Two launches of one kernel with equal signatures therefore get Triton's same specialisation and the
same autotuner key (the key arguments' values, every tensor's dtype), hence the same config and
compiled kernel. The type is part of the key because ``1``, ``1.0`` and ``True`` are equal and hash
alike in Python while Triton compiles them as i32, fp32 and i1.

The normal launch runs instead whenever the direct one could differ from it (``_fallback_reason``
for what makes a signature keep Triton's path, checked when it is first seen; ``run`` for what
is checked on every call): a new signature; an argument of another type (a tensor subclass, a
tensor descriptor, a string), an unhashable one or a keyword argument that is not a constexpr;
``warmup``; a launch hook installed (a profiler such as proton: its hooks get the launch metadata
only Triton's path builds); a pre-run hook on the kernel, a config ``pre_hook``, triton 3.9's
``add_stages_inspection_hook`` (it adds to the specialisation); a normal launch that returned
anything but a ``CompiledKernel`` (3.6's asynchronous compilation returns a future until it is done).

What it does not re-read after a signature's first launch (Triton's path re-reads them on every
launch): the compile-option knobs (``TRITON_DEBUG``, the instrumentation mode; 3.9's fpsan casts),
the values of the globals a kernel reads (Triton raises if they changed; ours are module
constants), and the autotuner's cache in place (Triton never changes a key's config once chosen;
``clear()`` after emptying it). A cache *replaced* by another dict (``test_every_config.only``
forcing a config) is seen: the signature is resolved again.

Versions: the launcher is called with the same positional arguments in 3.6 (``CudaLauncher.
__call__(gridX, gridY, gridZ, stream, function, *args)``) and 3.9 (every argument named), checked
by tests/test_compiled_launch.py against what each version's ``JITFunction.run`` passes.

Switched on by the torch side (``deco_ops._compiled_launch_setting`` installs ``enabled``); off by default
until a GPU run has compared it with the normal launch. Never used under Triton's interpreter (its
kernels are not ``JITFunction``s) nor while ``torch.compile`` traces an op body (``_traceable``
routes those launches first). Inside a CUDA graph capture it is used: it records the same launcher
call that Triton's path would, on the same stream, and a signature first seen during the capture
takes Triton's path (whose autotuner then launches its preset config untimed, ``_tuning``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import operator
import weakref
from collections.abc import Callable

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

MAX_SIGNATURES = 64  # per kernel; a model launches each kernel with a handful of signatures

# installed by deco_ops._compiled_launch_setting: whether launches go through the compiled kernel now
enabled: Callable[[], bool] = lambda: False  # noqa: E731

_PLAIN_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_KNOWN = _PLAIN_TENSORS | {int, float, bool, type(None)}  # the argument types a signature can hold
_all: weakref.WeakSet[CompiledLaunch] = weakref.WeakSet()  # for clear()
_data_ptr = torch.Tensor.data_ptr
_dtype = operator.attrgetter("dtype")


def _picker(positions: list[int]) -> Callable[[tuple], tuple]:
    """``args -> tuple(args[i] for i in positions)``, in C where there are two or more."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return (lambda args: (args[positions[0]],)) if positions else (lambda args: ())


@functools.lru_cache(maxsize=1024)
def _layout(types: tuple) -> tuple[Callable, Callable] | None:
    """For launches whose positional arguments have ``types``: (the tensors' picker, the other
    arguments' picker); None where an argument is of a type no signature holds (a tensor subclass,
    a descriptor, a string, a list)."""
    if not _KNOWN.issuperset(types):
        return None
    tensors = [i for i, kind in enumerate(types) if kind in _PLAIN_TENSORS]
    return _picker(tensors), _picker([i for i in range(len(types)) if i not in tensors])


def signature(device: int, args: tuple, kwargs: dict) -> tuple | None:
    """The key a launch's compiled kernel is kept under (module docstring), None for a launch with
    an argument of another type. Built with C-level calls (no Python loop over the arguments): the
    alignment of every tensor is one bit when all are 16-byte aligned (the common case), else one
    per tensor."""
    types = tuple(map(type, args))
    layout = _layout(types)
    if layout is None:
        return None
    tensors = layout[0](args)
    pointers = tuple(map(_data_ptr, tensors))
    aligned = not functools.reduce(operator.or_, pointers, 0) % 16 or tuple([p % 16 == 0 for p in pointers])
    return (device, types, layout[1](args), tuple(map(_dtype, tensors)), aligned,
            tuple(kwargs.items()), tuple(map(type, kwargs.values())))


def _hook_idle(hook) -> bool:
    """Whether a launch hook slot calls nothing: None, or an empty ``HookChain`` (3.6 and 3.9)."""
    return hook is None or not getattr(hook, "calls", True)


def hooks_idle() -> bool:
    """No launch hook installed: the launcher may be given None for the hooks and their metadata,
    as Triton's path gives an empty chain that calls nothing."""
    runtime = knobs.runtime
    return _hook_idle(runtime.launch_enter_hook) and _hook_idle(runtime.launch_exit_hook)


class _Signature:
    """What one signature's launches need: the launcher, its fixed arguments, and the trailing
    parameters (after the positional ones) in declaration order."""

    __slots__ = ("compiled", "launcher", "function", "packed_metadata", "tail", "meta", "tuning")

    def __init__(self, compiled: CompiledKernel, tail: dict, tuning: dict | None):
        self.compiled = compiled
        self.tuning = tuning  # the autotuner's cache the config came from (None: no autotuner)
        self.launcher = compiled.run  # the driver's launcher (the first launch loaded the module)
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.tail = tuple(tail.values())
        self.meta = tail  # with the positional arguments: what a callable grid reads (Triton's bound_args)


class CompiledLaunch:
    """The direct launches of one ``JITFunction`` (``tuned``: the autotuner above it, if any);
    ``normal`` is the launch through Triton (``JITFunction.run`` or ``Autotuner.run``)."""

    def __init__(self, jit: JITFunction, normal: Callable, tuned: Autotuner | None = None):
        self.jit = jit
        self.normal = normal
        self.tuned = tuned
        self.names = tuple(jit.arg_names)
        self.constexprs = frozenset(jit.arg_names[i] for i in jit.constexprs)
        self.signatures: collections.OrderedDict[tuple, _Signature | None] = collections.OrderedDict()  # oldest first
        _all.add(self)

    def __getitem__(self, grid):
        return lambda *args, warmup=False, **kwargs: self.run(grid, args, kwargs, warmup)

    def run(self, grid, args: tuple, kwargs: dict, warmup: bool = False):
        """``kernel[grid](*args, **kwargs)``: through the compiled kernel kept for the signature,
        else through Triton (which then resolves the signature's compiled kernel)."""
        if warmup or not kwargs.keys() <= self.constexprs or not hooks_idle():
            return self.normal(*args, grid=grid, warmup=warmup, **kwargs)
        active = driver.active
        device = active.get_current_device()
        key = signature(device, args, kwargs)  # None: an argument of another type, nothing kept
        try:
            kept = None if key is None else self.signatures[key]
        except KeyError:
            return self._first(key, grid, args, kwargs)
        except TypeError:  # an unhashable keyword argument
            kept = None
        if kept is None:  # Triton's path (``_fallback_reason`` says why where a signature was kept as None)
            return self.normal(*args, grid=grid, warmup=False, **kwargs)
        if kept.tuning is not (None if self.tuned is None else self.tuned.cache):
            return self._first(key, grid, args, kwargs)  # the autotuner's cache was replaced: choose again
        if callable(grid):
            grid = grid(dict(zip(self.names, args), **kept.meta))
        size = len(grid)
        kept.launcher(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1,
                      active.get_current_stream(device), kept.function, kept.packed_metadata, None, None, None,
                      *args, *kept.tail)
        return kept.compiled

    def _first(self, key: tuple, grid, args: tuple, kwargs: dict):
        """A signature's first launch: Triton's own; then keep what it resolved, or None where the
        signature keeps Triton's path."""
        compiled = self.normal(*args, grid=grid, warmup=False, **kwargs)
        if not isinstance(compiled, CompiledKernel):  # 3.6 compiling asynchronously: a future, resolved next time
            return compiled
        reason = self._fallback_reason(args, kwargs)
        tuning = None if self.tuned is None else self.tuned.cache
        self.signatures[key] = None if reason else _Signature(compiled, self._tail(args, kwargs), tuning)
        if len(self.signatures) > MAX_SIGNATURES:  # one C call, as _plan.Plans drops its oldest plan:
            with contextlib.suppress(KeyError):  # threads launching new signatures at once may both drop one
                self.signatures.popitem(last=False)
        return compiled

    def _fallback_reason(self, args: tuple, kwargs: dict) -> str:
        """Why launches of this signature must keep Triton's path ("" when they need not)."""
        if self.jit.pre_run_hooks:
            return "the kernel has pre-run hooks"
        if getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None:
            return "a compiler stages hook (3.9) is part of Triton's key"
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in self.jit.signature.parameters.values()):
            return "the kernel takes *args"
        if self.tuned is not None:
            named = {**dict(zip(self.names, args)), **kwargs}
            if any(isinstance(named.get(k), torch.Tensor) for k in self.tuned.keys):
                return "a tensor in the autotuner's key (keyed by identity, not in the signature)"
            config = self._config(args, kwargs)
            if config is None:
                return "the autotuner cached no config for the key"
            if config.pre_hook is not None:
                return "the config has a pre_hook"
        return ""

    def _config(self, args: tuple, kwargs: dict):
        """The config the autotuner launches for these arguments, as ``Autotuner.run`` picks it:
        its only one, else the one cached under the launch's key (not ``best_config``, the last
        launch's, which another thread may have set since)."""
        if len(self.tuned.configs) == 1:
            return self.tuned.configs[0]
        return self.tuned.cache.get(self.tuned.triton_key({**dict(zip(self.names, args)), **kwargs}))

    def _tail(self, args: tuple, kwargs: dict) -> dict:
        """The parameters after the positional ones, by name, in declaration order, as Triton binds
        them: keyword arguments, then the autotuner config's, then the defaults."""
        config = self._config(args, kwargs).kwargs if self.tuned is not None else {}
        parameters = self.jit.signature.parameters
        tail = {}
        for name in self.names[len(args):]:
            if name in kwargs:
                tail[name] = kwargs[name]
            elif name in config:
                tail[name] = config[name]
            else:
                tail[name] = parameters[name].default
        return tail

    def clear(self) -> None:
        self.signatures.clear()


_ATTRIBUTE = "deco_ops_direct_launches"  # a JITFunction's CompiledLaunch, kept on the kernel itself


def direct(kernel):
    """What an eager launch site indexes with its grid: ``kernel``'s direct launches where they are
    switched on and ``kernel`` is a compiled ``JITFunction``, else ``kernel`` itself."""
    if type(kernel) is not JITFunction or not enabled():
        return kernel
    launches = kernel.__dict__.get(_ATTRIBUTE)
    if launches is None:
        launches = CompiledLaunch(kernel, kernel.run)
        setattr(kernel, _ATTRIBUTE, launches)
    return launches


def clear() -> None:
    """Forget every kept signature: the next launch of each goes through Triton again."""
    for launches in _all:
        launches.clear()
