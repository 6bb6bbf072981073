"""Measure a GPU's tuning table: the best tile config of every autotuned kernel, per shape bucket.

    python -m deco_ops.tune [--shapes NAMES ...] [--shape SPEC ...] [--dtypes bf16 ...]
                            [--out FILE_OR_DIR] [--time-limit SECONDS] [--dry-run]

For each named shape (``deco_ops/shapes.py``, shipped in the package; all of them by default) and
each ``--shape`` of a user's own model (``KIND:field=value,...``, see ``deco_ops.shapes.parse``;
with ``--shape`` alone only those run), and each dtype, it runs the shape's op on CUDA at its real size: inference,
then forward + backward with trained weights, then with the tokens needing a gradient too
(attention: with q, k and v needing one), so every kernel variant of the op launches. Every launch
with a new bucket times the kernel's candidate configs (``deco_ops.kernels._tuning``; the shipped
tables are switched off while tuning), and the winners and timings are written as the GPU's table
(``deco_ops.tuning_tables``): ``--out`` names a file, or a folder to hold ``<GPU name>.json``
(default: ``deco_ops/tuning/`` of this checkout). An existing table at that path is extended,
its entries for re-measured buckets replaced, where it was measured on this GPU under this
triton's major.minor; otherwise it is replaced, with a printed warning (another triton's: its
configs and timings would otherwise be stamped with this one's version). The fused-vs-composed choices ``deco_ops.strategy``
measures on the same calls (afresh: its on-disk cache is set aside) go into the table's
``strategies``.

``--dry-run`` needs no GPU: it lists, per shape, the ops, each kernel's buckets and the candidate
configs that tuning would time there (pruned as for an H100 when run on a CPU), launching nothing
(GEMMs and random fills on the host are skipped too, so real shapes list in seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import deco_ops

from . import _backend, shapes, strategy, tuning_tables
from ._direct import deco
from .kernels import _tuning

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# what runs for a shape


class Workload:
    """One named shape's op on random inputs: ``forward()`` and the leaf sets that need a gradient
    in each direction timed by the benchmarks (the empty set: inference)."""

    def __init__(self, op: str, forward: Callable[[], torch.Tensor], grad_sets: list[list[torch.Tensor]]):
        self.op, self.forward, self.grad_sets = op, forward, grad_sets
        self.leaves = list({id(t): t for leaves in grad_sets for t in leaves}.values())

    def run(self) -> None:
        for leaves in self.grad_sets:
            for t in self.leaves:
                t.requires_grad_(any(t is leaf for leaf in leaves))
                t.grad = None
            if not leaves:
                with torch.no_grad():
                    self.forward()
                continue
            y = self.forward()
            y.backward(torch.randn_like(y))


def _weights(shape, device, dtype, in_features: int) -> list[torch.Tensor]:
    """w1, b1, w2, b2 of a projector shape taking ``in_features``, nn.Linear-scaled."""
    def linear(n_out, n_in):
        return (torch.randn(n_out, n_in, device=device) / math.sqrt(n_in)).to(dtype), \
            (torch.randn(n_out, device=device) / math.sqrt(n_in)).to(dtype)
    return [*linear(shape.hidden, in_features), *linear(shape.out_features, shape.hidden)]


def workload(shape, device: torch.device, dtype: torch.dtype) -> Workload:
    if isinstance(shape, shapes.AttentionShape):
        B, M, N, H, D = shape.batch, shape.M, shape.N, shape.heads, shape.head_dim
        q = torch.randn(1 if shape.shared_q else B, M, H, D, device=device).to(dtype)
        k, v = (torch.randn(B, N, H, D, device=device).to(dtype) for _ in range(2))
        lens = None if shape.kv_lens is None else torch.tensor(shape.kv_lens, dtype=torch.int32, device=device)
        return Workload("cross_attention", lambda: deco_ops.cross_attention(q, k, v, kv_lens=lens), [[], [q, k, v]])
    if isinstance(shape, shapes.MergeShape):
        w = _weights(shape, device, dtype, shape.merge ** 2 * shape.in_features)
        norm_width = shape.in_features if shape.norm_position == "pre" else shape.merge ** 2 * shape.in_features
        norm_w = [(1 + 0.1 * torch.randn(norm_width, device=device)).to(dtype)]
        norm_w.append(torch.randn(norm_width, device=device).to(dtype) if shape.norm == "layernorm" else None)
        x_shape = (shape.tokens, shape.in_features) if shape.order == "block" else \
            (shape.batch, math.prod(shape.grid), shape.in_features)
        x = torch.randn(x_shape, device=device).to(dtype)
        grid = shape.grid if shape.order == "grid" else None

        def forward():
            return deco_ops.merge_mlp(x, *norm_w, *w, grid=grid, merge_size=shape.merge, order=shape.order,
                                      norm=shape.norm, norm_position=shape.norm_position, eps=shape.eps)

        trained = [*w, *(t for t in norm_w if t is not None)]
        return Workload("merge_mlp", forward, [[], trained, [*trained, x]])
    w = _weights(shape, device, dtype, shape.in_features)
    if isinstance(shape, shapes.PackedShape):
        x = torch.randn(shape.tokens, shape.in_features, device=device).to(dtype)
        grids = torch.tensor(shape.grids, dtype=torch.int32, device=device)
        out_grids = torch.tensor(shape.out_grids, dtype=torch.int32, device=device)
        op, forward = "pool_mlp_packed", lambda: deco_ops.pool_mlp_packed(x, grids, *w, out_grids=out_grids)[0]
    else:
        x = torch.randn(shape.batch, shape.tokens, shape.in_features, device=device).to(dtype)
        if isinstance(shape, shapes.MLPPoolShape):
            op, forward = "mlp_pool", lambda: deco_ops.mlp_pool(x, *w, grid=shape.grid, out_grid=shape.out_grid,
                                                                mode=shape.mode)
        else:
            op, forward = "pool_mlp", lambda: deco_ops.pool_mlp(x, *w, grid=shape.grid, out_grid=shape.out_grid)
    return Workload(op, forward, [[], w, [*w, x]])


class SkipHostWork(TorchDispatchMode):
    """Dry run: matrix products and random fills return uninitialised tensors of the right shape
    (nothing reads their values; the kernels that would are not launched), so real shapes plan in
    seconds on a CPU.

    A deco op's body runs below the dispatcher, where this mode is no longer on the stack: the
    mode runs the body itself, with the mode pushed again, so the GEMMs inside (the composed
    paths, the second Linear after a fused kernel, the weight gradients) reach it too."""

    # linear and matmul too: below autograd (a body runs there) they arrive undecomposed
    SKIPPED = {torch.ops.aten.linear, torch.ops.aten.matmul, torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
               torch.ops.aten.baddbmm, torch.ops.aten._addmm_activation, torch.ops.aten.randn, torch.ops.aten.randn_like}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "deco":
            with self:
                return getattr(deco, func._opname).body(*args, **kwargs)
        if func.overloadpacket not in self.SKIPPED:
            return func(*args, **kwargs)
        if "out" in kwargs:
            return kwargs["out"]
        device = args[0].device if isinstance(args[0], torch.Tensor) else kwargs.get("device", "cpu")
        on_meta = {**kwargs, "device": "meta"} if "device" in kwargs else kwargs
        meta = func(*tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, args), **on_meta)
        return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)


# ----------------------------------------------------------------------------------------------
# the table


def measured(kernels: list[_tuning.TunedKernel]) -> dict:
    """The ``kernels`` section: every bucket timed in this process, its winner and timings (ms)."""
    section = {}
    for k in kernels:
        k.settle()
        for label, timings in k.timings.items():
            section.setdefault(k.name, {})[label] = {
                "config": _tuning.config_dict(k.chosen[label]),
                "timings_ms": {_tuning.config_label(c): _ms(t) for c, t in timings.items()},
            }
    return section


def _ms(timing) -> float | None:
    """Triton's (median, p20, p80) -> the median; None where the config failed to run (inf)."""
    median = timing[0] if isinstance(timing, (list, tuple)) else timing
    return None if math.isinf(median) else round(float(median), 5)


