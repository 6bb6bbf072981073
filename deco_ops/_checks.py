"""Whether checks may read tensor *values* on the host. One does: the attention modules' warning
about a bool ``key_padding_mask`` row that ignores every key (a Hugging Face keep-mask passed
uninverted). Nothing else needs to: ``kv_lens`` values are never read (every path clamps them into
``[0, N]``, so a bad length gives a defined answer, never an out-of-bounds access), and
``cu_seqlens_k`` is always read (its values size the launch).

Reading a CUDA tensor's values on the host blocks until the GPU has caught up with the stream, so
on CUDA such checks are off by default: the hot path never synchronises. On the CPU a value read
costs nothing, so they are on by default.

``DECO_OPS_CHECKS=1`` turns them on everywhere (debugging), ``DECO_OPS_CHECKS=0`` off everywhere;
any other value raises where a check would read it. Meta tensors have no values: never checked.
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
    if device.type == "meta":  # no values to read (nn.MultiheadAttention runs meta masks)
        return False
    if setting:
        return setting == "1"
    return device.type != "cuda"
