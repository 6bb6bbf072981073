"""Which implementation runs an op: compiled Triton, Triton's interpreter, or the PyTorch reference.

``DECO_OPS_BACKEND`` selects, per process (``deco_ops.use_backend`` overrides it per block):

* ``auto`` (default): CUDA tensors run the compiled Triton kernels, CPU tensors the PyTorch
  reference path.
* ``triton``: every op runs the Triton kernels. On a machine without a GPU this switches on
  Triton's interpreter (``TRITON_INTERPRET=1``) so the real kernels run on CPU tensors; that switch
  has to happen before triton decorates any kernel, which is why ``deco_ops/__init__.py`` imports
  this module before ``deco_ops.kernels``. It is never switched on in a process that has a GPU.
* ``torch``: the PyTorch reference path everywhere.

There is no silent fallback: if the selected backend cannot run an input, the op raises.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

ENV_VAR = "DECO_OPS_BACKEND"
BACKENDS = ("auto", "triton", "torch")


def _switch_on_interpreter() -> None:
    """Run Triton kernels through the interpreter when the triton backend is asked for on a CPU-only
    machine. Called once, at package import, before anything imports triton (``_setting`` does,
    through torch._dynamo)."""
    if os.environ.get(ENV_VAR, "auto").strip().lower() != "triton":
        return
    if torch.cuda.is_available():
        return
    if "triton" in sys.modules:  # its own jit functions (tl.sum, ...) are compiled-mode already: the
        return  # kernels would call them from the interpreter and fail inside; ``use_triton`` says why instead
    os.environ.setdefault("TRITON_INTERPRET", "1")


_switch_on_interpreter()

from ._setting import Setting, environ_entry  # noqa: E402  (after the switch)
from .kernels import _tuning  # noqa: E402  (after the switch: it reads TRITON_INTERPRET)

SETTING = Setting(ENV_VAR, BACKENDS, "backend")
INTERPRET_ENTRY = environ_entry("TRITON_INTERPRET")  # (mapping, key): ``TRITON_INTERPRET`` in one lookup


def selected() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``$DECO_OPS_BACKEND``."""
    return SETTING.selected()


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Force a backend (``"auto"``, ``"triton"`` or ``"torch"``) inside a ``with`` block (tests,
    A/B comparisons); the innermost block wins."""
    return SETTING.use(name)


def interpreting() -> bool:
    """Whether Triton kernels in this process run through the interpreter (``TRITON_INTERPRET``
    read as triton reads it, ``kernels._tuning.env_true``)."""
    environ, key = INTERPRET_ENTRY
    return _tuning.env_true(environ.get(key))


def use_triton(device: torch.device) -> bool:
    """True if an op on ``device`` must run the Triton kernels, False for the reference path.

    Raises if the selected backend cannot serve the device, instead of falling back.
    """
    backend = selected()
    if backend == "torch":
        return False
    if device.type == "cuda":
        return True
    if backend == "auto":
        return False
    if device.type == "cpu" and interpreting() and _tuning.INTERPRET:  # the kernels decorated as interpreted at import, too
        return True
    if device.type == "cpu":
        raise RuntimeError(
            "DECO_OPS_BACKEND=triton on CPU tensors needs Triton's interpreter, which deco_ops switches "
            "on only when DECO_OPS_BACKEND=triton is set before `import deco_ops` and before anything "
            "imports triton (transformers, torch._dynamo, torch._inductor and torch.utils.checkpoint do), in a process without a GPU; or set "
            "TRITON_INTERPRET=1 before triton is imported (set after `import deco_ops`, it comes too late: the kernels were decorated "
            "compiled). Move the tensors to CUDA or use the 'torch' backend."
        )
    raise RuntimeError(f"the triton backend has no kernels for device {device}")