def table(device: torch.device, shape_names: list[str], previous: dict) -> dict:
    """This process's measurements as ``device``'s table, extending ``previous`` (same GPU)."""
    import triton

    kernels = {name: dict(buckets) for name, buckets in previous.get("kernels", {}).items()}
    for name, buckets in measured(_tuning.TUNED_KERNELS).items():
        kernels.setdefault(name, {}).update(buckets)
    strategies = {**previous.get("strategies", {}), **strategy.choices()}
    return {
        "format": tuning_tables.FORMAT,
        "device": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "shapes": sorted(set(previous.get("shapes", [])) | set(shape_names)),
        "kernels": kernels,
        "strategies": strategies,
    }


def extendable(previous: dict, device_name: str, path: Path) -> dict:
    """The part of ``previous`` (the table at ``path``) that this run extends: all of it where it
    was measured on ``device_name`` under the installed triton's major.minor, else nothing (the
    table this run writes says so: its ``device`` and ``triton``)."""
    import triton

    if not previous:
        return {}
    if previous.get("device") != device_name:
        print(f"deco_ops.tune: warning: {path} was measured on {previous.get('device')}, this is {device_name}: "
              "its entries are dropped, not extended", flush=True)
        return {}
    recorded = previous.get("triton")
    if not isinstance(recorded, str) or tuning_tables.major_minor(recorded) != tuning_tables.major_minor(triton.__version__):
        print(f"deco_ops.tune: warning: {path} was measured under triton {recorded}, this is triton {triton.__version__}: "
              "its entries are dropped, not extended", flush=True)
        return {}
    return previous


