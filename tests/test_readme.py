"""The README's Python examples run as written (default backend: the reference path on a CPU)."""

import re
from pathlib import Path

import deco_ops

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    with deco_ops.use_backend("auto"):
        exec(compile("\n".join(blocks), str(README), "exec"), {})
