"""Tensors whose memory the kernels cannot index as they read it. Nested, sparse and mkldnn
tensors: each op refuses them with a TypeError naming the argument, on the first call of a
signature and after a plan for a similar call exists (a plan skips the checks: its key and its fast
check must tell these tensors apart). Lazily negated views and lazy zero tensors, as inputs or as
output gradients: read as their values (no plan; the dispatcher resolves them)."""

import warnings

import pytest
import torch

import deco_ops

from harness import DEVICE

W1, W2 = torch.randn(6, 8), torch.randn(5, 6)
Q, V = torch.randn(2, 3, 2, 8), torch.randn(2, 7, 2, 8)

OPS = {
    "pool": lambda x: deco_ops.adaptive_avg_pool_tokens(x, (4, 4), (2, 2)),
    "pool_mlp": lambda x: deco_ops.pool_mlp(x, W1, None, W2, None, grid=(4, 4), out_grid=(2, 2)),
    "merge_mlp": lambda x: deco_ops.merge_mlp(x, None, None, torch.randn(6, 32), None, W2, None),
    "cross_attention": lambda k: deco_ops.cross_attention(Q, k, V),
}


def _plain(op):
    return torch.randn(2, 7, 2, 8) if op == "cross_attention" else torch.randn(2, 16, 8)


def _strided_last(op):
    """The same shape as ``_plain`` with its last stride 2: sparse tensors report a last stride of 0."""
    return (torch.randn(2, 7, 2, 16) if op == "cross_attention" else torch.randn(2, 16, 16))[..., ::2]


KINDS = {
    "nested": (lambda t: torch.nested.nested_tensor(list(t)), "a nested tensor"),
    "sparse": (lambda t: t.to_sparse(), "layout torch.sparse_coo"),
    "mkldnn": (lambda t: t.to_mkldnn(), "layout torch._mkldnn"),
}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="mkldnn and nested CPU tensors")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("first", ["none", "plain", "strided_last"])
@pytest.mark.parametrize("op", OPS)
def test_undense_tensors_are_refused_with_or_without_a_plan(op, first, kind):
    make, what = KINDS[kind]
    if first != "none":
        OPS[op]({"plain": _plain, "strided_last": _strided_last}[first](op))
    name = "k" if op == "cross_attention" else "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested tensor API's prototype warning
        bad = make(_plain(op))
    with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor, got {what}"):
        OPS[op](bad)


def _grad_cases():
    """op -> (inputs, ``f(*inputs) -> output``), every float input requiring grad."""
    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=True)

    grids = torch.tensor([[4, 4], [2, 4]], device=DEVICE)
    return {
        "pool": ([leaf(2, 16, 8)], lambda x: deco_ops.adaptive_avg_pool_tokens(x, (4, 4), (3, 3))),
        "bilinear": ([leaf(2, 16, 8)], lambda x: deco_ops.bilinear_pool_tokens(x, (4, 4), (3, 3))),
        "pool_linear": ([leaf(2, 16, 8), leaf(6, 8), leaf(6)],
                        lambda x, w, b: deco_ops.pool_linear(x, w, b, grid=(4, 4), out_grid=(2, 2))),
        "pool_mlp": ([leaf(2, 16, 8), leaf(6, 8), leaf(6), leaf(5, 6), leaf(5)],
                     lambda x, *p: deco_ops.pool_mlp(x, *p, grid=(4, 4), out_grid=(2, 2))),
        "mlp_pool": ([leaf(2, 16, 8), leaf(6, 8), leaf(6), leaf(5, 6), leaf(5)],
                     lambda x, *p: deco_ops.mlp_pool(x, *p, grid=(4, 4), out_grid=(2, 2))),
        "merge_mlp": ([leaf(2, 16, 8), leaf(8), leaf(8), leaf(6, 32), leaf(6), leaf(5, 6), leaf(5)],
                      lambda x, *p: deco_ops.merge_mlp(x, *p)),
        "cross_attention": ([leaf(2, 3, 2, 8), leaf(2, 7, 2, 8), leaf(2, 7, 2, 8)], deco_ops.cross_attention),
        "pool_packed": ([leaf(24, 8)], lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, grids, stride=2)[0]),
        "pool_mlp_packed": ([leaf(24, 8), leaf(6, 8), leaf(6), leaf(5, 6), leaf(5)],
                            lambda x, *p: deco_ops.pool_mlp_packed(x, grids, *p, stride=2)[0]),
        "merge_mlp_packed": ([leaf(24, 8), leaf(8), leaf(8), leaf(6, 32), leaf(6), leaf(5, 6), leaf(5)],
                             lambda x, *p: deco_ops.merge_mlp_packed(x, grids, *p)[0]),
    }


