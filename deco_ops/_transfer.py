"""Host tables and draws -> device without blocking the host.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory: the host waits for the copy, and so
for all work queued before it on the stream, once per call. Staging through pinned memory and
copying with ``non_blocking=True`` queues the copy and returns (PyTorch's caching host allocator
keeps the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU without a blocking copy (pinned staging)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
