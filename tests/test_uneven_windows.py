"""Pooling windows of different sizes along every axis, time included, through every pooling path
of the Triton kernels, forward and backward, against float64 PyTorch.

Adaptive pooling's windows are uneven when the output does not divide the input (5 -> 3: sizes
2, 3, 2; 3 -> 5: 1, 2, 1, 2, 1). Every path masks each row's window inside a loop over the
largest one, so a mask or a count that drops one axis is only wrong where that axis's windows
differ in size. The other suites' 3D grids have equal time windows: dropping the time term of
pool_gemm's window mask was caught only by the fuzzer, and flakily (issue 14). Here every case is
deterministic.

Paths: the pooling kernel and its un-pooling gather; pool_gemm's unrolled window loads (dense,
``pool_linear``/``pool_mlp``) and its runtime window loops (taken on a GPU when the windows are
too large to unroll; forced here); ``pool_mlp``'s composed twin (pooling kernel, then
``F.linear``); the packed kernels (``*_packed``, both modes) and the packed
pool+GEMM; ``mlp_pool``'s pooled second GEMM and its fused un-pool + act' backward.
"""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import deco_ops
from deco_ops import _plan, pooling, reference
from deco_ops.kernels import adaptive_pool, pool_gemm
from harness import assert_close, guarded, leaf, poisoned_empty, randn
from test_packed import _t, loop64

pytestmark = pytest.mark.usefixtures("triton_backend")

# ids: the window sizes along each axis
CASES = [
    pytest.param((5, 2, 5), (3, 3, 3), id="t2,3,2-h1,2,1-w2,3,2"),
    pytest.param((5, 4, 6), (3, 2, 3), id="t2,3,2-h2,2-w2,2,2"),  # a video grid of 2 x 3 cells: OH != OW
    pytest.param((5, 7), (3, 4), id="h2,3,2-w2,3,3,2"),
]
C, HIDDEN, OUT = 3, 8, 5


@pytest.fixture
def triton_backend():
    with deco_ops.use_backend("triton"):
        yield


