"""pytest-benchmark: deco_ops.cross_attention against F.scaled_dot_product_attention (each backend
forced in turn), the BLIP-2 eager softmax attention and torch.compile of it, forward and
forward+backward, every named shape."""

import pytest
import torch

from . import cases, shapes

DIRECTIONS = ("fwd", "fwd_bwd")
CASES = [(s, d, i) for s in shapes.CROSS_ATTENTION for d in DIRECTIONS for i in cases.ATTENTION_IMPLS]


@pytest.mark.parametrize("shape,direction,impl", CASES, ids=["-".join(c) for c in CASES])
def test_cross_attention(bench_group, run_case, shape, direction, impl):
    run_case(bench_group(shape, direction), impl)


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("shape", list(shapes.CROSS_ATTENTION))
def test_cross_attention_agrees_with_eager(bench_group, bench_env, shape):
    """deco_ops, SDPA and the eager softmax attention compute the same thing on the same inputs."""
    group = bench_group(shape, "fwd")
    eager = group.impls["eager_softmax"]().output().double()
    impls = ["deco_ops", "sdpa_math"]
    for impl in impls:
        try:
            out = group.impls[impl]().output().double()
        except cases.Unavailable:
            continue
        err = ((out - eager).norm() / eager.norm()).item()
        # the eager path masks with BLIP-2's additive -10000, which is exact in fp32/bf16 after softmax
        assert err <= TOL[bench_env.dtype], f"{shape} {impl}: relative error {err:.2e}"
