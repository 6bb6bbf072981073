"""The test suite's mutation score: plant each mutant of ``tools/mutants.py`` (one realistic
one-line bug) in a scratch copy of the repository, run the tests that should catch it, and count
the survivors.

    nice -n 15 python -m tools.mutate                 # every mutant, score and survivors
    python -m tools.mutate --list                     # the mutants and their test selections
    python -m tools.mutate --only tanh_gelu_constant --only pool_gemm_time_mask
    python -m tools.mutate --jobs 2                   # two scratch copies, two mutants at a time

The copy holds the working tree's tracked and untracked-but-not-ignored files (so uncommitted
tests count), plus the ``deco_ops/kernels -> ../kernels`` link, and is checked to import its own
``deco_ops`` and kernels before anything runs. Each test selection first runs on the unmutated
copy (skip with ``--no-baseline``): a selection that fails, or selects nothing, there would make
its mutant look killed. A mutant is killed when its tests fail (pytest exit code 1) or crash the
interpreter; it survives when they pass. A run past ``--timeout`` is a *timeout*, not a kill: a
mutant that only makes the tests slow (an endless loop, a hang) was not caught by any assertion.

The score is killed / (mutants - errors): timeouts and survivors count against it, errors (pytest
could not run the selection) are left out and listed. The summary names the commit it ran at and
whether the working tree had changes. Runs on demand, not in CI; the process lowers its own
priority to nice 15 (the machine is shared).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent
NICENESS = 15
KILLED, SURVIVED, TIMEOUT, ERROR = "killed", "survived", "timeout", "error"


def repository_files(root: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore, relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and (root / p).is_file() and not (root / p).is_symlink()})


def scratch_copy(root: Path, dest: Path) -> Path:
    for rel in repository_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    link = dest / "deco_ops" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels")
    _check_imports_itself(dest)
    return dest


def _env() -> dict[str, str]:
    # No bytecode: a mutant and its restored original can share a size and an mtime second.
    return os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}


def _check_imports_itself(copy: Path) -> None:
    """The copy's ``deco_ops`` and ``deco_ops.kernels`` must be its own files, not an installed
    (e.g. editable) deco_ops's."""
    probe = "import deco_ops, deco_ops.kernels.activations as a, os; print(os.path.realpath(deco_ops.__file__)); print(os.path.realpath(a.__file__))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=_env(), capture_output=True, text=True, check=True).stdout.split()
    real = os.path.realpath(copy)
    expected = [os.path.join(real, "deco_ops", "__init__.py"), os.path.join(real, "kernels", "activations.py")]
    if out != expected:
        raise SystemExit(f"the scratch copy imports {out}, not its own files {expected}")


@dataclass
class Result:
    status: str
    detail: str
    seconds: float


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> Result:
    """pytest ``tests`` in ``copy``: KILLED on failures or a crash, SURVIVED when they pass,
    TIMEOUT past ``timeout`` seconds, ERROR when pytest could not run them (usage error, nothing
    selected, internal error)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return Result(TIMEOUT, f"no result after {timeout:.0f} s", time.monotonic() - start)
    seconds = time.monotonic() - start
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if proc.returncode == 0:
        return Result(SURVIVED, summary, seconds)
    if proc.returncode in (1, 2):  # test failures; 2: errors while collecting (an import broke)
        failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return Result(KILLED, (failed[0] if failed else summary)[:160], seconds)
    if proc.returncode < 0:
        return Result(KILLED, f"crashed with signal {-proc.returncode}", seconds)
    return Result(ERROR, f"pytest exit code {proc.returncode}: {summary}", seconds)


def apply(copy: Path, mutant: Mutant) -> str:
    """Plants ``mutant`` in ``copy``; returns the file's original text."""
    path = copy / mutant.file
    text = path.read_text()
    if text.count(mutant.original) != 1:
        raise SystemExit(f"{mutant.name}: the original snippet occurs {text.count(mutant.original)} times in {mutant.file}")
    path.write_text(text.replace(mutant.original, mutant.replacement))
    return text


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> Result:
    original = apply(copy, mutant)
    try:
        return run_tests(copy, mutant.tests, timeout)
    finally:
        (copy / mutant.file).write_text(original)


