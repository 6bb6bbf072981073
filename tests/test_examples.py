"""Every script in examples/ runs as a user would run it (its ``__main__``, on the default CPU
path) and prints what it promises; the compressors example's FLOP formulas agree with PyTorch's
FLOP counter on eager equivalents."""

import math
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import deco_ops

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    with deco_ops.use_backend("auto"):
        yield


def _run(script: str, *args: str) -> None:
    with mock.patch.object(sys, "argv", [str(EXAMPLES / script), *args]):
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_llava_deco(capsys):
    _run("llava_deco.py")
    out = capsys.readouterr().out
    assert "<image> tokens per image: 64 -> 16" in out
    assert "projector grad torch.float32 (weights torch.float32), finite: True" in out
    assert "generate: [" in out


def test_blip2_qformer_parity_printed(capsys):
    _run("blip2_qformer.py")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| none", "| padding"))]
    assert len(rows) == 2
    for row in rows:
        errors = [float(cell) for cell in row.strip("|").split("|")[1:]]
        assert len(errors) == 4 and max(errors) < 1e-5, row


def test_compressors_table_and_png(tmp_path, capsys):
    png = tmp_path / "plots" / "compressors.png"
    _run("compressors.py", str(png), "--preset", "small", "--batch", "1", "--reps", "1")
    out = capsys.readouterr().out
    assert "| DeCo (2x2 pool + MLP) |" in out and "| Q-Former resampler |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compressors_flop_formulas_match_the_flop_counter():
    sys.modules.pop("compressors", None)
    import compressors

    B, N, P, C, D, H = 2, 36, 9, 8, 16, 4
    x = torch.randn(B, N, C)
    w1, w2, wq, wk, wv, wo = (torch.randn(D, C if i in (0, 3, 4) else D) for i in range(6))
    queries = torch.randn(P, D)
    with FlopCounterMode(display=False) as counter:
        pooled = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(B, C, 6, 6), (3, 3)).flatten(2).transpose(1, 2)
        F.linear(F.gelu(F.linear(pooled, w1)), w2)
    assert counter.get_total_flops() == compressors.deco_flops(B, N, P, C, D) - B * N * C  # pooling adds are not matmuls
    with FlopCounterMode(display=False) as counter:
        q = F.linear(queries, wq).view(1, H, P, D // H).expand(B, -1, -1, -1)
        k, v = (F.linear(x, w).view(B, N, H, D // H).transpose(1, 2) for w in (wk, wv))
        attention = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        F.linear(attention.transpose(1, 2).reshape(B, P, D), wo)
    assert counter.get_total_flops() == compressors.resampler_flops(B, N, P, C, D)
    assert math.prod(compressors.OUT_GRID) == 144
