"""The report's two clocks: end-to-end time and GPU-only time (``do_bench_cudagraph``) side by side,
so a host-bound row reads as one; off CUDA the GPU-only column says n/a."""

import torch

from . import report, timing


class _Runner:
    def __init__(self):
        self.calls, self.resets = 0, 0

    def run(self):
        self.calls += 1

    def reset(self):
        self.resets += 1


def test_host_bound_column():
    assert report.host_bound({"ms": 0.024, "gpu_ms": 0.01}) == "0.01 (2.4x)"  # host-bound: 2.4x its GPU time
    assert report.host_bound({"ms": 1.02, "gpu_ms": 1.0}) == "1 (1.0x)"  # GPU-bound
    assert report.host_bound({"ms": 0.5}) == "n/a"  # CPU run: no CUDA graphs
    assert report.host_bound({"ms": 0.5, "gpu_error": "RuntimeError: capture"}) == "–"


def test_gpu_only_time_is_none_off_cuda():
    runner = _Runner()
    assert timing.gpu_ms(runner.run, torch.device("cpu")) is None
    assert report._gpu_only(runner, torch.device("cpu"), quick=True) == {"gpu_ms": None}
    assert runner.calls == 0 and runner.resets == 1


def test_markdown_shows_both_clocks():
    rec = {"op": "pool_mlp", "shape": "infer_b1", "shape_desc": "tiny", "direction": "fwd", "flops": 1, "bytes": 1,
           "extra": {}, "impls": {"deco_ops": {"ms": 0.024, "gpu_ms": 0.01}, "eager": {"ms": 0.05, "gpu_error": "RuntimeError: sync"}}}
    for entry in rec["impls"].values():
        entry.update(TFLOPs=1.0, GBps=1.0, roofline_pct=1.0, peak_MiB=None)
    rec["speedup"] = report.speedups(rec)
    meta = {"device": "H200", "cpu_smoke_run": False, "torch": "2.x", "triton": "3.6", "cuda": "12", "commit": "abc",
            "date": "2026-12-03T00:00", "dtype": "bfloat16", "timer": "do_bench"}
    data = {"meta": meta, "ceilings": {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0, "dtype": "bfloat16", "matmul_size": 1},
            "results": [rec], "bar": []}
    text = report.markdown(data)
    assert "GPU-only (ms)" in text
    assert "| fwd | **deco_ops** (auto) | 0.024 | 0.01 (2.4x) |" in text
    assert "| fwd | eager | 0.05 | – |" in text
    assert "eager: no GPU-only time (not capturable in a CUDA graph): RuntimeError: sync" in text
