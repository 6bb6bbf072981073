"""Every launcher runs under its input's CUDA device.

Triton launches on ``torch.cuda.current_device()`` and that device's current stream. An input on
``cuda:1`` while ``cuda:0`` is current (Hugging Face ``device_map="auto"``, pipeline stages) would
otherwise fault ("pointer cannot be accessed") or race with the torch ops queued on ``cuda:1``'s
stream. Inside the guard the launch uses the input's device and its current stream, as every torch
op on that tensor does (Liger-Kernel wraps its launches the same way, ``device_context``).
"""

from __future__ import annotations

import contextlib
import functools

import torch


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes ``t``'s CUDA device current inside the block; nothing to do for CPU tensors."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(launcher):
    """Decorator: run ``launcher(first_tensor, ...)`` under ``device_guard(first_tensor)``."""

    @functools.wraps(launcher)
    def guarded(first: torch.Tensor, *args, **kwargs):
        with device_guard(first):
            return launcher(first, *args, **kwargs)

    return guarded