def _in_parallel(fn, items, copies: list[Path]):
    """``fn(copy, item)`` for each item, each copy used by one item at a time; yields (item, result)."""
    free: queue.Queue[Path] = queue.Queue()
    for c in copies:
        free.put(c)

    def task(item):
        copy = free.get()
        try:
            return fn(copy, item)
        finally:
            free.put(copy)

    with concurrent.futures.ThreadPoolExecutor(len(copies)) as pool:
        futures = {pool.submit(task, item): item for item in items}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def baseline(copies: list[Path], mutants: list[Mutant], timeout: float) -> bool:
    selections = sorted({m.tests for m in mutants})
    print(f"baseline: {len(selections)} test selections on the unmutated copy", flush=True)
    ok = True
    for tests, result in _in_parallel(lambda copy, t: run_tests(copy, t, timeout), selections, copies):
        passed = result.status == SURVIVED
        ok = ok and passed
        verdict = "passes" if passed else f"FAILS WITHOUT A MUTANT ({result.detail})"
        print(f"  {result.seconds:6.1f} s  {' '.join(tests)}: {verdict}", flush=True)
    return ok


def list_mutants(mutants: list[Mutant]) -> None:
    for m in mutants:
        print(f"{m.name}\n    {m.file}: {m.original!r} -> {m.replacement!r}\n    bug: {m.bug}\n    tests: {' '.join(m.tests)}")
        if m.equivalent:
            print(f"    equivalent: {m.equivalent}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these mutants (repeatable, or comma-separated)")
    parser.add_argument("--jobs", type=int, default=1, help="scratch copies run side by side (default 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run before it counts as a timeout (not a kill)")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each test selection unmutated first")
    args = parser.parse_args(argv)

    names = [n for arg in args.only for n in arg.split(",") if n]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)} (see --list)")
    mutants = [m for m in MUTANTS if not names or m.name in names]
    if args.list:
        list_mutants(mutants)
        return 0
    os.nice(max(0, NICENESS - os.nice(0)))
    ran_at = revision()  # the tree the scratch copies are made from (HEAD may move during a long run)

    with tempfile.TemporaryDirectory(prefix="deco_ops-mutants-") as tmp:
        copies = [scratch_copy(ROOT, Path(tmp) / f"copy{i}") for i in range(max(1, args.jobs))]
        if not args.no_baseline and not baseline(copies, mutants, args.timeout):
            print("fix the failing selections first: a mutant cannot be judged by tests that fail without it")
            return 2
        results: dict[str, Result] = {}
        for mutant, result in _in_parallel(lambda copy, m: run_mutant(copy, m, args.timeout), mutants, copies):
            results[mutant.name] = result
            print(f"{result.status:>8}  {mutant.name:<34} {result.seconds:6.1f} s  {result.detail}", flush=True)

    return summarize(mutants, results, ran_at)


def revision() -> str:
    """``<commit> (<date>)`` of the repository, ``+ uncommitted changes`` where the tree differs."""
    log = subprocess.run(["git", "log", "-1", "--format=%h (%cs)"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return log + (" + uncommitted changes" if dirty else "")


def score(results: dict[str, Result]) -> tuple[int, int]:
    """(killed, mutants judged): every mutant but the errors; timeouts and survivors are not kills."""
    statuses = [r.status for r in results.values()]
    return statuses.count(KILLED), len(statuses) - statuses.count(ERROR)


def summarize(mutants: list[Mutant], results: dict[str, Result], ran_at: str) -> int:
    """Prints the score and every mutant not killed; the exit status: 0 when each is killed or
    explained as equivalent."""
    by_status = {s: [m for m in mutants if results[m.name].status == s] for s in (KILLED, SURVIVED, TIMEOUT, ERROR)}
    killed, judged = score(results)
    equivalent = sum(1 for m in by_status[SURVIVED] if m.equivalent)
    print(f"\nmutation score at {ran_at}: {killed}/{judged} killed = {100 * killed / max(judged, 1):.1f}%"
          f" ({killed}/{judged - equivalent} = {100 * killed / max(judged - equivalent, 1):.1f}% of the non-equivalent);"
          f" {len(by_status[TIMEOUT])} timeouts, {len(by_status[SURVIVED])} survivors, {len(by_status[ERROR])} errors"
          f" of {len(mutants)} mutants")
    for m in by_status[SURVIVED]:
        reason = f"equivalent: {m.equivalent}" if m.equivalent else "NOT EXPLAINED: add a test that kills it, or say why it is equivalent"
        print(f"  survivor {m.name} ({m.file}): {m.bug}\n      {reason}")
    for m in by_status[TIMEOUT]:
        print(f"  timeout {m.name} ({m.file}): {results[m.name].detail}; not a kill: make a test fail on it, or raise --timeout")
    for m in by_status[ERROR]:
        print(f"  error {m.name}: {results[m.name].detail}")
    unexplained = [m for m in by_status[SURVIVED] if not m.equivalent]
    return 1 if by_status[ERROR] or by_status[TIMEOUT] or unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
