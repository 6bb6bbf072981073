"""pytest-benchmark plumbing for the benchmark suite.

``pytest benchmarks/`` times every named shape: the real shapes in bf16 on CUDA, their tiny twins
in fp32 on CPU (one round each, so CI only proves the code runs). Every benchmark of one op, shape
and direction shares a group (``<op>-<shape>-<direction>``) holding deco_ops and its baselines, so
``--benchmark-group-by=group`` tables and ``--benchmark-json`` carry the ratios of one run.
On CUDA the timed call synchronises before it returns.

The deco_ops backend inside the timed calls is ``auto`` whatever ``DECO_OPS_BACKEND`` says (the
correctness suite in ``tests/`` sets it to ``triton``): Triton kernels on CUDA, the PyTorch
reference on CPU, so the CPU run stays cheap. ``DECO_OPS_BENCH_BACKEND`` overrides it.
"""

from __future__ import annotations

import os

import pytest
import torch

from . import cases


@pytest.fixture(scope="session")
def bench_env():
    env = cases.Env.default(backend=os.environ.get("DECO_OPS_BENCH_BACKEND", "auto"))
    threads = torch.get_num_threads()
    if env.device.type == "cpu":
        torch.set_num_threads(1)
    yield env
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _group_cache():
    cache: dict = {}
    yield cache
    cache.clear()


@pytest.fixture
def bench_group(bench_env, _group_cache):
    """``bench_group(shape, direction) -> cases.Group`` (built once per shape; skips a shape `cases` reports unavailable)."""

    def get(shape: str, direction: str) -> cases.Group:
        if shape not in _group_cache:
            _group_cache.clear()  # one shape's tensors at a time
            try:
                _group_cache[shape] = {g.direction: g for g in cases.groups_for(shape, bench_env, cases.DIRECTIONS)}
            except cases.Unavailable as e:
                _group_cache[shape] = e
        entry = _group_cache[shape]
        if isinstance(entry, Exception):
            pytest.skip(str(entry))
        if direction not in entry:
            pytest.skip(f"{shape} has no {direction} direction")
        return entry[direction]

    return get


@pytest.fixture
def run_case(benchmark, bench_env):
    """``run_case(group, impl)``: times one implementation of a group with pytest-benchmark."""

    def run(group: cases.Group, impl: str):
        try:
            runner = group.impls[impl]()
        except cases.Unavailable as e:
            pytest.skip(str(e))
        benchmark.group = group.key
        benchmark.extra_info.update(op=group.op, shape=group.shape, direction=group.direction, impl=impl,
                                    flops=group.flops, bytes=group.bytes, desc=group.shape_obj.describe(),
                                    dtype=str(bench_env.dtype))
        device = bench_env.device
        if device.type == "cuda":
            def timed():
                out = runner.run()
                torch.cuda.synchronize(device)
                return out

            benchmark.pedantic(timed, rounds=25, warmup_rounds=5, iterations=1)
        else:
            benchmark.pedantic(runner.run, rounds=1, warmup_rounds=0, iterations=1)
        runner.reset()

    return run
