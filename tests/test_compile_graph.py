"""``torch.compile`` sees through the ops: no graph break, and on the Triton backend the kernels
themselves in the compiled graph.

Every deco op is a ``torch.library.triton_op`` (``deco_ops/_triton_op.py``). On the Triton backend
AOTAutograd traces its body and each launch becomes a ``triton_kernel_wrapper_functional`` node
naming its kernel: what Inductor launches itself and CUDA graphs capture on a GPU. Here the kernels
run under Triton's interpreter, so the graphs are recorded by a backend that runs them in Python,
inside ``trace_interpreted_kernels()``; they must give eager's values and gradients, and write only
the tensors the kernels store to (PyTorch reads that from each kernel's Triton IR).
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._functorch.aot_autograd import aot_module_simplified
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from triton.runtime.jit import JITFunction

import deco_ops
from deco_ops._triton_op import trace_interpreted_kernels, traced
from deco_ops.kernels import _tuning
from harness import assert_close

pytestmark = pytest.mark.interpreter_only  # on a GPU the same graphs come from Inductor (test_cuda_graphs.py)

WRAPPER = torch.ops.higher_order.triton_kernel_wrapper_functional


class RecordingBackend:
    """A ``torch.compile`` backend that keeps AOTAutograd's forward and backward graphs and runs
    them as they are."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=self._keep, bw_compiler=self._keep)

    def _keep(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm

    def launches(self, graph: int) -> list[tuple[str, list[str]]]:
        """(kernel name, tensors it writes) of every kernel node of graph ``graph``, in order."""
        return [(_kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"])), node.kwargs["tensors_to_clone"])
                for node in self.graphs[graph].graph.nodes if node.target is WRAPPER]


def _kernel_name(kernel) -> str:
    while not hasattr(kernel, "__code__"):  # Autotuner -> JITFunction -> Python function
        kernel = kernel.fn
    return kernel.__name__


def _compiled_run(module, inputs, **kwargs):
    """(eager output and gradients, compiled output and gradients, the recording backend)."""
    backend = RecordingBackend()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    runs = []
    for fn in (module, compiled):
        module.zero_grad()
        args = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        runs.append([out.detach()] + [p.grad.clone() for p in module.parameters()] + [a.grad for a in args if a.requires_grad])
    for got, want in zip(*reversed(runs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    return backend


@pytest.fixture
def traced_triton():
    with deco_ops.use_backend("triton"), trace_interpreted_kernels():
        yield


def test_projector_kernels_in_compiled_graph(traced_triton):
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(16, 24, hidden_features=32, grid=(4, 4), out_grid=(2, 2))
    active_driver = triton.runtime.driver._active
    backend = _compiled_run(proj, [torch.randn(2, 16, 16)])
    assert triton.runtime.driver._active is active_driver  # the sm_90 target lent to the trace is given back
    forward, backward = backend.launches(0), backend.launches(1)
    assert forward == [("pool_gemm_kernel", ["out_ptr", "pre_ptr", "pooled_ptr"])]
    assert [name for name, _ in backward] == ["gemm_act_grad_kernel", "unpool_tokens_kernel"]
    # the second Linear and the weight gradients stay torch ops beside the kernels
    assert any(node.target is torch.ops.aten.addmm.default for node in backend.graphs[0].graph.nodes)


def test_16bit_projector_traces_without_reading_addresses(traced_triton):
    """In bf16 an eager call may run the first Linear on the TMA GEMM, which needs the operands'
    addresses (16-byte alignment); a trace has FakeTensors, without addresses, and must not bake one
    call's alignment into the graph: it records the pointer-load kernel (on the H200 the trace read
    a FakeTensor's data_ptr and failed)."""
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(16, 24, hidden_features=32, grid=(4, 4), out_grid=(2, 2)).to(torch.bfloat16)
    x = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    backend = RecordingBackend()
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(proj, backend=backend, fullgraph=True)(x)
        want = proj(x)
    assert [name for name, _ in backend.launches(0)] == ["pool_gemm_kernel"]
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_cross_attention_kernels_in_compiled_graph(traced_triton):
    torch.manual_seed(0)
    attn = deco_ops.CrossAttention(32, 2, batch_first=True)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 11, 32)
    backend = _compiled_run(attn, [q, kv, kv.clone()], need_weights=False)
    assert [name for name, _ in backend.launches(0)] == ["cross_attention_fwd_kernel"]
    assert [name for name, _ in backend.launches(1)] == ["cross_attention_bwd_single_pass_kernel"]


def test_query_resampler_kernels_in_compiled_graph(traced_triton):
    torch.manual_seed(0)
    resampler = deco_ops.QueryResampler(6, 32, 24, 2)
    backend = _compiled_run(resampler, [torch.randn(2, 13, 24)])
    assert "cross_attention_fwd_kernel" in [name for name, _ in backend.launches(0)]


def test_patch_merger_kernels_in_compiled_graph(traced_triton):
    torch.manual_seed(0)
    merger = deco_ops.PatchMergerProjector(8, 16, hidden_features=24)
    backend = _compiled_run(merger, [torch.randn(16, 8)])
    forward = [name for name, _ in backend.launches(0)]
    assert "merge_gemm_kernel" in forward


class _AttentionWithLengths(torch.nn.Module):
    def forward(self, q, k, v, kv_lens):
        return deco_ops.cross_attention(q, k, v, kv_lens=kv_lens)


@pytest.mark.parametrize("make, inputs", [
    (lambda: deco_ops.DeCoProjector(16, 24, hidden_features=32, grid=(4, 4), out_grid=(2, 2)), lambda: [torch.randn(2, 16, 16)]),
    (lambda: deco_ops.PatchMergerProjector(8, 16, hidden_features=24), lambda: [torch.randn(16, 8)]),
    (lambda: deco_ops.PatchMergerProjector(8, 16, hidden_features=24, norm="rmsnorm", order="grid", grid=(4, 4)),
     lambda: [torch.randn(2, 16, 8)]),
    (lambda: deco_ops.PatchMergerProjector(8, 16, hidden_features=24, norm_position="post"), lambda: [torch.randn(16, 8)]),
    (lambda: deco_ops.CrossAttention(32, 2, batch_first=True), lambda: [torch.randn(2, 5, 32), torch.randn(2, 11, 32), torch.randn(2, 11, 32)]),
    (lambda: _AttentionWithLengths(), lambda: [*(torch.randn(2, m, 2, 16) for m in (5, 11, 11)), torch.tensor([7, 11], dtype=torch.int32)]),
    (lambda: _AttentionWithLengths(), lambda: [*(torch.randn(2, m, 2, 64) for m in (80, 11, 11)), torch.tensor([7, 11], dtype=torch.int32)]),
], ids=["projector", "merger", "merger_rms_grid", "merger_post_norm", "cross_attention", "kv_lens", "kv_lens_two_kernels"])
def test_no_kernel_writes_what_its_graph_was_given(make, inputs, traced_triton):
    """Every kernel writes only buffers its op allocated. PyTorch reads what a kernel writes from its
    Triton IR and counts a store whose address came out of a helper ``@triton.jit`` function as a
    write through every pointer that helper got: the tensor is then cloned before the launch, and
    where it is a graph input (tokens, weights, saved activations), the graph mutates its input. The
    merger's norm backward computed its stores' offsets inside the helper that loads the tokens and
    ``dn``: both were cloned, and on torch 2.10 and 2.11 a merger trained under ``torch.compile`` failed
    ("a leaf Variable that requires grad is being used in an in-place operation"). The attention
    backward kernels read ``kv_lens`` in a helper whose results placed their dK/dV stores: the graph
    wrote the caller's ``kv_lens`` (the single pass, and the two-kernel schedule of 80 queries)."""
    torch.manual_seed(0)
    module = make()
    kwargs = {"need_weights": False} if isinstance(module, deco_ops.CrossAttention) else {}
    backend = _compiled_run(module, inputs(), **kwargs)
    written = []
    for graph in backend.graphs:
        given = {node for node in graph.graph.nodes if node.op == "placeholder"}
        for node in graph.graph.nodes:
            if node.target is WRAPPER:
                name = _kernel_name(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]))
                written += [(name, arg) for arg in node.kwargs["tensors_to_clone"] if node.kwargs["kwargs"][arg] in given]
    assert len(backend.graphs) == 2 and written == []


def _pooled64(x: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """float64 ``F.adaptive_avg_pool2d`` of the (B, H*W, C) token grid, as (B, OH*OW, C)."""
    B, _, C = x.shape
    image = x.double().transpose(1, 2).reshape(B, C, *grid)
    return F.adaptive_avg_pool2d(image, out_grid).flatten(2).transpose(1, 2)


def _mlp64(x: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())


def test_project_then_pool_compiles_for_a_new_batch(traced_triton):
    """``DeCoProjector(order="mlp_pool")`` compiled, then called with another batch size
    (automatic dynamic shapes: the batch is symbolic in the recompiled graph): the first GEMM pools
    the token axis to itself, whose window was looked up in a cache by its symbolic length, an
    unhashable SymInt (BackendCompilerFailed). Values and gradients of float64's."""
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(8, 12, hidden_features=16, grid=(4, 4), out_grid=(2, 2), order="mlp_pool")
    (w1, b1), (w2, b2) = ((layer.weight, layer.bias) for layer in (getattr(proj, "0"), getattr(proj, "2")))
    torch._dynamo.reset()
    compiled = torch.compile(proj, backend="aot_eager", fullgraph=True)
    for batch in (2, 3):
        x = torch.randn(batch, 16, 8, requires_grad=True)
        y = compiled(x)
        want = _pooled64(_mlp64(x, w1, b1, w2, b2), (4, 4), (2, 2))
        assert_close(y, want, torch.float32)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, w1], dy)
        wanted = torch.autograd.grad(want, [x, w1], dy.double())
        for what, a, b in zip(["x", "w1"], got, wanted):
            assert_close(a, b, torch.float32, what=f"gradient of {what}")


