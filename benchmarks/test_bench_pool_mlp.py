"""pytest-benchmark: deco_ops.pool_mlp (and mlp_pool / pool_mlp_packed) against DeCo's
eager AvgPoolProjector and torch.compile of it, forward and forward+backward, every named shape."""

import pytest
import torch

from . import cases, shapes

DIRECTIONS = ("fwd", "fwd_bwd")
POOL_SHAPES = list(shapes.POOL_MLP) + list(shapes.PACKED) + list(shapes.MLP_POOL)
CASES = [(s, d, i) for s in POOL_SHAPES for d in DIRECTIONS
         for i in cases.POOL_IMPLS + (("deco_ops_padded",) if s in shapes.PACKED else ())]


@pytest.mark.parametrize("shape,direction,impl", CASES, ids=["-".join(c) for c in CASES])
def test_pool_mlp(bench_group, run_case, shape, direction, impl):
    run_case(bench_group(shape, direction), impl)


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_pool_mlp_agrees_with_eager(bench_group, bench_env, shape):
    """The timed deco_ops call and the eager baseline compute the same thing on the same weights."""
    group = bench_group(shape, "fwd")
    try:
        deco = group.impls["deco_ops"]().output()
    except cases.Unavailable as e:
        pytest.skip(str(e))
    eager = group.impls["eager"]().output()
    assert deco.shape == eager.shape
    err = ((deco.double() - eager.double()).norm() / eager.double().norm()).item()
    assert err <= TOL[bench_env.dtype], f"{shape}: relative error {err:.2e}"
