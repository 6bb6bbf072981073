"""The suite's interpreter shim (``interpreter_speed``): the same bits as Triton's own interpreter,
with one patch of ``triton.language`` per launch instead of one per helper call."""

from unittest import mock

import pytest
import torch

import deco_ops
import interpreter_speed
from harness import randn

pytestmark = pytest.mark.interpreter_only


def _interpreter():
    from triton.runtime import interpreter

    return interpreter


def _pool_mlp_and_attention(seed: int):
    """Outputs and gradients of kernels that call ``@triton.jit`` helpers (window bounds,
    activations, dots): a projector over overlapping windows, and cross-attention."""
    g = torch.Generator().manual_seed(seed)
    x, w1, b1 = randn(1, 30, 16, generator=g), randn(24, 16, generator=g), randn(24, generator=g)
    w2, b2 = randn(8, 24, generator=g), randn(8, generator=g)
    q, k, v = randn(1, 4, 2, 16, generator=g), randn(1, 9, 2, 16, generator=g), randn(1, 9, 2, 16, generator=g)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2, q, k, v)]
    with deco_ops.use_backend("triton"):
        y = deco_ops.pool_mlp(*leaves[:5], grid=(6, 5), out_grid=(4, 3))
        o = deco_ops.cross_attention(*leaves[5:])
        grads = torch.autograd.grad((y.square().sum() + o.square().sum()), leaves)
    return [y, o, *grads]


def test_the_shim_changes_no_bit():
    assert getattr(_interpreter()._patch_lang, "deco_ops_shim", False), "conftest did not install the shim"
    with interpreter_speed.uninstalled():
        assert not getattr(_interpreter()._patch_lang, "deco_ops_shim", False)
        tritons = _pool_mlp_and_attention(seed=3)
    ours = _pool_mlp_and_attention(seed=3)
    for got, want in zip(ours, tritons, strict=True):
        assert torch.equal(got, want)


def _builtin_patches(run) -> tuple[int, int]:
    """(patches of a language module, launches) while ``run()`` runs."""
    interpreter = _interpreter()
    launch, launches = interpreter.GridExecutor.__call__, []

    def counted_launch(self, *args, **kwargs):
        launches.append(self)
        return launch(self, *args, **kwargs)

    with mock.patch.object(interpreter, "_patch_builtin", wraps=interpreter._patch_builtin) as patches, \
            mock.patch.object(interpreter.GridExecutor, "__call__", counted_launch):
        run()
    return patches.call_count, len(launches)


def test_a_launch_patches_the_language_a_fixed_number_of_times():
    """Pooling and un-pooling call helpers (window bounds, ``tl.cdiv``) in every program: Triton's
    interpreter patches the language modules at each of those calls, the shim a fixed number of
    times per launch, however many programs run."""

    def pool_and_unpool(grid, out_grid):
        x = randn(1, grid[0] * grid[1], 8).requires_grad_(True)

        def run():
            with deco_ops.use_backend("triton"):
                torch.autograd.grad(deco_ops.adaptive_avg_pool_tokens(x, grid, out_grid).sum(), x)

        return run

    small, large = pool_and_unpool((6, 5), (4, 3)), pool_and_unpool((12, 10), (8, 6))  # 4x the programs
    with interpreter_speed.uninstalled():
        tritons_small, launches = _builtin_patches(small)
        tritons_large, _ = _builtin_patches(large)
    ours_small, our_launches = _builtin_patches(small)
    ours_large, _ = _builtin_patches(large)
    assert launches == our_launches == 2
    assert ours_small == ours_large < tritons_small < tritons_large
