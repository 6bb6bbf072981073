"""How a launch shows itself to ``torch.compile``: through ``torch.library.wrap_triton`` while an op
body is being traced, straight to Triton otherwise.

The ops that run these kernels are ``torch.library.triton_op``s (``deco_ops._triton_op``): while
``torch.compile`` traces one on the Triton backend, its body runs on FakeTensors /
FunctionalTensors, and every launch must become a ``triton_kernel_wrapper`` node (kernel, grid,
arguments) that Inductor launches itself and CUDA graphs capture. An eager launch keeps Triton's own
path: ``wrap_triton``'s higher-order-op dispatch costs host time that eager calls must not pay.

Under Triton's interpreter (the CPU test suite) ``wrap_triton`` hands an interpreted kernel back
untouched: it lacks the JIT metadata a trace needs, and would then run on FakeTensors. The trace
gets a *twin* instead: a ``JITFunction`` of the same Python function whose ``@triton.jit`` helpers
are twins too, so PyTorch can read which tensors the kernel writes from its Triton IR (generated
for an sm_90 target: IR generation needs no GPU), and whose launches (the recorded graph, run on CPU
tensors) go through the interpreter. The CPU suite records the graph a GPU gets, and runs it.
"""

from __future__ import annotations

import contextlib
import types

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from . import _compiled_launch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tracing(args) -> bool:
    """Whether a launch with positional ``args`` happens inside a trace: its first tensor argument is
    not a plain ``torch.Tensor`` (all tensors of one launch are of one kind)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return type(a) not in _PLAIN
    return False


def launch(kernel, grid, args: tuple, kwargs: dict):
    """``kernel[grid](*args, **kwargs)`` as a graph node of the trace in progress."""
    with _analysis_context(kernel):
        return torch.library.wrap_triton(_twin(kernel))[grid](*args, **kwargs)


class _Traced:
    """``launcher``'s answer while tracing: indexed with a grid, launches as a graph node."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: launch(self.kernel, grid, args, kwargs)


def launcher(kernel, like: torch.Tensor):
    """What a launch site indexes with its grid: ``kernel`` itself in eager mode (or its launches
    through the compiled kernel, where switched on: ``_compiled_launch.direct``), a graph-node
    launcher when ``like`` (one of the launch's tensors) is being traced."""
    return _Traced(kernel) if tracing((like,)) else _compiled_launch.direct(kernel)


# ----------------------------------------------------------------------------------------------
# twins of interpreted kernels


class InterpretedJITFunction(JITFunction):
    """The ``JITFunction`` twin of an interpreted kernel or helper (module docstring)."""

    def __init__(self, interpreted: InterpretedFunction, fn):
        super().__init__(fn)
        self.interpreted = interpreted

    def run(self, *args, grid, warmup, **kwargs):
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


_twins: dict[int, object] = {}  # id(interpreted kernel, helper or autotuner) -> its twin


def _interpreted(kernel) -> InterpretedFunction | None:
    """The interpreted function behind ``kernel`` (a kernel or its autotuner), None when compiled."""
    base = kernel.fn if isinstance(kernel, Autotuner) else kernel
    return base if isinstance(base, InterpretedFunction) else None


def _twin(kernel):
    """``kernel`` as a trace can read it: itself when compiled, its twin when interpreted."""
    base = _interpreted(kernel)
    if base is None:
        return kernel
    twin = _twins.get(id(kernel))
    if twin is None:
        twin = _jit_twin(base)
        if isinstance(kernel, Autotuner):  # its one interpreter config, never pruned (as the interpreter runs it)
            twin = Autotuner(twin, twin.arg_names, kernel.configs, kernel.keys, reset_to_zero=None, restore_value=None)
        _twins[id(kernel)] = twin
    return twin


def _jit_twin(interpreted: InterpretedFunction) -> InterpretedJITFunction:
    """The twin of one interpreted function: its Python function re-bound to globals in which every
    interpreted helper (directly or in an imported kernel module) is a twin."""
    twin = _twins.get(id(interpreted))
    if twin is None:
        fn = interpreted.fn
        scope = dict(fn.__globals__)
        rebound = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
        rebound.__module__, rebound.__qualname__, rebound.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
        rebound.__annotations__, rebound.__kwdefaults__ = fn.__annotations__, fn.__kwdefaults__  # tl.constexpr marks
        twin = _twins[id(interpreted)] = InterpretedJITFunction(interpreted, rebound)
        for name, value in fn.__globals__.items():
            scope[name] = _twin_value(value)
    return twin


# Modules whose interpreted functions a kernel may call as ``module.function``: ours, and Triton's
# own ``@jit`` library (``tl.cdiv``, ``tl.max``, ...), which the interpreter decorates too.
_TWINNED_MODULES = (__package__ + ".", "triton.language")


def _twin_value(value):
    if isinstance(value, InterpretedFunction):
        return _jit_twin(value)
    if isinstance(value, types.ModuleType) and value.__name__.startswith(_TWINNED_MODULES):
        return _twin_module(value)
    return value


def _twin_module(module: types.ModuleType) -> types.ModuleType:
    twin = _twins.get(id(module))
    if twin is None:
        twin = _twins[id(module)] = types.ModuleType(module.__name__)
        for name, value in vars(module).items():
            setattr(twin, name, _twin_value(value))
    return twin


class _Sm90Target:
    """The driver PyTorch asks for a target while it reads a twin's IR (no driver under the interpreter)."""

    @staticmethod
    def get_current_target() -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


# ``triton.language`` as imported, before any interpreted launch: the interpreter patches these
# namespaces while it runs a kernel and leaves some patched (nested helper calls never restore),
# which would route IR generation through the interpreter's builder.
_LANGUAGE = (tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None), tl.core.dtype)
_PRISTINE = [(namespace, dict(vars(namespace))) for namespace in _LANGUAGE if namespace is not None]
_MISSING = object()


def _analysis_context(kernel) -> contextlib.AbstractContextManager:
    """What PyTorch needs to read an interpreted kernel's twin IR during one traced launch."""
    return contextlib.nullcontext() if _interpreted(kernel) is None else _ir_generation()


@contextlib.contextmanager
def _ir_generation():
    """Lends ``_Sm90Target`` as Triton's active driver and puts ``triton.language`` back as imported;
    both are left as they were afterwards."""
    driver = triton.runtime.driver
    previous_driver = driver._active
    changed = []
    for namespace, pristine in _PRISTINE:
        current = dict(vars(namespace))
        for name in pristine.keys() | current.keys():
            was, now = pristine.get(name, _MISSING), current.get(name, _MISSING)
            if was is not now:
                changed.append((namespace, name, now))
                _assign(namespace, name, was)
    driver.set_active(_Sm90Target())
    try:
        yield
    finally:
        driver._active = previous_driver
        for namespace, name, value in reversed(changed):
            _assign(namespace, name, value)


def _assign(namespace, name: str, value) -> None:
    if value is _MISSING:
        delattr(namespace, name)
    else:
        setattr(namespace, name, value)