def output_path(out: Path | None, device_name: str) -> Path:
    """``--out``: a ``.json`` file as given, else a folder for ``<GPU name>.json``."""
    if out is not None and out.suffix == ".json":
        return out
    return (out or tuning_tables.TABLE_DIR) / tuning_tables.file_name(device_name)


# ----------------------------------------------------------------------------------------------
# command line


def _plan_lines(name: str, op: str, dtype_name: str, plan) -> list[str]:
    lines = [f"{name}  {op}  {dtype_name}"]
    seen = set()
    for kernel, label, candidates in plan:
        if (kernel, label) in seen:
            continue
        seen.add((kernel, label))
        timed = "timed" if len(candidates) > 1 else "single candidate, not timed"
        lines.append(f"  {kernel}  [{label}]  {len(candidates)} candidates ({timed}):")
        lines.extend(f"      {_tuning.config_label(c)}" for c in candidates)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m deco_ops.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", help="named shapes of deco_ops/shapes.py (default: all, unless --shape is given)")
    parser.add_argument("--shape", action="append", default=[], metavar="SPEC",
                        help="a shape of your model, KIND:field=value,... with KIND one of "
                             f"{', '.join(shapes.SPEC_KINDS)}; e.g. pool_mlp:batch=8,grid=24x24,out_grid=12x12,"
                             "in_features=1024,hidden=4096,out_features=4096 (repeatable)")
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--out", type=Path, help="table file (.json) or folder (default: deco_ops/tuning/)")
    parser.add_argument("--time-limit", type=float, default=math.inf,
                        help="start no new shape after this many seconds (what was measured is written)")
    parser.add_argument("--dry-run", action="store_true", help="list ops, buckets and candidates; launch nothing")
    args = parser.parse_args(argv)
    try:
        todo = {name: shapes.ALL[name] for name in shapes.select(args.shapes)} if args.shapes or not args.shape else {}
        todo.update((shape.name, shape) for shape in map(shapes.parse, args.shape))
    except ValueError as e:
        parser.error(str(e))

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        parser.error("tuning needs a CUDA GPU (--dry-run lists what it would time)")
    if not cuda and not _backend.interpreting():
        # The Triton path on CPU tensors needs the interpreter, switched on before deco_ops is imported.
        env = {**os.environ, _backend.ENV_VAR: "triton"}
        return subprocess.call([sys.executable, "-m", "deco_ops.tune", *argv], env=env)
    device = torch.device("cuda" if cuda else "cpu")
    if not args.dry_run:
        # measure every bucket and strategy afresh: no table, no strategy decisions from disk
        os.environ[tuning_tables.ENV_VAR] = "none"
        os.environ[_tuning.AUTOTUNE_ENV] = "1"
        os.environ[strategy.CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="deco_ops_tune_")
        strategy.forget()
        device_name = torch.cuda.get_device_name(device)
        path = output_path(args.out, device_name)
        previous = extendable(tuning_tables.read(path), device_name, path)

    start = time.perf_counter()
    done = []
    for name, shape in todo.items():
        if time.perf_counter() - start > args.time_limit:
            print(f"deco_ops.tune: time limit reached, not starting {name}", flush=True)
            continue
        for dtype_name in args.dtypes:
            torch.manual_seed(0)
            with deco_ops.use_backend("triton"):
                if args.dry_run:
                    with _tuning.planning() as plan, SkipHostWork():
                        work = workload(shape=shape, device=device, dtype=DTYPES[dtype_name])
                        work.run()
                    print("\n".join(_plan_lines(name, work.op, dtype_name, plan)), flush=True)
                else:
                    work = workload(shape=shape, device=device, dtype=DTYPES[dtype_name])
                    t0 = time.perf_counter()
                    work.run()
                    torch.cuda.synchronize(device)
                    print(f"deco_ops.tune: {name} {work.op} {dtype_name} in {time.perf_counter() - t0:.1f}s", flush=True)
        done.append(name)
        if not args.dry_run:  # after every shape, so a run cut short keeps what it measured
            result = table(device, done, previous)
            tuning_tables.write(result, path)
    if not args.dry_run and done:
        buckets = sum(len(b) for b in result["kernels"].values())
        print(f"deco_ops.tune: {buckets} buckets of {len(result['kernels'])} kernels, {len(result['strategies'])} "
              f"strategy choices -> {path} ({time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
