"""``python -m deco_ops.aot --doc``: the compile table in docs/aot.md is generated from a run (or a
saved ``--json``), replacing only the marked block, never the notes around it."""

import json
import os
from pathlib import Path

import pytest

from deco_ops import aot

DOC = Path(__file__).resolve().parents[1] / "docs" / "aot.md"


def _row(variant, registers, spill=0, arch=90, kernel="pool_gemm", hopper=False):
    """A saved row; ``hopper``: a TMA, warp-specialised kernel whose warpgroups resize to 40 and 232 registers."""
    return dict(kernel=kernel, config="M64 N64 K32 G8 w4 s3", variant=variant, arch=arch, target=f"sm_{arch}",
                registers=registers, spill_stores=spill, spill_loads=spill, local_bytes=spill, shared_bytes=50176,
                hgmma=True, expect_hgmma=True, tma=hopper, warp_specialized=hopper,
                warpgroup_registers=[40, 232] if hopper else [], error="", problems=[])


def test_doc_block_is_regenerated_and_notes_are_kept(tmp_path):
    rows = [_row("bf16 quick_gelu 2x2", 170), _row("bf16 gelu 2x2", 168), _row("bf16 silu 2x2", 160, spill=8, arch=80),
            _row("bf16 bias_act gelu", 168, kernel="tma_gemm", hopper=True), _row("fp32/ieee gelu 2x2", 180),
            _row("fp32/tf32 gelu 2x2", 190)]
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps({"triton_version": "3.9.0", "elapsed_s": 1.0, "rows": rows}))
    doc = tmp_path / "aot.md"
    doc.write_text(f"# notes before\n\n{aot.DOC_BEGIN}\nstale table\n{aot.DOC_END}\n\nnotes after\n")
    assert aot.main(["--summary", str(saved), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# notes before\n") and text.endswith("\nnotes after\n") and "stale table" not in text
    block = text.split(aot.DOC_BEGIN)[1].split(aot.DOC_END)[0]
    assert "| bf16 | pool_gemm | M64 N64 K32 G8 w4 s3 | 2 | quick_gelu 2x2 | 170 | 0/0 | 50176 | yes | - | - | ok |" in block
    assert "| bf16 | tma_gemm | M64 N64 K32 G8 w4 s3 | 1 | bias_act gelu | 168 | 0/0 | 50176 | yes | yes | yes (40/232) | ok |" in block
    assert "sm_80 bf16: 1 compiles, 1 with problems (0 errors, 1 spill" in block
    # exact fp32 (PyTorch's default), not tf32: the doc's table is the one users run
    assert "| fp32/ieee | pool_gemm | M64 N64 K32 G8 w4 s3 | 1 | gelu 2x2 | 180 |" in block and "| fp32/tf32 |" not in block


def test_committed_doc_has_the_generated_block():
    text = DOC.read_text()
    assert text.count(aot.DOC_BEGIN) == 1 and text.count(aot.DOC_END) == 1
    assert "| dtype | kernel | config |" in text.split(aot.DOC_BEGIN)[1]


def test_rows_saved_before_the_tma_columns_show_unknown():
    row = _row("bf16 gelu 2x2", 168)
    for field in ("tma", "warp_specialized", "warpgroup_registers"):
        del row[field]
    table = aot.summary({"rows": [row]})
    assert "| bf16 | pool_gemm | M64 N64 K32 G8 w4 s3 | 1 | gelu 2x2 | 168 | 0/0 | 50176 | yes | ? | ? | ok |" in table
    assert "| pool_gemm | bf16 gelu 2x2 | M64 N64 K32 G8 w4 s3 | sm_90 | 168 | 0/0 | 50176 | - | yes | ? | ? |" in aot.markdown(
        [dict(row, mma="", compile_s=1.0)])


def test_an_unknown_or_empty_activation_list_is_refused_before_any_compile(capsys, monkeypatch):
    monkeypatch.delenv("DECO_OPS_AOT_ACTIVATIONS", raising=False)
    for value in ("gelu,relu", ","):
        with pytest.raises(SystemExit):
            aot.main(["--activations", value])
        assert "--activations: unknown or none" in capsys.readouterr().err
    assert "DECO_OPS_AOT_ACTIVATIONS" not in os.environ
