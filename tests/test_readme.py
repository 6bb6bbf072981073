"""The README's Python examples run as written (default backend: the reference path on a CPU),
on CPU tensors also where the suite's tensors default to a GPU (the examples use CPU autocast)."""

import re
from pathlib import Path

import torch

import deco_ops

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    with deco_ops.use_backend("auto"), torch.device("cpu"):
        exec(compile("\n".join(blocks), str(README), "exec"), {})
