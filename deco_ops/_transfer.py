"""Host tables and draws -> device without blocking the host.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory: the host waits for the copy, and so
for all work queued before it on the stream, once per call. Staging through pinned memory and
copying with ``non_blocking=True`` queues the copy and returns (PyTorch's caching host allocator
keeps the pinned buffer alive until the copy has run).
"""

from __future__ import annotations

import torch

from .strategy import capturing


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU without a blocking copy (pinned staging).

    Refused while a CUDA graph is being captured: the graph would keep the copy from one pinned
    buffer that the host allocator hands out again after the capture, so a replay would read
    whatever lies there then (docs/cuda-graphs.md: which calls capture)."""
    if t.device.type == "cpu" and device.type == "cuda":
        refuse_capture()
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def refuse_capture() -> None:
    """The clear error of a call that moves a table between the host and the GPU (a packed batch's
    geometry, its cu_seqlens or grids, or a dropout seed drawn from a CPU generator) while the
    current stream captures a CUDA graph (``strategy.capturing``); nothing where none is captured."""
    if capturing():
        raise RuntimeError(
            "deco_ops: this call moves a table between the host and the GPU (a packed batch's geometry, its cu_seqlens "
            "or grids, or a dropout seed drawn from a CPU generator), which a CUDA graph cannot capture; capture the "
            "dense ops, or dropout with a CUDA generator (docs/cuda-graphs.md)"
        )
