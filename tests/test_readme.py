"""The README and the pages under docs/: their Python examples run as written (default backend: the
reference path on a CPU), on CPU tensors also where the suite's tensors default to a GPU (the
examples use CPU autocast): conftest's ``auto_backend`` and ``cpu_tensors``. A ```` ```python ````
block runs (each file's blocks in order, in one namespace per file); a ```` ```py ```` block is
shown, not run (it downloads weights or needs CUDA). The results tables are the generated ones:
each equals what ``python -m benchmarks.readme_table`` makes from the results folder it names."""

import json
import re
from pathlib import Path

import pytest

from benchmarks import readme_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = re.compile(r"```python\n(.*?)```", re.S)
PAGES = [p for p in [README, *sorted((ROOT / "docs").glob("*.md"))] if EXAMPLE.search(p.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_examples_run(page, cpu_tensors, auto_backend):
    exec(compile("\n".join(EXAMPLE.findall(page.read_text())), str(page), "exec"), {})



def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert len(EXAMPLE.findall(text)) >= 3, "a quick start per compressor family"
    # the commands CI runs (.ci/run), as the README gives them
    ci = (ROOT / ".ci" / "run").read_text().replace(" -q", "")
    for command in ('pip install torch==2.13.0', 'pip install -e ".[dev]"', "python -m pytest -n 2 --dist loadscope"):
        assert command in text and command in ci, command
    links = set(re.findall(r"\]\((docs/[^)#]+)", text))
    assert links >= {"docs/strategy.md", "docs/aot.md", "docs/masks.md", "docs/cuda-graphs.md", "docs/host-path.md"}
    for link in links:
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page,section", [(README, "results"), (ROOT / "docs" / "results-history.md", "cpu-path")],
                         ids=["README results", "docs/results-history.md cpu-path"])
def test_results_tables_are_generated_from_their_folders(page, section):
    begin, end = readme_table.SECTIONS[section]
    text = page.read_text()
    assert text.count(begin) == 1 and text.count(end) == 1
    block = text.split(begin)[1].split(end)[0]
    folder = re.search(r"\[full tables\]\((.+?)/results\.md\)", block).group(1)
    data = json.loads((page.parent / folder / "results.json").read_text())
    generate = readme_table.cpu_path_table if section == "cpu-path" else readme_table.table
    assert block.strip("\n") == generate(data, folder).strip("\n")
