"""``python -m deco_ops.aot --doc``: the compile table in docs/aot.md is generated from a run (or a
saved ``--json``), replacing only the marked block, never the notes around it."""

import json
from pathlib import Path

from deco_ops import aot

DOC = Path(__file__).resolve().parents[1] / "docs" / "aot.md"


def _row(variant, registers, spill=0, arch=90):
    return dict(kernel="pool_gemm", config="M64 N64 K32 G8 w4 s3", variant=variant, arch=arch, target=f"sm_{arch}",
                registers=registers, spill_stores=spill, spill_loads=spill, local_bytes=spill, shared_bytes=50176,
                hgmma=True, expect_hgmma=True, error="", problems=[])


def test_doc_block_is_regenerated_and_notes_are_kept(tmp_path):
    rows = [_row("bf16 quick_gelu 2x2", 170), _row("bf16 gelu 2x2", 168), _row("bf16 silu 2x2", 160, spill=8, arch=80)]
    saved = tmp_path / "rows.json"
    saved.write_text(json.dumps({"triton_version": "3.9.0", "elapsed_s": 1.0, "rows": rows}))
    doc = tmp_path / "aot.md"
    doc.write_text(f"# notes before\n\n{aot.DOC_BEGIN}\nstale table\n{aot.DOC_END}\n\nnotes after\n")
    assert aot.main(["--summary", str(saved), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# notes before\n") and text.endswith("\nnotes after\n") and "stale table" not in text
    block = text.split(aot.DOC_BEGIN)[1].split(aot.DOC_END)[0]
    assert "| bf16 | pool_gemm | M64 N64 K32 G8 w4 s3 | 2 | quick_gelu 2x2 | 170 | 0/0 | 50176 | yes | ok |" in block
    assert "sm_80 bf16: 1 compiles, 1 with problems (0 errors, 1 spill" in block


def test_committed_doc_has_the_generated_block():
    text = DOC.read_text()
    assert text.count(aot.DOC_BEGIN) == 1 and text.count(aot.DOC_END) == 1
    assert "| dtype | kernel | config |" in text.split(aot.DOC_BEGIN)[1]
