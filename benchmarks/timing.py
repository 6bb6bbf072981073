"""Timing, peak memory and the device's measured ceilings (copy bandwidth, matmul rate).

On CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median): the end-to-end
time of a call, host work included wherever the GPU waits for it; beside it ``gpu_ms``, the GPU work
alone (``do_bench_cudagraph``: the call captured once in a CUDA graph, then replayed). On a CPU:
the process's CPU time, the implementations of a group interleaved round by round, fastest call
(``interleaved_ms``); ``bench_ms`` loops over one function (the device ceilings).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float:
    """Median milliseconds of one call of ``fn`` (warm-up excluded)."""
    if device.type == "cuda":
        import triton.testing

        warmup, rep = (10, 40) if quick else (25, 100)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()  # warm-up
    budget = 0.01 if quick else 0.1
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def gpu_ms(fn: Callable[[], object], device: torch.device, quick: bool = False) -> float | None:
    """Median milliseconds of the GPU work of one call of ``fn``, no host time: Triton's
    ``do_bench_cudagraph`` captures the call in a CUDA graph and times replays (no Python, launch
    or allocator work). None off CUDA. Raises if the call cannot be captured (a host sync)."""
    if device.type != "cuda":
        return None
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=10 if quick else 20, return_mode="median"))


def interleaved_ms(fns: dict[str, Callable[[], object]], quick: bool = False) -> dict[str, float]:
    """CPU: milliseconds of this process's CPU time (``time.process_time``) of the fastest call of
    each function, the functions timed in turn, round after round.

    On shared cores the wall clock counts other processes' work too (a 2x swing between two runs of
    the same code was seen); CPU time does not, and interleaving spreads what remains (cache and
    frequency effects) over every implementation alike. Meant for one intra-op thread, where CPU
    time is the compute time. The caller has warmed every function up."""
    min_rounds, budget = (5, 0.05) if quick else (10, 3.0)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < budget and rounds < 50):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
        rounds += 1
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def peak_mib(fn: Callable[[], object], reset: Callable[[], None], device: torch.device) -> float | None:
    """Device memory one call allocates above what was allocated before it (outputs, saved
    activations, gradients and workspace), in MiB. None off CUDA."""
    if device.type != "cuda":
        return None
    reset()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    reset()
    return peak / 2**20


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict:
    """The device's copy bandwidth (bytes read + written per second) and dense matmul rate in
    ``dtype``, measured now, on random data."""
    if device.type == "cuda":
        n_copy, n_mm = (2**28, 8192)  # 512 MiB of bf16 each way; 8192^3 matmul
    else:
        n_copy, n_mm = (2**22, 256) if quick else (2**23, 512)
    src = torch.randn(n_copy, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), device, quick)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    mm_ms = bench_ms(lambda: torch.matmul(a, b), device, quick)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_GBps": copy_bytes / (copy_ms * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "matmul_TFLOPs": 2 * n_mm**3 / (mm_ms * 1e-3) / 1e12,
        "matmul_size": n_mm,
        "dtype": str(dtype).removeprefix("torch."),
    }
