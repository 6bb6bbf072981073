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
    """The table compares two implementations: deco_ops's attention and transformers' eager one
    each run (an example comparing deco_ops with itself would print zeros)."""
    from transformers.models.blip_2 import modeling_blip_2

    from deco_ops.integrations.transformers import attention as hf_attention

    with mock.patch.object(modeling_blip_2, "eager_attention_forward", wraps=modeling_blip_2.eager_attention_forward) as eager, \
            mock.patch.object(hf_attention, "cross_attention", wraps=hf_attention.cross_attention) as ours:
        _run("blip2_qformer.py")
    assert eager.call_count > 0 and ours.call_count > 0
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


def test_compressors_saved_bytes_are_the_harness_count():
    """The table's bytes kept for backward: what autograd saves, parameters excluded (the harness's
    count), for both compressors."""
    sys.modules.pop("compressors", None)
    import compressors
    from harness import randn, saved_bytes

    torch.manual_seed(0)
    x = randn(2, 36, 8, generator=torch.Generator().manual_seed(1))
    for module in (deco_ops.DeCoProjector(8, 16, grid=(6, 6), out_grid=(3, 3)), deco_ops.QueryResampler(9, 16, 8, 2)):
        got = compressors.saved_bytes(module, x)
        assert got > 0 and got == saved_bytes(lambda: module(x), module.parameters()), type(module).__name__


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
