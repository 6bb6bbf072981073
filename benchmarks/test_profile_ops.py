"""``python -m benchmarks.profile_ops`` runs (here on the CPU's tiny shapes) and reports each piece
and each case, so the GPU run's one call of it cannot fail on the script."""

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

import deco_ops

from . import profile_ops


def test_profile_ops_reports_pieces_and_cases(tmp_path):
    out = tmp_path / "profile.txt"
    with deco_ops.use_backend("auto"):  # the PyTorch path on a CPU, as a user's run there (not the interpreter)
        assert profile_ops.main(["--shapes", "infer_b1", "--directions", "fwd", "--impls", "deco_ops", "eager",
                                 "--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for line in ("launch (DECO_OPS_DIRECT_LAUNCH)", "strategy.make_key", "deco_ops.pool_mlp, no grad", "pool_mlp-infer_b1-fwd", "deco_ops: profiler, by host time",
                 "deco_ops: Python functions"):
        assert line in text, line
    rows = [r for r in text.splitlines() if r.startswith("pool_mlp-infer_b1-fwd ")]
    assert {r.split()[1] for r in rows} == {"deco_ops", "eager"}
    assert all(float(r.split()[2]) > 0 for r in rows)  # host_us measured


def test_launch_host_time_off_and_on():
    """The GPU run's per-launch host time, direct launches off and on: every launch measured both
    ways (on a CPU under the interpreter, the only place a CPU can launch the kernels)."""
    from deco_ops import _backend

    if not _backend.interpreting():
        pytest.skip("the kernels launch on a CPU only under Triton's interpreter")
    rows = profile_ops.launch_us(torch.device("cpu"))
    assert [r[0] for r in rows] == ["torch.empty, for scale", "pool_tokens_kernel (plain @triton.jit)",
                                    "pool_gemm_kernel (autotuned)"]
    assert all(off > 0 and on > 0 for _, off, on in rows)


def test_gpu_time_counts_each_kernel_once():
    """A profile of one call: the op's CPU row launched a 30 us kernel, which also has its own GPU
    row (as torch.profiler records a Triton launch under a custom op), then a 12 us cuBLAS kernel
    under aten::addmm; and a CPU-only op. GPU time per call: 42 us, not 84."""
    def event(i, name, start, end, device_type=DeviceType.CPU):
        return FunctionEvent(id=i, name=name, thread=0, start_us=start, end_us=end, use_device="cuda",
                             device_type=device_type, stack=[], input_shapes=[])

    op, addmm, view = event(0, "deco::pool_mlp", 0, 100), event(2, "aten::addmm", 50, 90), event(4, "aten::view", 95, 96)
    op.append_kernel("pool_gemm_kernel", 0, 30)
    addmm.append_kernel("sm90_gemm", 0, 12)
    kernels = [event(1, "pool_gemm_kernel", 10, 40, DeviceType.CUDA), event(3, "sm90_gemm", 60, 72, DeviceType.CUDA)]
    events = [op, addmm, view, *kernels]
    assert sum(e.self_device_time_total for e in events) == 84  # the old sum
    assert profile_ops.device_us(events, 1) == 42
    assert profile_ops.device_us(events * 2, 2) == 42
