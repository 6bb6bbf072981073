"""``torch.jit.trace`` of the modules: the trace records ``torch.ops.deco`` nodes (a traced call is
not plain eager, ``_plan``), the same graph in grad mode and under ``no_grad`` (its own check replays
the function under ``no_grad``; the ops keep their residuals whenever traced), on both backends; the
traced module computes what the module computes, forward and backward, after a save/load round trip.
The packed ops and packed keys read grids / offsets on the host: refused under tracing, which would
replay the traced values for any other."""

import io
import warnings

import pytest
import torch

import deco_ops

from harness import DEVICE, randn

GRID, OUT_GRID, C = (4, 4), (2, 2), 8


def _modules():
    """name -> (module, input shape)."""
    torch.manual_seed(0)
    return {
        "DeCoProjector": (deco_ops.DeCoProjector(C, 16, grid=GRID, out_grid=OUT_GRID), (2, 16, C)),
        "PatchMergerProjector": (deco_ops.PatchMergerProjector(C, 16, hidden_features=32), (2, 16, C)),
        "QueryResampler": (deco_ops.QueryResampler(3, 16, C, 2), (2, 7, C)),
        "CrossAttention": (_SelfAttending(deco_ops.CrossAttention(C, 2, batch_first=True)), (2, 7, C)),
    }


class _SelfAttending(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x[:, :3], x, x, need_weights=False)[0]


def _backends():
    return ["torch", "triton"] if DEVICE.type == "cpu" else ["auto"]


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(_modules()))
def test_traced_module_matches_the_module(name, backend, grad):
    module, shape = _modules()[name]
    module.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x, other = randn(*shape, generator=g), randn(*shape, generator=g)
    with deco_ops.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.set_grad_enabled(grad):
            traced = torch.jit.trace(module, (x,))  # check_trace on: replays under no_grad
        assert "deco::" in str(traced.inlined_graph), "the trace did not record the ops"
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        leaves = [other.clone().requires_grad_(True) for _ in range(2)]
        want, got = module(leaves[0]), loaded(leaves[1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        dy = randn(*want.shape, generator=g)
        want_grads = torch.autograd.grad(want, [leaves[0], *module.parameters()], dy)
        got_grads = torch.autograd.grad(got, [leaves[1], *loaded.parameters()], dy)  # the loaded copies
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{name}: gradient {i}: {m}")


@pytest.mark.parametrize("case", ["pool_packed", "pool_mlp_packed", "merge_mlp_packed", "cross_attention_packed"])
def test_host_reads_are_refused_under_tracing(case):
    """A trace would keep this call's grids (offsets) and replay them for any other: the output
    and ``cu_seqlens`` of the traced layout, silently (a wrong answer before it was refused)."""
    grids = torch.tensor([[4, 4], [2, 2]], device=DEVICE)
    w1, w2 = randn(6, C), randn(5, 6)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    fn, name = {
        "pool_packed": (lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, grids, stride=2)[0], "grids"),
        "pool_mlp_packed": (lambda x: deco_ops.pool_mlp_packed(x, grids, w1, None, w2, None, stride=2)[0], "grids"),
        "merge_mlp_packed": (lambda x: deco_ops.merge_mlp_packed(x, grids, None, None, randn(6, 4 * C), None, w2, None)[0],
                             "grids"),
        "cross_attention_packed": (lambda x: deco_ops.cross_attention(randn(2, 3, 2, 4), x.view(9, 2, 4), x.view(9, 2, 4),
                                                                      cu_seqlens_k=cu), "cu_seqlens_k"),
    }[case]
    x = randn(20, C) if case != "cross_attention_packed" else randn(9, 8)
    fn(x)  # a plan for the layout first: a planned call is refused too
    with pytest.raises(RuntimeError, match=f"torch.jit.trace cannot record {name}"):
        torch.jit.trace(fn, (x,))
