"""``python -m deco_ops.aot``: every kernel compiles for sm_90 and sm_80 without spills, and the
fp16/bf16 GEMMs use Hopper's wgmma (HGMMA) on sm_90. No GPU needed (triton.compile + cuobjdump).

The test compiles a subset (the GEMM kernels in fp16/bf16 and the pooling kernels) to stay fast
on 2 CPU cores; the full run is ``python -m deco_ops.aot``. It runs the tool from this process's
environment, which has TRITON_INTERPRET=1 under the test suite: the tool must re-run itself with
compiled Triton.
"""

import json
import subprocess
import sys

import pytest

KERNELS = "pool_gemm,gemm_act_grad,pool_tokens,unpool_tokens"


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "deco_ops.aot", "--kernels", KERNELS, "--dtypes", "fp16,bf16", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_aot_succeeds(aot_run):
    proc, data = aot_run
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert data is not None and data["rows"]


def test_aot_rows_cover_both_targets_and_have_no_spills(aot_run):
    _, data = aot_run
    rows = data["rows"]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["kernel"] for r in rows} == set(KERNELS.split(","))
    for r in rows:
        assert not r["error"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r


def test_aot_gemms_use_hgmma_on_sm90(aot_run):
    _, data = aot_run
    gemm = [r for r in data["rows"] if r["kernel"] in ("pool_gemm", "gemm_act_grad") and r["target"] == "sm_90"]
    assert gemm
    for r in gemm:  # every config has BLOCK_M >= 64 and num_warps % 4 == 0: wgmma-eligible
        assert r["expect_hgmma"], r
        assert r["hgmma"], f"no HGMMA in sm_90 SASS of {r['kernel']} {r['variant']} {r['config']}"