def window_sizes(L: int, O: int) -> list[int]:
    return [-(-(i + 1) * L // O) - i * L // O for i in range(O)]


@pytest.mark.parametrize("grid,out_grid", CASES)
def test_cases_have_uneven_windows(grid, out_grid):
    """The time axis (and in the first case every axis) has windows of different sizes."""
    sizes = [set(window_sizes(L, O)) for L, O in zip(grid, out_grid)]
    assert len(sizes[0]) > 1
    assert grid != (5, 2, 5) or all(len(s) > 1 for s in sizes)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [randn(HIDDEN, C, scale=C**-0.5, generator=g), randn(HIDDEN, generator=g),
            randn(OUT, HIDDEN, scale=HIDDEN**-0.5, generator=g), randn(OUT, generator=g)]


def _run(fn, inputs, dy):
    """fn(*leaves) on NaN-guarded leaves with NaN-poisoned outputs; (y, grads)."""
    leaves = [leaf(guarded(t)) for t in inputs]
    with poisoned_empty():
        y = fn(*leaves)
        y.backward(guarded(dy))
    return y, [t.grad for t in leaves]


def _reference(fn64, inputs, dy):
    leaves = [leaf(t, torch.float64) for t in inputs]
    y = fn64(*leaves)
    y.backward(dy.double())
    return y, [t.grad for t in leaves]


def _compare(got, want, names):
    assert_close(got[0], want[0], torch.float32, "y")
    for name, g, w in zip(names, got[1], want[1]):
        assert_close(g, w, torch.float32, f"grad {name}")


def _pool64(x, grid, out_grid):
    return reference.adaptive_avg_pool_tokens(x, grid, out_grid)


@pytest.mark.parametrize("grid,out_grid", CASES)
def test_pool_tokens(grid, out_grid):
    x, dy = randn(1, math.prod(grid), C), randn(1, math.prod(out_grid), C)
    got = _run(lambda x: deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid), [x], dy)
    _compare(got, _reference(lambda x: _pool64(x, grid, out_grid), [x], dy), ["x"])


@pytest.mark.parametrize("grid,out_grid", CASES)
def test_pool_linear_unrolled_windows(grid, out_grid):
    x, (w, b, _, _) = randn(1, math.prod(grid), C), _params()
    dy = randn(1, math.prod(out_grid), HIDDEN)
    got = _run(lambda x, w, b: deco_ops.pool_linear(x, w, b, grid=grid, out_grid=out_grid), [x, w, b], dy)
    want = _reference(lambda x, w, b: F.linear(_pool64(x, grid, out_grid), w, b), [x, w, b], dy)
    _compare(got, want, ["x", "w", "b"])


@pytest.mark.parametrize("path", ["unrolled", "runtime_loops", "composed"])
@pytest.mark.parametrize("grid,out_grid", CASES)
def test_pool_mlp(grid, out_grid, path, monkeypatch, request):
    if path == "runtime_loops":  # what a GPU runs when no tile can stage the unrolled window taps
        monkeypatch.setattr(pool_gemm, "unrolled_windows_fit", lambda x, taps: False)
    strategy = "composed" if path == "composed" else "fused"
    if path == "composed":  # the twin with the pooling kernel, then F.linear (auto's pick where each times faster)
        monkeypatch.setattr(pooling, "pool_implementation", lambda *args: pooling._pool_kernel)
        _plan.clear()  # a plan keeps the pooling choice it was built with
        request.addfinalizer(_plan.clear)
    inputs = [randn(1, math.prod(grid), C), *_params()]
    dy = randn(1, math.prod(out_grid), OUT)
    with deco_ops.use_strategy(strategy), mock.patch.object(adaptive_pool, "pool_tokens", wraps=adaptive_pool.pool_tokens) as kernel:
        got = _run(lambda *p: deco_ops.pool_mlp(*p, grid=grid, out_grid=out_grid), inputs, dy)
    assert kernel.called == (path == "composed")  # fused: pool_gemm pools in its operand loads
    want = _reference(lambda *p: reference.pool_mlp(*p, grid, out_grid), inputs, dy)
    _compare(got, want, ["x", "w1", "b1", "w2", "b2"])


def _packed_grids(grid, out_grid):
    """This case's grid and a second, smaller image of the same rank (uneven too)."""
    other = ((3, 2, 3), (2, 3, 2)) if len(grid) == 3 else ((5, 3), (3, 2))
    return [grid, other[0]], [out_grid, other[1]]


@pytest.mark.parametrize("mode", ["average", "bilinear"])
@pytest.mark.parametrize("grid,out_grid", CASES)
def test_pool_tokens_packed(grid, out_grid, mode):
    grids, outs = _packed_grids(grid, out_grid)
    x, dy = randn(sum(map(math.prod, grids)), C), randn(sum(map(math.prod, outs)), C)
    op = deco_ops.adaptive_avg_pool_tokens_packed if mode == "average" else deco_ops.bilinear_pool_tokens_packed
    got = _run(lambda x: op(x, _t(grids), out_grids=_t(outs))[0], [x], dy)
    _compare(got, _reference(lambda x: loop64(x, grids, outs, mode), [x], dy), ["x"])


@pytest.mark.parametrize("grid,out_grid", CASES)
def test_pool_mlp_packed(grid, out_grid):
    grids, outs = _packed_grids(grid, out_grid)
    inputs = [randn(sum(map(math.prod, grids)), C), *_params()]
    dy = randn(sum(map(math.prod, outs)), OUT)
    got = _run(lambda x, *p: deco_ops.pool_mlp_packed(x, _t(grids), *p, out_grids=_t(outs))[0], inputs, dy)
    want = _reference(lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(loop64(x, grids, outs, "average"), w1, b1)), w2, b2),
                      inputs, dy)
    _compare(got, want, ["x", "w1", "b1", "w2", "b2"])


@pytest.mark.parametrize("grid,out_grid", CASES)
def test_mlp_pool(grid, out_grid):
    inputs = [randn(2, math.prod(grid), C), *_params()]
    dy = randn(2, math.prod(out_grid), OUT)
    got = _run(lambda *p: deco_ops.mlp_pool(*p, grid=grid, out_grid=out_grid), inputs, dy)
    want = _reference(lambda x, w1, b1, w2, b2: _pool64(F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), grid, out_grid), inputs, dy)
    _compare(got, want, ["x", "w1", "b1", "w2", "b2"])
