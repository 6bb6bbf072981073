"""pytest-benchmark: deco_ops.merge_mlp against the HF patch mergers' own code path
(Qwen2-VL / Qwen2.5-VL ``PatchMerger``, InternVL's pixel_shuffle + projector) and torch.compile of
it, forward and forward+backward, every named merge shape."""

import pytest
import torch

from . import cases, shapes

CASES = [(s, d, i) for s in shapes.MERGE for d in cases.DIRECTIONS for i in cases.POOL_IMPLS]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape,direction,impl", CASES, ids=["-".join(c) for c in CASES])
def test_merge_mlp(bench_group, run_case, shape, direction, impl):
    run_case(bench_group(shape, direction), impl)


@pytest.mark.parametrize("shape", list(shapes.MERGE))
def test_merge_mlp_agrees_with_eager(bench_group, bench_env, shape):
    """The timed deco_ops call and the HF-style eager baseline compute the same thing."""
    group = bench_group(shape, "fwd")
    deco = group.impls["deco_ops"]().output()
    eager = group.impls["eager"]().output()
    assert deco.shape == eager.shape
    err = ((deco.double() - eager.double()).norm() / eager.double().norm()).item()
    assert err <= TOL[bench_env.dtype], f"{shape}: relative error {err:.2e}"
