"""``python -m benchmarks.profile_ops``: where an op's time goes, host or GPU.

For each named shape and direction, and each implementation asked for (default: deco_ops under
each strategy, eager PyTorch, the best SDPA), it reports per call:
* ``host_us``: how long the Python side takes to issue one call (``N`` calls issued back to back,
  no synchronisation, the GPU queue never full), the launch overhead a small batch pays;
* ``wall_us``: the same ``N`` calls until the GPU is done, per call;
* ``gpu_us``: the summed time of the GPU kernels of one call (``torch.profiler``, each kernel once);
so ``host_us > gpu_us`` means the call is host-bound. Then, for deco_ops, the profiler's top rows
by host time and by GPU time, and a ``cProfile`` of the Python functions that cost the host most.

    python -m benchmarks.profile_ops [--shapes NAMES] [--impls NAMES] [--out FILE] [--launches]

It starts with the host time of one Triton launch with direct launches through the compiled kernel
off and on (``DECO_OPS_DIRECT_LAUNCH``); ``--launches`` stops there. ``DECO_OPS_DIRECT_LAUNCH=1``
in the environment runs the whole report with them on.

Made for the one short GPU run a session gets: each case takes a second or two after its kernels
are compiled. Without a GPU it runs the tiny shapes on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch
from torch.autograd import DeviceType

from . import cases

DEFAULT_SHAPES = ["infer_b1", "llava15_7b", "blip2_qformer", "qwenvl_resampler"]
DEFAULT_IMPLS = ["deco_ops", "deco_ops_fused", "deco_ops_composed", "eager", "eager_softmax", "sdpa_cudnn", "sdpa_flash"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_and_wall_us(run, device: torch.device, n: int) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    t1 = time.perf_counter()
    _sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def profiled(run, device: torch.device, n: int):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            run()
        _sync(device)
    events = prof.key_averages()
    return device_us(events, n), events


def device_us(events, calls: int) -> float:
    """GPU microseconds per call in profiler ``events``, each kernel counted once: the device-side
    rows only (kernels, copies, memsets). The CPU-side row that launched a kernel (the op, the
    launch call) reports the same time again as its "self device time"; summing every row, as this
    script did up to the H200 runs of 2026-11-26, counted each kernel twice."""
    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / calls


def python_hotspots(run, n: int, rows: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def host_pieces(device: torch.device) -> list[tuple[str, float]]:
    """Host microseconds of the pieces one deco_ops call is made of, each alone (best of 5 runs of
    300 calls; 2 on a CPU, where the Triton piece runs in the interpreter), on a tiny LLaVA-shaped
    pooling so the GPU never holds the host back."""
    n = 300 if device.type == "cuda" else 2
    import deco_ops
    from deco_ops import _backend, _direct, strategy, tuning_tables
    from deco_ops.kernels import adaptive_pool
    from deco_ops.pooling import as_3d

    x = torch.randn(1, 576, 64, device=device)
    w1, w2 = torch.randn(128, 64, device=device), torch.randn(64, 128, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    grid, out_grid = [24, 24], [12, 12]
    pieces = {
        "torch add (one ATen kernel)": lambda: x.add(1.0),
        "F.linear (cuBLAS)": lambda: torch.nn.functional.linear(x, w1),
        "strategy.make_key": lambda: strategy.make_key("pool_mlp", device, x.dtype, True, rows=256, C=64, grid=grid,
                                                      out_grid=out_grid, hidden=128, out=64, act="gelu"),
        "tuning_tables.load_named": lambda: tuning_tables.load_named(name),
        "deco.adaptive_avg_pool_tokens.body": lambda: _direct.deco.adaptive_avg_pool_tokens.body(x, grid, out_grid),
        "torch.ops.deco.adaptive_avg_pool_tokens": lambda: torch.ops.deco.adaptive_avg_pool_tokens(x, grid, out_grid),
        "deco_ops.adaptive_avg_pool_tokens": lambda: deco_ops.adaptive_avg_pool_tokens(x, (24, 24), (12, 12)),
        "deco_ops.pool_mlp, no grad": lambda: deco_ops.pool_mlp(x, w1, None, w2, None, grid=(24, 24), out_grid=(12, 12)),
    }
    if _backend.use_triton(device):  # the kernel itself, where this backend launches it
        pieces["pool kernel launch (Triton)"] = lambda: adaptive_pool.pool_tokens(x, as_3d(grid), as_3d(out_grid))
    if device.type == "cuda":
        def guard():
            with torch.cuda.device(x.device):
                pass

        pieces["torch.cuda.device guard"] = guard
    results = []
    with torch.no_grad():
        for label, fn in pieces.items():
            for _ in range(20):
                fn()
            _sync(device)
            best = min(host_and_wall_us(fn, device, n)[0] for _ in range(5))
            results.append((label, best))
    return results


def launch_us(device: torch.device) -> list[tuple[str, float, float]]:
    """Host microseconds per Triton launch, with direct launches through the compiled kernel off and
    on (``DECO_OPS_DIRECT_LAUNCH``, ``kernels/_compiled_launch.py``): (what, off, on), best of 5 runs
    of 300 launches after 20 warm-up calls, which resolve each signature once. Each launcher call
    allocates its outputs too: ``torch.empty`` is measured alone beside them. On a CPU, only under
    Triton's interpreter (one launch of each, tiny; direct launches never apply there: off = on)."""
    from deco_ops import _backend
    from deco_ops._compiled_launch_setting import SETTING
    from deco_ops.kernels import adaptive_pool, pool_gemm

    cuda = device.type == "cuda"
    if not (cuda or _backend.interpreting()):  # compiled kernels and no GPU: nothing can launch
        return []
    n, warm, rounds = (300, 20, 5) if cuda else (1, 1, 1)
    side = 24 if cuda else 4  # LLaVA's 24x24 -> 12x12 on a GPU, a tiny grid for the interpreter
    x = torch.randn(1, side * side, 64, device=device)
    w = torch.randn(128, 64, device=device)
    grid, out_grid = (1, side, side), (1, side // 2, side // 2)
    launches = {
        "torch.empty, for scale": lambda: torch.empty((side * side // 4, 128), device=device),
        "pool_tokens_kernel (plain @triton.jit)": lambda: adaptive_pool.pool_tokens(x, grid, out_grid),
        "pool_gemm_kernel (autotuned)": lambda: pool_gemm.pool_gemm(x, grid, out_grid, w, None, "gelu", False, False),
    }
    results = []
    with torch.no_grad():
        for label, fn in launches.items():
            us = []
            for setting in ("0", "1"):
                with SETTING.use(setting):
                    for _ in range(warm):
                        fn()
                    _sync(device)
                    us.append(min(host_and_wall_us(fn, device, n)[0] for _ in range(rounds)))
            results.append((label, *us))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    p.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS)
    p.add_argument("--directions", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
    p.add_argument("--calls", type=int, default=30, help="calls per host/wall measurement")
    p.add_argument("--out", help="write the report here too")
    p.add_argument("--launches", action="store_true", help="only the host us per Triton launch, direct launches off/on")
    args = p.parse_args(argv)

    env = cases.Env.default(compile=False)
    report = open(args.out, "w") if args.out else None  # written as it goes: a run cut short keeps its lines

    def say(line: str = "") -> None:
        print(line, flush=True)
        if report:
            report.write(line + "\n")
            report.flush()

    say(f"# host vs GPU time per call, {torch.cuda.get_device_name() if env.device.type == 'cuda' else 'CPU (smoke)'}, "
        f"torch {torch.__version__}")
    say(f"{'launch (DECO_OPS_DIRECT_LAUNCH)':<44} {'off_us':>9} {'on_us':>9}")
    for label, off, on in launch_us(env.device):
        say(f"{label:<44} {off:9.1f} {on:9.1f}")
    say()
    if args.launches:
        if report:
            report.close()
        return 0
    say(f"{'host piece':<44} {'host_us':>9}")
    for label, us in host_pieces(env.device):
        say(f"{label:<44} {us:9.1f}")
    say()
    say(f"{'case':<44} {'impl':<20} {'host_us':>9} {'wall_us':>9} {'gpu_us':>9}")
    for name in args.shapes:
        for group in cases.groups_for(name, env, tuple(args.directions)):
            for impl in args.impls:
                if impl not in group.impls:
                    continue
                try:
                    runner = group.impls[impl]()
                    for _ in range(3):  # compile, choose strategies, fill allocator caches
                        runner.run()
                    _sync(env.device)
                    host, wall = host_and_wall_us(runner.run, env.device, args.calls)
                    gpu, events = profiled(runner.run, env.device, 5)
                except cases.Unavailable:
                    continue
                except Exception as e:  # noqa: BLE001 - one failing implementation must not end the GPU run's profile
                    say(f"{group.key:<44} {impl:<20} FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                say(f"{group.key:<44} {impl:<20} {host:9.1f} {wall:9.1f} {gpu:9.1f}")
                if impl == "deco_ops":
                    sort = "self_device_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
                    say(f"\n## {group.key} deco_ops: profiler, by host time\n"
                        + events.table(sort_by="self_cpu_time_total", row_limit=18)
                        + f"\n## {group.key} deco_ops: profiler, by GPU time\n"
                        + events.table(sort_by=sort, row_limit=12)
                        + f"\n## {group.key} deco_ops: Python functions, 20 calls\n"
                        + python_hotspots(runner.run, 20, 25))
    if report:
        report.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