@pytest.mark.parametrize("op", ["adaptive_avg_pool_tokens", "pool_mlp"])
def test_symbolic_grids_compile(op, traced_triton):
    """``torch.compile(dynamic=True)`` of a call whose grids are arguments: they are symbolic, and
    the pooling kernels' unrolled windows (constexprs) were looked up in a cache by them, an
    unhashable SymInt (BackendCompilerFailed); the windows now specialise the graph on the grids."""
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(16, 8) * 0.3, torch.randn(16), torch.randn(12, 16) * 0.3, torch.randn(12)
    fn, ref = {
        "adaptive_avg_pool_tokens": (deco_ops.adaptive_avg_pool_tokens, _pooled64),
        "pool_mlp": (lambda x, g, o: deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=g, out_grid=o),
                     lambda x, g, o: _mlp64(_pooled64(x, g, o), w1, b1, w2, b2)),
    }[op]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for batch, grid, out_grid in ((2, (4, 4), (2, 2)), (3, (6, 4), (3, 2))):
        x = torch.randn(batch, grid[0] * grid[1], 8)
        assert_close(compiled(x, grid, out_grid), ref(x, grid, out_grid), torch.float32)


def test_bodies_traced_only_on_the_triton_backend_inside_the_block():
    """On CPU tensors a trace goes through an op body only inside ``trace_interpreted_kernels()``
    (an inner block leaves the outer one in force) and on the Triton backend: on the PyTorch
    backend the op stays one opaque node, its eager code run as it is, inside the block too."""
    cpu = torch.device("cpu")
    with deco_ops.use_backend("triton"):
        assert not traced(cpu)
        with trace_interpreted_kernels():
            with trace_interpreted_kernels():
                assert traced(cpu)
            assert traced(cpu)
        assert not traced(cpu)
    backend = RecordingBackend()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 8, generator=g), torch.randn(6, 8, generator=g)
    with deco_ops.use_backend("torch"), trace_interpreted_kernels(), torch.no_grad():
        assert not traced(cpu)
        pool_linear = lambda x, w: deco_ops.pool_linear(x, w, grid=(4, 4), out_grid=(2, 2))  # noqa: E731
        out = torch.compile(pool_linear, backend=backend, fullgraph=True)(x, w)
    targets = [node.target for node in backend.graphs[0].graph.nodes]
    assert torch.ops.deco.pool_linear.default in targets and torch.ops.aten.mm.default not in targets
    pooled = F.adaptive_avg_pool2d(x.double().transpose(1, 2).reshape(2, 8, 4, 4), (2, 2)).flatten(2).transpose(1, 2)
    want = F.linear(pooled, w.double())
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize("backend_name", ["triton", "auto"])
def test_modules_compile_without_graph_breaks(backend_name):
    """Either backend: one graph per module (the ops are traced or opaque, never a break)."""
    torch.manual_seed(0)
    cases = [
        (deco_ops.DeCoProjector(16, 24, grid=(4, 4), out_grid=(2, 2)), (torch.randn(2, 16, 16),), {}),
        (deco_ops.CrossAttention(32, 2, batch_first=True), (torch.randn(2, 5, 32), torch.randn(2, 11, 32), torch.randn(2, 11, 32)),
         {"need_weights": False}),
        (deco_ops.QueryResampler(6, 32, 24, 2), (torch.randn(2, 13, 24),), {}),
        (deco_ops.PatchMergerProjector(8, 16), (torch.randn(16, 8),), {}),
    ]
    with deco_ops.use_backend(backend_name), trace_interpreted_kernels():
        for module, args, kwargs in cases:
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(module)(*args, **kwargs)
            assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), (type(module).__name__, explanation.break_reasons)


