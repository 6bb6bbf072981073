"""``python -m benchmarks.profile_ops`` runs (here on the CPU's tiny shapes) and reports each piece
and each case, so the GPU run's one call of it cannot fail on the script."""

import deco_ops

from . import profile_ops


def test_profile_ops_reports_pieces_and_cases(tmp_path):
    out = tmp_path / "profile.txt"
    with deco_ops.use_backend("auto"):  # the PyTorch path on a CPU, as a user's run there (not the interpreter)
        assert profile_ops.main(["--shapes", "infer_b1", "--directions", "fwd", "--impls", "deco_ops", "eager",
                                 "--calls", "2", "--out", str(out)]) == 0
    text = out.read_text()
    for line in ("strategy.make_key", "deco_ops.pool_mlp, no grad", "pool_mlp-infer_b1-fwd", "deco_ops: profiler, by host time",
                 "deco_ops: Python functions"):
        assert line in text, line
    rows = [r for r in text.splitlines() if r.startswith("pool_mlp-infer_b1-fwd ")]
    assert {r.split()[1] for r in rows} == {"deco_ops", "eager"}
    assert all(float(r.split()[2]) > 0 for r in rows)  # host_us measured
