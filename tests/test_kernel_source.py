"""Rules read from the kernels' source, for what the interpreter cannot show."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_every_masked_load_says_what_masked_lanes_hold():
    """A masked ``tl.load`` without ``other=`` leaves its masked lanes undefined on a GPU, and a
    reduction over the tile (a pooling window, a dot) sums whatever they hold; Triton's
    interpreter fills them with zeros, so no CPU test can see a missing ``other=``."""
    missing = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
                keywords = {k.arg for k in node.keywords}
                if "mask" in keywords and "other" not in keywords:
                    missing.append(f"{path.name}:{node.lineno}")
    assert not missing, f"masked tl.load without other=: {missing}"
