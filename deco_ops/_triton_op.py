"""Every deco op is a ``torch.library.triton_op``: ``torch.compile`` sees through it to its kernels.

AOTAutograd traces a ``triton_op``'s body instead of keeping one opaque node: each launch becomes a
``triton_kernel_wrapper_functional`` node holding the kernel, its grid and arguments
(``kernels/_traceable.py``), so Inductor launches the kernels itself, next to the torch ops around
them, and ``torch.compile(mode="reduce-overhead")`` captures them in its CUDA graph. The eager path
is untouched (``deco_ops._direct``: launches go straight to Triton).

Where the body is traced:

* CUDA tensors on the Triton backend: always.
* CPU tensors under Triton's interpreter (the test suite): only inside ``trace_interpreted_kernels()``.
  No compiler backend can launch Triton kernels on CPU tensors except by running the traced graph in
  Python (``aot_eager``, a backend that records the graph); Inductor's CPU code cannot, so by
  default the op stays one opaque node there, as a ``custom_op``.
* The PyTorch backend: never. The op stays one opaque node with its registered fake: the reference
  paths read index tables on the host (packed pooling), which no trace can do, and Inductor
  compiles the op's eager code as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from . import _backend

_trace_interpreted = False


@contextlib.contextmanager
def trace_interpreted_kernels() -> Iterator[None]:
    """Inside the block, ``torch.compile`` traces through the ops on CPU tensors under Triton's
    interpreter too (module docstring): for ``aot_eager`` or a graph-recording backend."""
    global _trace_interpreted
    previous, _trace_interpreted = _trace_interpreted, True
    try:
        yield
    finally:
        _trace_interpreted = previous


def traced(device: torch.device) -> bool:
    """Whether a trace goes through an op body on ``device`` (module docstring)."""
    return _backend.use_triton(device) and (device.type != "cpu" or _trace_interpreted)


def triton_op(name: str, fn: Callable):
    """``torch.library.triton_op(name, fn, mutates_args=())``, its body traced only where ``traced``
    says: the rule ``triton_op`` installs for ``FunctionalTensorMode`` (AOTAutograd's tracing mode)
    is kept for those calls; the others dispatch as a ``custom_op`` does."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    opdef = torch.library.triton_op(name, fn, mutates_args=())
    trace_body = opdef._torch_dispatch_fns[FunctionalTensorMode]

    def rule(mode, op, types, args, kwargs):
        if traced(next(a.device for a in args if isinstance(a, torch.Tensor))):
            return trace_body(mode, op, types, args, kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    opdef.register_torch_dispatch(FunctionalTensorMode, rule)
    return opdef