LAZY_GRADIENTS = {
    # (what the user passes, the same values in plain memory)
    "negated": lambda g: (torch._neg_view(-g), g),
    "zero": lambda g: (torch._efficientzerotensor(g.shape, dtype=g.dtype, device=g.device), torch.zeros_like(g)),
}


@pytest.mark.parametrize("kind", LAZY_GRADIENTS)
@pytest.mark.parametrize("setting", [("triton", "fused"), ("triton", "composed"), ("torch", "auto")], ids="-".join)
@pytest.mark.parametrize("op", list(_grad_cases()))
def test_a_lazy_output_gradient_is_read_as_its_value(op, setting, kind):
    """An output gradient that is a lazily negated view or a lazy zero tensor (autograd passes the
    latter itself; a user may pass either as ``grad_outputs``) reaches the backward ops as one: they
    run past the plans, through the dispatcher, which resolves it; the gradients equal those of the
    same values in plain memory (the kernels read -g, or a null pointer, before)."""
    inputs, f = _grad_cases()[op]
    backend, strategy = setting
    with deco_ops.use_backend(backend), deco_ops.use_strategy(strategy):
        y = f(*inputs)
        lazy, plain = LAZY_GRADIENTS[kind](torch.randn_like(y))
        assert torch.equal(lazy, plain) and (lazy.is_neg() or lazy._is_zerotensor())
        expected = torch.autograd.grad(y, inputs, plain, retain_graph=True)  # a plan for the plain gradient first
        got = torch.autograd.grad(y, inputs, lazy)
    for name, e, a in zip("abcdefg", expected, got):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{op} input {name}: {m}")


@pytest.mark.parametrize("setting", [("triton", "fused"), ("triton", "composed"), ("torch", "auto")], ids="-".join)
@pytest.mark.parametrize("op", list(_grad_cases()))
def test_negated_inputs_are_read_as_their_values(op, setting):
    """A lazily negated view (``z.conj().imag``, the negative bit: its memory holds -value) as any
    input runs as PyTorch runs it: outputs and gradients equal those of the same values in plain
    memory, twice (the second call finds no plan of its own: it goes through the dispatcher, whose
    fallback resolves the view). Refused until 2026-12-06; read as memory, wrong by sign, before."""
    inputs, f = _grad_cases()[op]
    backend, strategy = setting
    with deco_ops.use_backend(backend), deco_ops.use_strategy(strategy):
        for i in range(len(inputs)):
            plain = [t.detach().clone().requires_grad_(True) for t in inputs]
            negated = [t.detach().clone() for t in inputs]
            negated[i] = torch._neg_view(-negated[i])
            negated = [t.requires_grad_(True) for t in negated]
            assert negated[i].is_neg() and torch.equal(negated[i], plain[i])
            for _ in range(2):
                want, got = f(*plain), f(*negated)
                dy = torch.randn_like(want)
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{op} input {i} negated: {m}")
                for k, (a, b) in enumerate(zip(torch.autograd.grad(got, negated, dy), torch.autograd.grad(want, plain, dy))):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{op} input {i} negated, gradient {k}: {m}")
