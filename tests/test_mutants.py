"""The mutation harness's list stays runnable (``python -m tools.mutate`` itself runs on demand,
not in CI): every mutant's snippet occurs exactly once in its file, every selection names test
files that exist, and the list reaches every kernel file and every autograd formula."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # tools/ is a folder of the repository, not an installed package

from tools.mutants import MUTANTS  # noqa: E402


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_snippet_occurs_once(mutant):
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.original) == 1, f"{mutant.file}: the snippet must occur exactly once; update tools/mutants.py"
    assert mutant.replacement != mutant.original and mutant.bug


def test_the_list():
    assert len(MUTANTS) >= 30
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
    for m in MUTANTS:
        files = [t for t in m.tests if t.startswith("tests/")]
        assert files and all((ROOT / t.split("::")[0]).exists() for t in files), m.name


def test_every_kernel_file_and_autograd_formula_has_a_mutant():
    mutated = {m.file for m in MUTANTS}
    kernels = {f"kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py") if re.search(r"^@triton\.jit", p.read_text(), re.M)}
    formulas = {f"deco_ops/{p.name}" for p in (ROOT / "deco_ops").glob("*.py") if re.search(r"\.register_autograd\(", p.read_text())}
    assert kernels and formulas
    assert not kernels - mutated, f"kernel files without a mutant: {sorted(kernels - mutated)}"
    assert not formulas - mutated, f"autograd formulas without a mutant: {sorted(formulas - mutated)}"


def test_a_timeout_is_not_a_kill(tmp_path, capsys):
    """A selection that hangs is reported as a timeout, counts against the score and fails the
    run; errors (selections pytest could not run) are left out of the score."""
    from tools.mutate import ERROR, KILLED, SURVIVED, TIMEOUT, Result, run_tests, score, summarize

    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hang():\n    time.sleep(60)\n")
    assert run_tests(tmp_path, ("test_hang.py",), timeout=2).status == TIMEOUT
    mutants = MUTANTS[:4]
    results = {m.name: Result(s, "", 1.0) for m, s in zip(mutants, (KILLED, TIMEOUT, SURVIVED, ERROR))}
    assert score(results) == (1, 3)
    assert summarize(mutants, results, "abc1234 (2026-12-03)") == 1
    out = capsys.readouterr().out
    assert "at abc1234 (2026-12-03): 1/3 killed = 33.3%" in out and f"timeout {mutants[1].name}" in out
