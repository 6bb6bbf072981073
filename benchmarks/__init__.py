"""deco_ops benchmarks: named real-model shapes (``shapes``), FLOP/byte counts per op (``counts``),
the cases that time deco_ops against its baselines (``cases``), the pytest-benchmark suite
(``test_bench_*.py``) and the one-command report (``python -m benchmarks``)."""
