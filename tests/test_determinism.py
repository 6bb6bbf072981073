"""Every public op returns bitwise-identical forward outputs and gradients on repeated runs (no
float atomics anywhere; reductions run in a fixed order)."""

import pytest
import torch

import deco_ops
from harness import randn

G = torch.Generator().manual_seed(7)
X = randn(2, 9 * 7, 24, generator=G)
W1, B1 = randn(40, 24, generator=G) * 0.2, randn(40, generator=G)
W2, B2 = randn(16, 40, generator=G) * 0.2, randn(16, generator=G)
GRIDS = torch.tensor([[9, 7], [5, 5], [4, 3]])
XP = randn(9 * 7 + 25 + 12, 24, generator=G)
Q, K, V = randn(1, 17, 2, 32, generator=G), randn(2, 70, 2, 32, generator=G), randn(2, 70, 2, 32, generator=G)

CASES = {
    "adaptive_avg_pool_tokens": (lambda x: deco_ops.adaptive_avg_pool_tokens(x, (9, 7), (4, 3)), [X]),
    "pool_linear": (lambda x, w, b: deco_ops.pool_linear(x, w, b, grid=(9, 7), out_grid=(4, 3)), [X, W1, B1]),
    "pool_mlp": (lambda *t: deco_ops.pool_mlp(*t, grid=(9, 7), out_grid=(4, 3)), [X, W1, B1, W2, B2]),
    "mlp_pool": (lambda *t: deco_ops.mlp_pool(*t, grid=(9, 7), out_grid=(4, 3), mode="bilinear"), [X, W1, B1, W2, B2]),
    "bilinear_pool_tokens": (lambda x: deco_ops.bilinear_pool_tokens(x, (9, 7), (4, 3)), [X]),
    "adaptive_avg_pool_tokens_packed": (lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, GRIDS, stride=2)[0], [XP]),
    "pool_mlp_packed": (lambda *t: deco_ops.pool_mlp_packed(t[0], GRIDS, *t[1:], stride=2)[0], [XP, W1, B1, W2, B2]),
    "mlp_pool_packed": (lambda *t: deco_ops.mlp_pool_packed(t[0], GRIDS, *t[1:], stride=2)[0], [XP, W1, B1, W2, B2]),
    "cross_attention": (lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor([70, 33])), [Q, K, V]),
}


def _run(fn, inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y) / y.numel() ** 0.5)
    return [y, *grads]


@pytest.mark.parametrize("name", sorted(CASES))
def test_repeated_runs_are_bitwise_identical(backend, name):
    fn, inputs = CASES[name]
    first, second = _run(fn, inputs), _run(fn, inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b), name
