"""``python -m benchmarks.host_cost`` runs and reports ours against eager for each case and mode
(two rounds here: a smoke test of the script, not a measurement)."""

import torch

import deco_ops

from . import host_cost


def test_host_cost_reports_every_mode(capsys):
    threads = torch.get_num_threads()
    try:
        with deco_ops.use_backend("auto"):
            assert host_cost.main(["--ops", "pool_mlp", "cross_attention", "--rounds", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("pool_mlp ", "cross_attention "))]
    assert [(r[0], r[1]) for r in rows] == [(op, mode) for op in ("pool_mlp", "cross_attention") for mode in host_cost.MODES]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and int(r[5]) > 0 for r in rows)
