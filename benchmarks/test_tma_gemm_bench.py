"""``python -m benchmarks.tma_gemm`` runs (here on tiny shapes through Triton's interpreter, as the
tests run the kernels) and prints every candidate with a small error, so the GPU run's one call of
it cannot fail on the script."""

import re

import pytest

from deco_ops import _backend

from . import tma_gemm


@pytest.mark.skipif(not _backend.interpreting(), reason="the CPU smoke run needs Triton's interpreter")
def test_tma_gemm_bench_prints_every_candidate(capsys):
    assert tma_gemm.main() == 0
    text = capsys.readouterr().out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([^|]+?) \| ([^|]+?) \|", text, re.M)
            if not m.group(1).startswith(("candidate", "---"))}
    assert set(rows) == {"tma_linear_act (gelu, pre kept)", "F.linear (cuBLAS floor)", "F.linear + F.gelu (composed)",
                         "tma_gemm_act_grad", "gemm_act_grad (current fused)", "dy @ w2 (cuBLAS floor)",
                         "reference.mlp_activation_backward (composed)"}
    for name in ("tma_linear_act (gelu, pre kept)", "tma_gemm_act_grad", "gemm_act_grad (current fused)"):
        assert float(rows[name]) < 5e-3, (name, rows[name])
