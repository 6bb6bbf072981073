"""Instruments for the hot-path tests: what an op launches and whether it synchronises.

* ``Launches``: patches the launch entry point of Triton's interpreter (``InterpretedFunction.run``,
  which the autotuner calls once per launch) and of compiled Triton (``JITFunction.run``, the same on
  a GPU, where direct launches are off by default) to count every Triton kernel launch by name,
  record its resolved grid and the device guard it ran under; with ``execute=False`` it only
  records (grid-limit checks at sizes the interpreter could not run).
* ``TorchOps``: a ``TorchDispatchMode`` counting the aten ops that launch device work (views,
  allocations and ``detach`` excluded), including those inside deco_ops' custom ops (their Python
  implementations are re-entered under the mode) but not the interpreter's own bookkeeping while a
  Triton kernel runs.
* ``HostSyncs``: the same mode, recording every op that reads device values on the host:
  ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``), ``aten.nonzero``,
  ``aten.equal``, and ``Tensor.tolist()`` (which bypasses the dispatcher).
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from deco_ops.kernels import _device

# Ops that allocate or re-view memory without a kernel of their own.
NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh"}
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal"}

GRID_AXIS_LIMITS = (2**31 - 1, 65535, 65535)


class Launches:
    """Context manager: ``counts`` (kernel name -> launches), ``grids`` [(name, grid)] and
    ``unguarded`` (launches that did not run under ``device_guard`` of a tensor on their device)."""

    def __init__(self, execute: bool = True):
        self.execute = execute
        self.counts: collections.Counter = collections.Counter()
        self.grids: list[tuple[str, tuple[int, ...]]] = []
        self.unguarded: list[str] = []
        self.running = False
        self._guarded: list[torch.device] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        real_runs = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}
        real_guard, launches = _device.device_guard, self

        def run(fn, *args, grid, warmup, **kwargs):
            real_run = real_runs[InterpretedFunction if isinstance(fn, InterpretedFunction) else JITFunction]
            if warmup:
                return real_run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            name = fn.fn.__name__
            meta = {**dict(zip(fn.arg_names, args)), **kwargs}
            resolved = tuple(grid(meta) if callable(grid) else grid)
            launches.counts[name] += 1
            launches.grids.append((name, resolved + (1,) * (3 - len(resolved))))
            devices = {a.device for a in args if isinstance(a, torch.Tensor)}
            if not launches._guarded or devices - {launches._guarded[-1]}:
                launches.unguarded.append(name)
            if not launches.execute:
                return None
            launches.running = True
            try:
                return real_run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                launches.running = False

        @contextlib.contextmanager
        def guard(t):
            launches._guarded.append(t.device)
            try:
                with real_guard(t):
                    yield
            finally:
                launches._guarded.pop()

        for cls in real_runs:
            self._stack.enter_context(_patched(cls, "run", run))
        self._stack.enter_context(_patched(_device, "device_guard", guard))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def total(self) -> int:
        return sum(self.counts.values())

    def grid_violations(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(n, g) for n, g in self.grids if any(a > lim for a, lim in zip(g, GRID_AXIS_LIMITS))]


class TorchOps(TorchDispatchMode):
    """Counts aten ops that do device work (``ops``) and host syncs (``syncs``), outside Triton
    launches (``launches``: the ``Launches`` instrument active at the same time, or None)."""

    def __init__(self, launches: Launches | None = None):
        super().__init__()
        self.launches = launches
        self.ops: collections.Counter = collections.Counter()
        self.syncs: list[str] = []
        self._tolist = None

    def __enter__(self):
        real_tolist, mode = torch.Tensor.tolist, self

        def tolist(t):
            if not (mode.launches and mode.launches.running):
                mode.syncs.append("Tensor.tolist")
            return real_tolist(t)

        self._tolist = _patched(torch.Tensor, "tolist", tolist)
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("deco::"):
            # Run the custom op's implementation under this mode so its own aten ops count too.
            with self, torch.no_grad():
                return OPDEFS[name]._init_fn(*args, **kwargs)
        if not (self.launches and self.launches.running):
            packet = func.overloadpacket.__name__
            if packet in SYNC_OPS:
                self.syncs.append(str(func))
            elif not func.is_view and packet not in NO_KERNEL:
                self.ops[packet] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(self.ops.values())


@contextlib.contextmanager
def _patched(owner, name, value):
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


def count(fn) -> tuple[Launches, TorchOps]:
    """Runs ``fn()`` under both instruments; returns them."""
    with Launches() as launches, TorchOps(launches) as ops:
        fn()
    return launches, ops
