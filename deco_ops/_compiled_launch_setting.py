"""``DECO_OPS_DIRECT_LAUNCH``: whether a Triton launch whose signature Triton has already resolved
goes straight to the compiled kernel's launcher (``kernels/_compiled_launch.py``,
docs/host-path.md) instead of through ``JITFunction.run`` and the autotuner.

``1`` switches it on, ``0`` off; ``auto`` (the default) is off: opt-in until a GPU run has
verified it (tests/test_compiled_launch.py's CUDA test compares every kernel's outputs bit for bit
with Triton's own launch). ``SETTING.use("1")`` switches it on inside a ``with`` block.
"""

from __future__ import annotations

from ._setting import Setting
from .kernels import _compiled_launch

ENV_VAR = "DECO_OPS_DIRECT_LAUNCH"
SETTING = Setting(ENV_VAR, ("auto", "0", "1"), "direct launch")


def enabled() -> bool:
    """Whether launches go through the compiled kernel now; ``auto`` is off until verified on a GPU."""
    return SETTING.selected() == "1"


_compiled_launch.enabled = enabled
