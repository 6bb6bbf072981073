"""``python -m benchmarks``: the one-command report.

Times deco_ops and every baseline on every named shape (forward, forward+backward) on the current
device, measures the device's copy bandwidth and matmul rate in the same run, and writes
``results.json``, ``results.md`` and ``speedup.png`` to a results folder stamped with the device,
torch/triton versions, git commit and date. Then checks the performance targets from the ratios of
this run. Without a GPU it runs the tiny twins of the shapes in fp32 and says it is a CPU smoke run,
plus the CPU path's shapes at their real sizes (``shapes.CPU_PATH``), checked against ``CPU_BAR``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import cases, shapes, timing

HERE = Path(__file__).resolve().parent

# The performance targets (H100, bf16). kind: "speedup" = baseline time / deco_ops time;
# "matmul_fraction" = deco_ops TFLOP/s / measured matmul rate; "bandwidth_fraction" = deco_ops
# GB/s (fewest bytes) / measured copy bandwidth; "memory" = the baseline's peak memory / deco_ops'
# (CUDA only; "sdpa": the fastest SDPA backend's), the promise of no more activation memory than
# the code an op replaces.
BAR = [
    ("pool_mlp", "llava15_7b", "fwd_bwd", "speedup", "eager", 1.25),
    ("pool_mlp", "llava15_7b", "fwd_bwd", "speedup", "compile", 1.10),
    ("pool_mlp", "llava15_7b", "fwd_bwd", "matmul_fraction", None, 0.70),
    ("pool_mlp", "infer_b1", "fwd", "speedup", "eager", 2.0),
    ("cross_attention", "blip2_qformer", "fwd_bwd", "speedup", "sdpa", 1.2),
    ("cross_attention", "blip2_qformer", "fwd_bwd", "speedup", "eager_softmax", 3.0),
    ("cross_attention", "blip2_vitl336", "fwd_bwd", "speedup", "sdpa", 1.2),
    ("cross_attention", "blip2_vitl336", "fwd_bwd", "speedup", "eager_softmax", 3.0),
    ("cross_attention", "blip2_qformer", "fwd", "bandwidth_fraction", None, 0.70),
    ("cross_attention", "blip2_vitl336", "fwd", "bandwidth_fraction", None, 0.70),
    ("cross_attention", "qwenvl_resampler", "fwd", "speedup", "sdpa", 1.0),
    ("cross_attention", "qwenvl_resampler", "fwd_bwd", "speedup", "sdpa", 1.0),
    ("cross_attention", "video_resampler", "fwd", "speedup", "sdpa", 1.0),
    ("cross_attention", "video_resampler", "fwd_bwd", "speedup", "sdpa", 1.0),
    *((op, shape, direction, "memory", baseline, 1.0)
      for op, shape, baseline in (("pool_mlp", "llava15_7b", "eager"), ("pool_mlp", "infer_b1", "eager"),
                                  ("cross_attention", "blip2_qformer", "sdpa"), ("cross_attention", "qwenvl_resampler", "sdpa"))
      for direction in ("fwd", "fwd_bwd")),
]

# The CPU path (CPU tensors, default backend, no dropout), checked on CPU runs: deco_ops'
# time within 1.1x of SDPA's and 1.05x of eager PyTorch's, i.e. a speedup of at least 1/1.1, 1/1.05.
CPU_BAR = [
    *((op, shape, direction, "speedup", baseline, 1 / slack)
      for op, shape, baseline, slack in (
          ("cross_attention", "blip2_qformer_cpu_b8", "sdpa", 1.1),
          ("cross_attention", "blip2_qformer_cpu_b32", "sdpa", 1.1),
          ("pool_mlp", "llava15_cpu_b1", "eager", 1.05),
          ("pool_mlp", "llava15_cpu_b2", "eager", 1.05),
      )
      for direction in ("fwd", "fwd_bwd")),
]


# ----------------------------------------------------------------------------------------------
# stamp


def _git_commit() -> str | None:
    if os.environ.get("DECO_OPS_COMMIT"):
        return os.environ["DECO_OPS_COMMIT"]
    try:
        root = HERE.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def stamp(env: cases.Env, args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    now = _dt.datetime.now(_dt.timezone.utc)
    cpu = env.device.type != "cuda"
    meta = {
        "device": device_name(env.device),
        "device_type": env.device.type,
        "cpu_smoke_run": cpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "dtype": str(env.dtype).removeprefix("torch."),
        "deco_ops_backend": env.backend,
        "torch_compile_baselines": env.compile,
        "quick": bool(args.quick),
        "timer": "triton.testing.do_bench (CUDA events, median); GPU-only: do_bench_cudagraph (median)" if not cpu
        else "process CPU time (one thread), implementations interleaved round by round, fastest of >= 10 calls (5 with --quick)",
        "shapes": "real" if not cpu else ("tiny twins (CPU smoke run: timings say nothing about GPU speed); "
                                           "the *_cpu_* shapes at real size (the CPU path)"),
    }
    if env.device.type == "cuda":
        p = torch.cuda.get_device_properties(env.device)
        meta["sm_count"] = p.multi_processor_count
        meta["memory_GiB"] = round(p.total_memory / 2**30, 1)
    return meta


# ----------------------------------------------------------------------------------------------
# measuring


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_group(group: cases.Group, env: cases.Env, ceilings: dict, quick: bool) -> dict:
    rec = {
        "op": group.op, "shape": group.shape, "shape_desc": group.shape_obj.describe(),
        "direction": group.direction, "flops": group.flops, "bytes": group.bytes, "extra": group.extra,
        "impls": {},
    }
    outputs = {}
    cpu_runners = {}  # on a CPU every implementation is timed in turn, round after round (timing.interleaved_ms)
    for name, factory in group.impls.items():
        entry: dict = {}
        runner = None
        try:
            runner = factory()
            if env.device.type == "cuda":
                entry["ms"] = timing.bench_ms(runner.run, env.device, quick)
                entry["peak_MiB"] = timing.peak_mib(runner.run, runner.reset, env.device)
                entry.update(_gpu_only(runner, env.device, quick))
            else:
                runner.run()  # warm-up, and a failure is this implementation's alone
                cpu_runners[name] = runner
            if runner.output is not None and name in ("deco_ops", "eager", "eager_softmax"):
                outputs[name] = runner.output().float()
        except cases.Unavailable as e:
            entry["skipped"] = str(e)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            if env.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            if runner is not None:
                runner.reset()
            del runner
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
        rec["impls"][name] = entry
    if cpu_runners:
        for name, ms in timing.interleaved_ms({n: r.run for n, r in cpu_runners.items()}, quick).items():
            rec["impls"][name].update(ms=ms, peak_MiB=None)
        for runner in cpu_runners.values():
            runner.reset()
    for entry in rec["impls"].values():
        if "ms" in entry:
            s = entry["ms"] * 1e-3
            entry["TFLOPs"] = group.flops / s / 1e12
            entry["GBps"] = group.bytes / s / 1e9
            floor = max(group.flops / (ceilings["matmul_TFLOPs"] * 1e12), group.bytes / (ceilings["copy_GBps"] * 1e9))
            entry["roofline_pct"] = 100.0 * floor / s
            entry["matmul_pct"] = 100.0 * entry["TFLOPs"] / ceilings["matmul_TFLOPs"]
            entry["bandwidth_pct"] = 100.0 * entry["GBps"] / ceilings["copy_GBps"]
    ref = outputs.get("eager") if "eager" in outputs else outputs.get("eager_softmax")
    if "deco_ops" in outputs and ref is not None:
        rec["rel_err_vs_eager"] = _rel_err(outputs["deco_ops"], ref)
    rec["speedup"] = speedups(rec)
    return rec


def _gpu_only(runner, device: torch.device, quick: bool) -> dict:
    """``{"gpu_ms": ...}``, the call's GPU work alone (``timing.gpu_ms``), or ``{"gpu_error": ...}``
    when the call cannot be captured in a CUDA graph (the end-to-end time still stands)."""
    try:
        return {"gpu_ms": timing.gpu_ms(runner.run, device, quick)}
    except Exception as e:  # noqa: BLE001 - an uncapturable baseline keeps its end-to-end time
        torch.cuda.synchronize(device)
        return {"gpu_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    finally:
        runner.reset()


def host_bound(entry: dict) -> str:
    """The GPU-only time, and how much longer the end-to-end call takes: ``0.021 (2.4x)`` says the
    call spends 2.4x its GPU time, so the host holds it back; ``(1.0x)``, the GPU does. ``n/a`` off
    CUDA (no CUDA graphs), ``–`` where the call could not be captured."""
    gpu = entry.get("gpu_ms")
    if gpu is None:
        return "–" if "gpu_error" in entry else "n/a"
    return f"{gpu:.4g} ({entry['ms'] / gpu:.1f}x)"


def speedups(rec: dict) -> dict:
    """baseline kind -> (baseline ms / deco_ops ms, which implementation)."""
    deco = rec["impls"].get("deco_ops", {}).get("ms")
    best: dict[str, tuple[float, str]] = {}
    for name, entry in rec["impls"].items():
        if name == "deco_ops" or "ms" not in entry:
            continue
        kind = cases.BASELINE_KIND.get(name, name)
        if kind not in best or entry["ms"] < best[kind][0]:
            best[kind] = (entry["ms"], name)
    out = {}
    for kind, (ms, name) in best.items():
        out[kind] = {"impl": name, "ms": ms, "ratio": (ms / deco) if deco else None}
    return out


def check_bar(records: list[dict], ceilings: dict, cpu: bool) -> list[dict]:
    by_key = {(r["op"], r["shape"], r["direction"]): r for r in records}
    rows = []
    for op, shape, direction, kind, baseline, target in BAR + (CPU_BAR if cpu else []):
        cpu_target = shape in shapes.CPU_PATH
        label = f"{op} {direction} @ {shape}: " + (
            f"time <= {1 / target:.3g}x {baseline}'s" if cpu_target
            else f"peak memory <= {1 / target:.3g}x {baseline}'s" if kind == "memory"
            else f">= {target:g}x {baseline}" if kind == "speedup"
            else f">= {target:.0%} of measured {'matmul rate' if kind == 'matmul_fraction' else 'copy bandwidth'}")
        row = {"target": label, "op": op, "shape": shape, "direction": direction, "kind": kind,
               "baseline": baseline, "required": target, "measured": None, "met": None}
        r = by_key.get((op, shape, direction))
        deco = r and r["impls"].get("deco_ops", {})
        if r is None:
            row["status"] = "not run"
        elif "ms" not in deco:
            row["status"] = "deco_ops " + ("skipped: " + deco["skipped"] if "skipped" in deco else
                                           "failed: " + deco.get("error", "?"))
        elif kind == "speedup":
            sp = r["speedup"].get(baseline)
            if sp is None or sp["ratio"] is None:
                row["status"] = f"no {baseline} timing"
            else:
                row["measured"] = sp["ratio"]
                row["against"] = sp["impl"]
        elif kind == "memory":
            against = r["speedup"].get(baseline, {}).get("impl") if baseline == "sdpa" else baseline
            base_peak = r["impls"].get(against, {}).get("peak_MiB") if against else None
            if base_peak is None or not deco.get("peak_MiB"):
                row["status"] = "no peak memory (measured on CUDA only)"
            else:
                row["measured"] = base_peak / deco["peak_MiB"]
                row["against"] = against
        elif kind == "matmul_fraction":
            row["measured"] = deco["TFLOPs"] / ceilings["matmul_TFLOPs"]
        else:
            row["measured"] = deco["GBps"] / ceilings["copy_GBps"]
        if row["measured"] is not None:
            row["met"] = row["measured"] >= target
            row["margin_pct"] = 100.0 * (row["measured"] / target - 1.0)
            shown = (f"{row['measured']:.2f}x" if kind == "speedup"
                     else f"{1 / row['measured']:.2f}x {row['against']}'s peak" if kind == "memory" else f"{row['measured']:.0%}")
            if cpu_target:
                shown = f"{1 / row['measured']:.3f}x {baseline}'s time"
            row["status"] = ("met" if row["met"] else "MISSED") + f": {shown} ({row['margin_pct']:+.0f}% vs target)"
            if cpu and not cpu_target:
                row["status"] += " [CPU smoke run: not a GPU result]"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# writing


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def markdown(data: dict) -> str:
    m, c = data["meta"], data["ceilings"]
    lines = [f"# deco_ops benchmarks: {m['device']}", ""]
    if m["cpu_smoke_run"]:
        lines += ["**CPU smoke run**: tiny shapes, fp32, default (PyTorch) backend. These numbers prove the benchmark code "
                  "runs; they say nothing about GPU speed. The `*_cpu_*` shapes run at real size: they measure the CPU "
                  "path itself.", ""]
    lines += [
        f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, commit `{m['commit']}`, {m['date']}, "
        f"dtype {m['dtype']}, timer: {m['timer']}.",
        "",
        f"Measured ceilings: copy {c['copy_GBps']:.0f} GB/s (read + write), {c['dtype']} matmul "
        f"{c['matmul_TFLOPs']:.1f} TFLOP/s ({c['matmul_size']}^3). "
        "% roofline = max(FLOPs / matmul rate, fewest bytes / copy bandwidth) / time. "
        "Time: end to end (`do_bench`), host work included where the GPU waits for it. GPU-only: the same call "
        "captured in a CUDA graph and replayed (`do_bench_cudagraph`), no host time; in brackets time / GPU-only "
        "(1.0x: GPU-bound; well above 1: the host holds the call back). "
        "Speedup = baseline time / deco_ops time (> 1: deco_ops faster). Peak = memory one call allocates "
        "above its inputs. FLOP and byte conventions: `benchmarks/counts.py`.",
        "",
    ]
    ops: dict[str, list[dict]] = {}
    for r in data["results"]:
        ops.setdefault(r["op"], []).append(r)
    for op, recs in ops.items():
        lines += [f"## {op}", ""]
        seen_shapes = []
        for r in recs:
            if r["shape"] not in seen_shapes:
                seen_shapes.append(r["shape"])
        for shape in seen_shapes:
            rs = [r for r in recs if r["shape"] == shape]
            lines += [f"### {shape} ({rs[0]['shape_desc']})", ""]
            lines += ["| direction | implementation | time (ms) | GPU-only (ms) (time / GPU) | deco_ops speedup | TFLOP/s | GB/s | "
                      "% roofline | peak (MiB) |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            notes = []
            for r in rs:
                deco_ms = r["impls"].get("deco_ops", {}).get("ms")
                best_sdpa = r["speedup"].get("sdpa", {}).get("impl")
                for name, e in r["impls"].items():
                    if "ms" not in e:
                        notes.append(f"{r['direction']} {name}: {e.get('skipped') or e.get('error')}")
                        continue
                    if "gpu_error" in e:
                        notes.append(f"{r['direction']} {name}: no GPU-only time (not capturable in a CUDA graph): {e['gpu_error']}")
                    ratio = "1.00" if name == "deco_ops" else (f"{e['ms'] / deco_ms:.2f}x" if deco_ms else "–")
                    label = "**deco_ops** (auto)" if name == "deco_ops" else name + (" (best SDPA)" if name == best_sdpa else "")
                    lines.append(
                        f"| {r['direction']} | {label} | {e['ms']:.4g} | {host_bound(e)} | {ratio} | {e['TFLOPs']:.3g} | {e['GBps']:.4g} | "
                        f"{e['roofline_pct']:.1f} | {_f(e['peak_MiB'], '.1f')} |")
                if "rel_err_vs_eager" in r:
                    notes.append(f"{r['direction']}: deco_ops vs eager output, relative error {r['rel_err_vs_eager']:.2e}")
                if "padded_flops" in r["extra"]:
                    notes.append(f"{r['direction']}: the padded batch does {r['extra']['padded_flops']:.3g} FLOPs vs "
                                 f"{r['flops']:.3g} packed")
                if "eager_order_flops" in r["extra"]:
                    notes.append(f"{r['direction']}: eager project-then-pool order does {r['extra']['eager_order_flops']:.3g} "
                                 f"FLOPs vs {r['flops']:.3g} fused")
            lines.append("")
            if notes:
                lines += [f"- {n}" for n in notes] + [""]
    if data.get("not_run"):
        lines += ["## Not run", ""] + [f"- {k}: {v}" for k, v in data["not_run"].items()] + [""]
    lines += bar_markdown(data)
    return "\n".join(lines) + "\n"


def bar_markdown(data: dict) -> list[str]:
    lines = ["## Targets", ""]
    if data["meta"]["cpu_smoke_run"]:
        lines += ["CPU smoke run: the GPU targets are defined for an H100 in bf16; their checks below only exercise the "
                  "code. The CPU-path rows (`*_cpu_*` shapes, real sizes, default backend) are real CPU targets.", ""]
    lines += ["| target | status |", "|---|---|"]
    lines += [f"| {row['target']} | {row['status']} |" for row in data.get("bar", [])]
    return lines + [""]


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    ops: dict[str, list[dict]] = {}
    for r in data["results"]:
        if r["speedup"] and r["impls"].get("deco_ops", {}).get("ms"):
            ops.setdefault(r["op"], []).append(r)
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.6 * len(ops)), squeeze=False)
    for ax, (op, recs) in zip(axes[:, 0], ops.items()):
        kinds = sorted({k for r in recs for k in r["speedup"]})
        width = 0.8 / max(1, len(kinds))
        for i, kind in enumerate(kinds):
            xs = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(recs))]
            ys = [(r["speedup"].get(kind) or {}).get("ratio") or 0.0 for r in recs]
            ax.bar(xs, ys, width, label=f"vs {kind}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(recs)))
        ax.set_xticklabels([f"{r['shape']}\n{r['direction']}" for r in recs], fontsize=8)
        ax.set_ylabel("deco_ops speedup (x)")
        ax.set_title(op)
        ax.legend(fontsize=8)
    m = data["meta"]
    title = f"deco_ops speedup — {m['device']}, {m['dtype']}, torch {m['torch']}, {m['date'][:10]}"
    if m["cpu_smoke_run"]:
        title += " (CPU SMOKE RUN)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(data: dict, out: Path, with_plot: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(data))
    if with_plot:
        data["meta"]["plot"] = "speedup.png" if plot(data, out / "speedup.png") else None


# ----------------------------------------------------------------------------------------------
# main


class _Progress:
    def __init__(self, total: int):
        self.total, self.n = total, 0
        self.bar = None
        if sys.stderr.isatty():  # a log file gets plain lines instead of carriage returns
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="shape", file=sys.stderr)
            except Exception:
                self.bar = None

    def step(self, label: str):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label)
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def note(self, text: str):
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>-<date>/)")
    p.add_argument("--shapes", help=f"comma-separated shape names (default all): {','.join(shapes.ALL)}")
    p.add_argument("--directions", default="fwd,fwd_bwd",
                   help="comma-separated: fwd, fwd_bwd, fwd_bwd_dx (pool ops with token gradients)")
    p.add_argument("--quick", action="store_true", help="shorter timing loops and smaller ceiling measurements")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="time torch.compile baselines (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="deco_ops backend in the timed calls")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; start no new shape after this")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = cases.Env.default(compile=args.compile, dtype=getattr(torch, args.dtype) if args.dtype else None,
                            backend=args.backend)
    cpu = env.device.type != "cuda"
    if cpu:
        torch.set_num_threads(1)  # shared cores: threads only add scheduling noise; every implementation gets one
    names = shapes.select(args.shapes.split(",") if args.shapes else None, cpu=cpu)
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    bad = [d for d in directions if d not in cases.DIRECTIONS]
    if bad:
        raise SystemExit(f"unknown direction(s) {bad}; choose from {cases.DIRECTIONS}")
    meta = stamp(env, args)
    out = args.out or HERE / "results" / f"{'cpu-smoke' if cpu else slug(meta['device'])}-{meta['date'][:10]}"
    banner = f"deco_ops benchmarks on {meta['device']} ({meta['dtype']}), torch {meta['torch']}, triton {meta['triton']}"
    print(banner + ("\nCPU SMOKE RUN: tiny shapes, timings say nothing about GPU speed; the *_cpu_* shapes run at real "
                    "size (the CPU path)." if cpu else ""), flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    start = time.perf_counter()
    ceilings = timing.measure_ceilings(env.device, env.dtype, args.quick)
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, matmul {ceilings['matmul_TFLOPs']:.1f} TFLOP/s", flush=True)
    data = {"meta": meta, "ceilings": ceilings, "results": [], "not_run": {}, "bar": []}
    progress = _Progress(len(names))
    interrupted = False
    try:
        for name in names:
            if args.time_limit is not None and time.perf_counter() - start > args.time_limit:
                data["not_run"][name] = f"time limit {args.time_limit:g}s reached"
                progress.step(name + " (time limit)")
                continue
            t0 = time.perf_counter()
            try:
                groups = cases.groups_for(name, env, directions)
                if name in shapes.POOL_MLP:  # the projector's pooling stage alone: its GB/s
                    groups += cases.pooling_groups(name, env, directions)
            except cases.Unavailable as e:
                data["not_run"][name] = str(e)
                progress.step(name + " (unavailable)")
                continue
            for g in groups:
                data["results"].append(run_group(g, env, ceilings, args.quick))
            del groups
            data["bar"] = check_bar(data["results"], ceilings, cpu)
            write(data, out, with_plot=False)  # a run cut short keeps what it measured
            progress.note(f"{name}: {time.perf_counter() - t0:.1f}s")
            progress.step(name)
    except KeyboardInterrupt as e:
        interrupted = True
        data["meta"]["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        progress.close()
        data["meta"]["elapsed_s"] = round(time.perf_counter() - start, 1)
        data["bar"] = check_bar(data["results"], ceilings, cpu)
        write(data, out, with_plot=not args.no_plot)
        (out / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(markdown(data))
    print(f"wrote {out}/results.json, results.md" + (", speedup.png" if data["meta"].get("plot") else " (no plot)")
          + f" in {data['meta']['elapsed_s']}s")
    print("\n".join(["bar:"] + [f"  {row['target']}: {row['status']}" for row in data["bar"]]))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
