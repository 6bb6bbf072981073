"""Whole-graph recorders of the modules: ``torch.jit.trace`` and ``torch.export``.

``torch.jit.trace``: the trace records ``torch.ops.deco`` nodes (a traced call is not plain eager,
``_plan``), the same graph in grad mode and under ``no_grad`` (its own check replays the function
under ``no_grad``; the ops keep their residuals whenever traced), on both backends; the traced
module computes what the module computes, forward and backward, after a save/load round trip.
``torch.export``: strict and non-strict, with a dynamic batch, the same after ``torch.export.save``
/ ``load`` at another batch size. The packed ops and packed keys read grids / offsets on the host:
refused under either recorder, naming the argument (a trace would replay the traced values for
any other; an exported graph has no host reads)."""

import io
import warnings

import pytest
import torch

import deco_ops

from harness import DEVICE, Calls, randn

GRID, OUT_GRID, C = (4, 4), (2, 2), 8


def _modules():
    """name -> (module, input shape)."""
    torch.manual_seed(0)
    return {
        "DeCoProjector": (deco_ops.DeCoProjector(C, 16, grid=GRID, out_grid=OUT_GRID), (2, 16, C)),
        "PatchMergerProjector": (deco_ops.PatchMergerProjector(C, 16, hidden_features=32), (2, 16, C)),
        "QueryResampler": (deco_ops.QueryResampler(3, 16, C, 2), (2, 7, C)),
        "CrossAttention": (_SelfAttending(deco_ops.CrossAttention(C, 2, batch_first=True)), (2, 7, C)),
        # nn.MultiheadAttention's default: the weights too (on a CPU, plain calls compute them as eager
        # softmax attention, value reads on the host included; a trace records the ops instead)
        "CrossAttention+weights": (_SelfAttending(deco_ops.CrossAttention(C, 2, batch_first=True), need_weights=True), (2, 7, C)),
    }


class _SelfAttending(torch.nn.Module):
    def __init__(self, attention, need_weights=False):
        super().__init__()
        self.attention, self.need_weights = attention, need_weights

    def forward(self, x):
        out, weights = self.attention(x[:, :3], x, x, need_weights=self.need_weights)
        return out if weights is None else torch.cat([out.flatten(1), weights.flatten(1)], 1)


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
        _assert_computes_as(module, _saved_and_loaded(traced, torch.jit.save, torch.jit.load), other, g, name)


@pytest.mark.parametrize("name", list(_modules()))
def test_scripting_is_refused_by_name(name):
    """``torch.jit.script`` failed inside TorchScript's compiler on the ops' Python (``Expression of
    type dots cannot be used in a type expression``, ``cannot statically infer the expected size of
    a list``), naming neither the module nor what to use instead; scripting a model that holds one
    did the same."""
    module = _modules()[name][0]
    for scripted in (module, torch.nn.Sequential(module)):
        with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .*: deco_ops' ops are Python .*torch.jit.trace or torch.export"):
            torch.jit.script(scripted)


def _dense_geometry_modules():
    """name -> module of the ops that read a dense batch's geometry table (bilinear resampling,
    project-then-pool)."""
    torch.manual_seed(0)
    return {
        "bilinear_pool_tokens": Calls(lambda x: deco_ops.bilinear_pool_tokens(x, GRID, OUT_GRID)),
        "mlp_pool": deco_ops.DeCoProjector(C, 16, grid=GRID, out_grid=OUT_GRID, order="mlp_pool"),
        "pool_mlp_bilinear": deco_ops.DeCoProjector(C, 16, grid=GRID, out_grid=OUT_GRID, mode="bilinear"),
    }


def _trace_with_fresh_tables(module, x, monkeypatch, capacity):
    """``torch.jit.trace(module, (x,))`` (its check on) with the dense geometry tables' caches
    empty and at most ``capacity`` images per cached table."""
    from deco_ops import packed
    from deco_ops.kernels import packed_pool

    monkeypatch.setattr(packed, "DENSE_GEOMETRY_CAPACITY", capacity)
    packed._dense_geometry_view.cache_clear()
    packed_pool.dense_geometry.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, (x,))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(_dense_geometry_modules()))
