"""The README's Python examples run as written (default backend: the reference path on a CPU),
on CPU tensors also where the suite's tensors default to a GPU (the examples use CPU autocast):
conftest's ``auto_backend`` and ``cpu_tensors``."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(cpu_tensors, auto_backend):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    exec(compile("\n".join(blocks), str(README), "exec"), {})
