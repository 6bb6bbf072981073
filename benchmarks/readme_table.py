"""Print the README's results section from a results folder written by ``python -m benchmarks``.

    python -m benchmarks.readme_table benchmarks/results/<device>-<date>
    python -m benchmarks.readme_table benchmarks/results/<device>-<date> --write README.md

``--write`` replaces the text between ``<!-- benchmark-results:begin -->`` and
``<!-- benchmark-results:end -->`` in the given file (the markers are added at the end if absent;
links to the folder are made relative to that file), so the README's numbers are always drawn
from committed results, never typed by hand; ``tests/test_readme.py`` checks the committed block
equals what its folder generates. ``--section cpu-path`` prints (or writes between
``<!-- cpu-path:begin -->`` and ``<!-- cpu-path:end -->``, in docs/results-history.md) the CPU
path's table from a CPU run instead (its targets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import shapes
from .report import bar_markdown

SECTIONS = {"results": ("<!-- benchmark-results:begin -->", "<!-- benchmark-results:end -->"),
            "cpu-path": ("<!-- cpu-path:begin -->", "<!-- cpu-path:end -->")}
KINDS = [("eager", "eager"), ("compile", "torch.compile"), ("sdpa", "best SDPA"), ("eager_softmax", "eager softmax"),
         ("deco_ops_fused", "fused forced"), ("deco_ops_composed", "composed forced")]


def _x(sp: dict, kind: str) -> str:
    e = sp.get(kind)
    return f"{e['ratio']:.2f}x" if e and e.get("ratio") else "–"


def table(data: dict, folder: str) -> str:
    m, c = data["meta"], data["ceilings"]
    lines = [
        f"Measured on **{m['device']}**, {m['dtype']}, torch {m['torch']}, triton {m['triton']}, "
        f"commit `{m['commit']}`, {m['date'][:10]} ([full tables]({folder}/results.md), [JSON]({folder}/results.json)). "
        f"Ceilings measured in the same run: copy {c['copy_GBps']:.0f} GB/s, matmul {c['matmul_TFLOPs']:.0f} TFLOP/s.",
        "",
    ]
    if m.get("cpu_smoke_run"):
        lines += ["**CPU smoke run — not GPU results.**", ""]
    lines += ["| op | shape | direction | deco_ops (ms) | " + " | ".join(f"vs {n}" for _, n in KINDS)
              + " | TFLOP/s | % roofline |",
              "|---|---|---|---:|" + "---:|" * len(KINDS) + "---:|---:|"]
    for r in data["results"]:
        d = r["impls"].get("deco_ops", {})
        if "ms" not in d:
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['direction']} | {d['ms']:.3f} | "
                     + " | ".join(_x(r["speedup"], k) for k, _ in KINDS)
                     + f" | {d['TFLOPs']:.1f} | {d['roofline_pct']:.0f}% |")
    lines += ["", "Speedup = baseline time / deco_ops time in the same run; > 1 means deco_ops is faster.", ""]
    lines += [ln.replace("## Targets", "**Targets**") for ln in bar_markdown(data)]
    if (Path(folder) / "speedup.png").exists() or m.get("plot"):
        lines += [f"![deco_ops speedup]({folder}/speedup.png)", ""]
    return "\n".join(lines)


def cpu_path_table(data: dict, folder: str) -> str:
    """The CPU path: deco_ops' default CPU backend against SDPA / eager PyTorch at real sizes."""
    m = data["meta"]
    by_key = {(r["op"], r["shape"], r["direction"]): r for r in data["results"]}
    lines = [
        f"Measured on {m['device']}, {m['dtype']}, one thread, torch {m['torch']}, commit `{m['commit']}`, "
        f"{m['date'][:10]} ([full tables]({folder}/results.md)); {m['timer']}.",
        "",
        "| op | shape | direction | deco_ops (ms) | baseline (ms) | time ratio | target | `composed` forced (ms) "
        "| before: `fused` forced (ms) |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in data["bar"]:
        r = by_key.get((row["op"], row["shape"], row["direction"]))
        if row["shape"] not in shapes.CPU_PATH or r is None or row["measured"] is None:
            continue
        base = r["speedup"][row["baseline"]]
        forced = [r["impls"].get(f"deco_ops_{s}", {}).get("ms") for s in ("composed", "fused")]
        lines.append(
            f"| {row['op']} | {row['shape']} | {row['direction']} | {r['impls']['deco_ops']['ms']:.2f} | "
            f"{base['ms']:.2f} ({base['impl']}) | {1 / row['measured']:.3f}x | <= {1 / row['required']:.2f}x: "
            f"{'met' if row['met'] else 'MISSED'} | " + " | ".join("–" if t is None else f"{t:.2f}" for t in forced) + " |")
    lines += ["", "Time ratio = deco_ops time / baseline time in the same run (< 1: deco_ops faster). On a CPU "
              "`auto` runs the composed twin, so the gap between the deco_ops and `composed` forced columns, the "
              "same code, is the measurement's noise on shared cores. `fused` forced on the PyTorch backend is "
              "attention's chunked online-softmax reference, the CPU path before SDPA took it over; the projectors have "
              "one CPU path.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a results folder holding results.json")
    p.add_argument("--write", type=Path, help="file whose marked section to replace (e.g. README.md)")
    p.add_argument("--section", choices=list(SECTIONS), default="results",
                   help="results: the GPU results table; cpu-path: the CPU path's table from a CPU run")
    args = p.parse_args(argv)
    data = json.loads((args.folder / "results.json").read_text())
    # links relative to the file they are written into (README.md at the root, or a page in docs/)
    folder = Path(os.path.relpath(args.folder, args.write.parent)) if args.write else args.folder
    text = (cpu_path_table if args.section == "cpu-path" else table)(data, folder.as_posix())
    if not args.write:
        print(text)
        return 0
    BEGIN, END = SECTIONS[args.section]
    doc = args.write.read_text() if args.write.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    args.write.write_text(doc)
    print(f"updated {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