def test_traced_dense_geometry_passes_the_check(name, backend, monkeypatch):
    """The geometry table of a dense batch is recorded as tensor ops, never as the cached table:
    the first call built it (ops in the graph) and the check's replay found it cached (a constant),
    two graphs, so the trace raised TracingCheckError."""
    module = _dense_geometry_modules()[name].to(DEVICE)
    g = torch.Generator().manual_seed(1)
    with deco_ops.use_backend(backend):
        traced = _trace_with_fresh_tables(module, randn(2, 16, C, generator=g), monkeypatch, 3)
        _assert_computes_as(module, traced, randn(2, 16, C, generator=g), g, name)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the PyTorch backend's path (the kernels take their row count as a traced constant, docs/integrations.md)")
@pytest.mark.parametrize("name", list(_dense_geometry_modules()))
def test_traced_dense_geometry_follows_the_batch(name, monkeypatch):
    """A trace replayed at a batch larger than the cached table (sliced from a constant table, it
    stopped at the table's capacity: an error) runs it on the PyTorch backend."""
    module = _dense_geometry_modules()[name].to(DEVICE)
    g = torch.Generator().manual_seed(1)
    with deco_ops.use_backend("torch"):
        traced = _trace_with_fresh_tables(module, randn(2, 16, C, generator=g), monkeypatch, 3)
        _assert_computes_as(module, traced, randn(5, 16, C, generator=g), g, name)


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(_modules()))
def test_exported_module_matches_the_module(name, backend, strict):
    module, shape = _modules()[name]
    module.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    batch = torch.export.Dim("batch", max=64)
    with deco_ops.use_backend(backend):
        exported = torch.export.export(module, (randn(*shape, generator=g),), dynamic_shapes=({0: batch},),
                                       strict=strict)
        assert any(str(n.target).startswith("deco.") for n in exported.graph.nodes), "the export did not record the ops"
        loaded = _saved_and_loaded(exported, torch.export.save, torch.export.load).module()
        other = randn(3, *shape[1:], generator=g)  # another batch than the exported example's
        _assert_computes_as(module, loaded, other, g, name)


