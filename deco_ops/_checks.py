"""Whether validation may read tensor *values* (``kv_lens`` in range, ``cu_seqlens_k`` monotone,
a padding mask that is right padding).

Reading a CUDA tensor's values on the host blocks until the GPU has caught up with the stream, so
on CUDA such checks are off by default: the hot path never synchronises. The kernels clamp what
they read to the tensors' bounds, so an unchecked bad value gives a wrong answer, never an
out-of-bounds access. On the CPU a value read costs nothing, so the checks are on by default.

``DECO_OPS_CHECKS=1`` turns them on everywhere (debugging), ``DECO_OPS_CHECKS=0`` off everywhere.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "DECO_OPS_CHECKS"


def value_checks(device: torch.device) -> bool:
    """Whether checks that read tensor values on the host run for tensors on ``device``."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {setting!r}")
    if setting:
        return setting == "1"
    return device.type != "cuda"
