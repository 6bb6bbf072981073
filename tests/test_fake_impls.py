"""Each op's fake implementation promises what its real one returns: shapes, dtypes and strides.

``torch.compile`` plans every buffer from the fake implementations, and Inductor asserts the
strides of each custom op's outputs against them (``assert_size_stride``): a real output laid out
otherwise (an ``einsum`` result in its own permuted order, say) fails the compiled backward where
eager and ``aot_eager`` run. ``CrossRefFakeMode`` runs every ``deco::`` op the public calls reach,
forward and backward, on real and on fake tensors and compares the two.
"""

import pytest
import torch
from torch._subclasses.fake_utils import CrossRefFakeMode

import deco_ops
from deco_ops import _autocast
from harness import randn

GRID, OUT_GRID = (4, 4), (3, 3)
C, HIDDEN, OUT = 8, 12, 6
B, M, N, H, D = 2, 3, 11, 2, 16


def _leaves(*shapes):
    g = torch.Generator().manual_seed(0)
    return [randn(*shape, generator=g).requires_grad_(True) for shape in shapes]


def _mlp(tokens):
    return _leaves(tokens, (HIDDEN, C), (HIDDEN,), (OUT, HIDDEN), (OUT,))


def _pooling():
    x, w1, b1, w2, b2 = _mlp((B, 16, C))
    yield deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID)
    yield deco_ops.bilinear_pool_tokens(x, GRID, OUT_GRID)
    yield deco_ops.pool_linear(x, w1, b1, grid=GRID, out_grid=OUT_GRID)
    yield deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID)
    yield deco_ops.pool_mlp(x, w1, None, w2, None, grid=GRID, out_grid=(2, 2))  # no db1: its output empty
    yield deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID)


def _packed():
    grids = torch.tensor([[4, 4], [3, 5]])
    outs = torch.tensor([[2, 2], [3, 2]])
    x, w1, b1, w2, b2 = _mlp((31, C))
    yield deco_ops.adaptive_avg_pool_tokens_packed(x, grids, out_grids=outs)[0]
    yield deco_ops.pool_mlp_packed(x, grids, w1, b1, w2, b2, out_grids=outs)[0]
    yield deco_ops.mlp_pool_packed(x, grids, w1, b1, w2, b2, out_grids=outs)[0]


def _attention():
    q, shared, k, v = _leaves((B, M, H, D), (1, M, H, D), (B, N, H, D), (B, N, H, D))
    keep = torch.rand(B, 1, M, N, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True
    lens = torch.tensor([N, 5])
    yield from deco_ops.cross_attention(q, k, v, kv_lens=lens, need_weights=True)
    yield deco_ops.cross_attention(q.detach(), k, v, kv_lens=lens)  # frozen queries: the backward's dK and dV alone
    yield from deco_ops.cross_attention(shared, k, v, attn_mask=keep, need_weights=True, average_attn_weights=False)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    yield from deco_ops.cross_attention(q, k[0], v[0], cu_seqlens_k=cu, need_weights=True)
    yield deco_ops.cross_attention(*(t.double() for t in (shared, k, v)))  # float64: its statistics too


def _merge():
    x, nw, nb = _leaves((B, 16, C), (4 * C,), (4 * C,))
    w1, b1, w2, b2 = _leaves((HIDDEN, 4 * C), (HIDDEN,), (OUT, HIDDEN), (OUT,))
    yield deco_ops.merge_mlp(x, nw, nb, w1, b1, w2, b2, norm_position="post")
    yield deco_ops.merge_mlp(x, nw[:C], None, w1, b1, w2, b2, grid=(4, 4), order="grid", norm="rmsnorm")
    grids = torch.tensor([[1, 4, 4], [1, 2, 4]])
    yield deco_ops.merge_mlp_packed(x.reshape(-1, C)[:24], grids, nw[:C], nb[:C], w1, b1, w2, b2)[0]
    # float32 tokens and norm before a 16-bit MLP: the output and dW1's operand (the norm's rows) in the MLP's dtype
    yield deco_ops.merge_mlp(x, nw[:C], nb[:C], *(t.half() for t in (w1, b1, w2, b2)))
    # bf16 throughout: the norm's weight and bias gradients in fp32 (its statistics' dtype)
    yield deco_ops.merge_mlp(*(t.bfloat16() for t in (x, nw[:C], nb[:C], w1, b1, w2, b2)))


FAMILIES = {"pooling": _pooling, "packed": _packed, "attention": _attention, "merge": _merge}


def test_the_families_reach_every_op():
    reached = set()

    def note(op):
        if op.namespace == "deco":
            reached.add(op._opname)
        return True

    with CrossRefFakeMode(ignore_op_fn=note):
        for family in FAMILIES.values():
            sum(y.float().square().sum() for y in family()).backward()
    assert reached == set(_autocast.LOWER_PRECISION + _autocast.OWN_DTYPE)


@pytest.mark.parametrize("family", FAMILIES)
def test_fake_outputs_are_laid_out_as_the_real_ones(backend, family):
    """Forward and backward of the family's calls; any ``deco::`` op whose fake output differs from
    its real one in shape, dtype or strides raises ``MetadataMismatchError``."""
    with CrossRefFakeMode(ignore_op_fn=lambda op: op.namespace != "deco"):
        sum(y.float().square().sum() for y in FAMILIES[family]()).backward()


def test_fake_outputs_without_residuals(auto_backend):
    """Inference (grad mode off): the ops keep no residuals, and their fakes promise the empty
    tensors the real ones return in their place (Inductor asserts those shapes too)."""
    with torch.no_grad(), CrossRefFakeMode(ignore_op_fn=lambda op: op.namespace != "deco"):
        for family in FAMILIES.values():
            assert all(not y.requires_grad for y in family())