def test_eager_calls_between_compiled_ones_cause_no_recompile():
    """A compiled module next to eager calls of the same op (evaluation in eager, training
    compiled): the eager calls install their signatures' plan checks, and the compiled code, which
    guards on the plan lookup's code, keeps running (one frame for every batch size)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    module = deco_ops.DeCoProjector(8, 6, hidden_features=7, grid=(4, 4), out_grid=(2, 2), num_prefix_tokens=1)
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    for batch in (2, 3, 4):
        compiled(torch.randn(batch, 17, 8))
        with torch.no_grad():
            module(torch.randn(batch + 20, 17, 8))
    assert counter.frame_count == 1


def _scale(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_traced_launch_takes_the_config_eager_would(monkeypatch):
    """On a GPU a trace records the config an eager launch takes untimed (tuning table, the bucket's
    earlier choice, DECO_OPS_AUTOTUNE=0), so Inductor launches the same tile; with nothing to go by,
    the whole autotuner (Inductor times its candidates). Checked on a compiled-kernel TunedKernel
    (no launch: ``for_trace`` only decides)."""
    monkeypatch.setattr(_tuning, "INTERPRET", False)
    monkeypatch.setattr(_tuning, "TUNED_KERNELS", [])  # the suite's list of real kernels stays as it is
    small, large = (triton.Config({"BLOCK": b}) for b in (32, 128))
    kernel = _tuning.TunedKernel(JITFunction(_scale), [small, large], [small, large], key=["n"], buckets=("n",))
    x = torch.randn(100)
    args, kwargs = (x, torch.empty_like(x), 100), {}
    assert kernel.for_trace(args, kwargs) is kernel  # autotuning on, nothing known: Inductor times both
    kernel.chosen[kernel.bucket_label({"x_ptr": x, "out_ptr": x, "n": 100})] = large  # an eager launch chose
    traced = kernel.for_trace(args, kwargs)
    assert traced.configs == [large] and traced.fn is kernel.fn and kernel.for_trace(args, kwargs) is traced
    monkeypatch.setenv("DECO_OPS_AUTOTUNE", "0")
    kernel.chosen.clear()
    assert kernel.for_trace(args, kwargs).configs == [small]  # untimed: the first candidate, as eager