def test_aoti_package_of_the_merger_matches_the_module(tmp_path):
    """``order="block"`` passed an empty grid list to ``deco::merge_mlp``, which an AOTInductor
    package's call of the op received as None: ``aoti_load_package(...)(x)`` raised "Expected a
    value of type 'List[int]' for argument 'grid' but instead found type 'NoneType'"."""
    torch.manual_seed(0)
    module = deco_ops.PatchMergerProjector(C, 16, hidden_features=32).to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    batch = torch.export.Dim("batch", max=64)
    exported = torch.export.export(module, (randn(2, 16, C, generator=g),), dynamic_shapes=({0: batch},))
    package = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "merger.pt2")))
    x = randn(3, 16, C, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(package(x), module(x))


def _saved_and_loaded(recorded, save, load):
    """``recorded`` through ``save`` into a buffer and back through ``load``."""
    buffer = io.BytesIO()
    save(recorded, buffer)
    buffer.seek(0)
    return load(buffer)


def _assert_computes_as(module, recorded, x, g, name):
    """``recorded`` (a loaded trace or export of ``module``) computes what ``module`` computes at
    ``x``: the output and the gradients of x and of every parameter (the recorded copies), bitwise;
    to fp32's rounding with the attention weights on a CPU, where the module's plain calls take
    eager softmax attention and the recorded graph the ops."""
    tol = {} if name.endswith("+weights") and x.device.type == "cpu" else {"rtol": 0, "atol": 0}
    leaves = [x.clone().requires_grad_(True) for _ in range(2)]
    want, got = module(leaves[0]), recorded(leaves[1])
    torch.testing.assert_close(got, want, **tol)
    dy = randn(*want.shape, generator=g)
    names = [n for n, _ in module.named_parameters()]  # a strict export may list them in another order
    copies = dict(recorded.named_parameters())
    want_grads = torch.autograd.grad(want, [leaves[0], *module.parameters()], dy)
    got_grads = torch.autograd.grad(got, [leaves[1], *(copies[n] for n in names)], dy)
    for what, a, b in zip(["x", *names], got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: gradient of {what}: {m}")


HOST_READS = ["pool_packed", "pool_mlp_packed", "merge_mlp_packed", "cross_attention_packed"]


def _host_read(case: str):
    """(a function of one tensor that reads grids or offsets on the host, the argument's name, the
    tensor), the function called once so that a plan for the layout exists (a planned call must be
    refused too)."""
    grids = torch.tensor([[4, 4], [2, 2]], device=DEVICE)
    w1, w2 = randn(6, C), randn(5, 6)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    q = randn(2, 3, 2, 4)
    fn, name = {
        "pool_packed": (lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, grids, stride=2)[0], "grids"),
        "pool_mlp_packed": (lambda x: deco_ops.pool_mlp_packed(x, grids, w1, None, w2, None, stride=2)[0], "grids"),
        "merge_mlp_packed": (lambda x: deco_ops.merge_mlp_packed(x, grids, None, None, randn(6, 4 * C), None, w2, None)[0],
                             "grids"),
        "cross_attention_packed": (lambda x: deco_ops.cross_attention(q, x.view(9, 2, 4), x.view(9, 2, 4), cu_seqlens_k=cu),
                                   "cu_seqlens_k"),
    }[case]
    x = randn(20, C) if case != "cross_attention_packed" else randn(9, 8)
    fn(x)
    return fn, name, x


@pytest.mark.parametrize("case", HOST_READS)
def test_host_reads_are_refused_under_tracing(case):
    """A trace would keep this call's grids (offsets) and replay them for any other: the output
    and ``cu_seqlens`` of the traced layout, silently (a wrong answer before it was refused)."""
    fn, name, x = _host_read(case)
    with pytest.raises(RuntimeError, match=f"torch.jit.trace cannot record {name}"):
        torch.jit.trace(fn, (x,))


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("case", HOST_READS)
def test_host_reads_are_refused_under_export(case, strict):
    """The values are data-dependent symbols in an exported graph: PyTorch's own error named a
    comparison inside deco_ops (``min(r) < 1``), not the argument. Strict export wraps the error in
    Dynamo's, which quotes it."""
    fn, name, x = _host_read(case)
    _assert_export_refuses(fn, name, x, strict)


def _assert_export_refuses(fn, name: str, x: torch.Tensor, strict: bool) -> None:
    with pytest.raises(RuntimeError) as caught:
        torch.export.export(Calls(fn), (x,), strict=strict)
    chain, error = [], caught.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert f"torch.export cannot record {name}" in "\n".join(chain), chain[0][:500]


@pytest.mark.parametrize("case", ["pool_mlp_packed", "cross_attention_packed"])
def test_host_reads_tell_export_from_compile_through_the_flag(case, monkeypatch):
    """Before torch 2.13 dynamo folded ``torch.compiler.is_exporting()`` to True while tracing
    ``torch.compile`` too (pytorch/pytorch#176347), so under ``fullgraph=True`` a packed call was
    refused as ``torch.export``'s (torch 2.10 and 2.11, the GPU machines'); there ``_validate``
    reads the flag ``torch.export`` sets. Forced here on any torch: export (strict and not) is still
    refused by name, and ``torch.compile(fullgraph=True)`` breaks the graph with its own message."""
    from torch._dynamo.exc import Unsupported

    from deco_ops import _validate

    monkeypatch.setattr(_validate, "_exporting", _validate._exporting_flag)
    fn, name, x = _host_read(case)
    for strict in (False, True):
        _assert_export_refuses(fn, name, x, strict)
    torch._dynamo.reset()
    with pytest.raises(Unsupported, match=f"deco_ops reads the values of {name} on the host"):
        torch.compile(fn, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
