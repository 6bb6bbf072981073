"""The ops in the tools of a training run: DDP and FSDP2 (``fully_shard``) in 2 processes (NCCL
on two GPUs where the machine has them, else gloo on CPU tensors) give one process's loss and gradients; ``torch.utils.checkpoint`` (non-reentrant) around
every op and module gives the gradients without it, dropout included; ``torch.compile`` with
dynamic batch and key counts compiles once, not once per batch size."""

import contextlib
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import deco_ops
from harness import DEVICE, PassThrough, assert_close, randn

GRID, OUT_GRID, C = (4, 4), (2, 2), 16


class Tiny(nn.Module):
    """A compressor as a training run holds it: DeCo projector, then learned queries attending
    to its tokens through the nn.MultiheadAttention drop-in (with dropout)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.proj = deco_ops.DeCoProjector(C, 32, hidden_features=24, grid=GRID, out_grid=OUT_GRID)
        self.attn = deco_ops.CrossAttention(32, 2, dropout=dropout, batch_first=True)
        self.queries = nn.Parameter(torch.randn(3, 32))

    def forward(self, x):
        tokens = self.proj(x)
        return self.attn(self.queries.expand(x.shape[0], -1, -1), tokens, tokens, need_weights=False)[0]


def _model():
    torch.manual_seed(0)
    return Tiny()


def _batch(device: torch.device, batch=4):
    return randn(batch, 16, C, generator=torch.Generator().manual_seed(1)).to(device)


def _distributed() -> tuple[str, str]:
    """(process-group backend, device type) of the two-process test: NCCL with one GPU per rank
    where there are two, else gloo on CPU tensors (one GPU cannot host two NCCL ranks)."""
    return ("nccl", "cuda") if torch.cuda.device_count() >= 2 else ("gloo", "cpu")


def _rank_device(rank: int) -> torch.device:
    kind = _distributed()[1]
    return torch.device(kind, rank) if kind == "cuda" else torch.device("cpu")


def _loss(model, x):
    return model(x).square().mean()


def _full_grads(model) -> dict[str, torch.Tensor]:
    """Gradients as full tensors (FSDP2 holds DTensor shards)."""
    return {n: getattr(p.grad, "full_tensor", p.grad.clone)() for n, p in model.named_parameters()}


def _wrap(model, mode, world):
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    mesh = dist.device_mesh.init_device_mesh(_distributed()[1], (world,))
    for child in (model.proj, model.attn, model):
        fully_shard(child, mesh=mesh)
    return model


def _worker(rank, world, store_path, out_path):
    """One training step per mode on this rank's half of the batch; rank 0 saves what it sees."""
    backend, _ = _distributed()
    device = _rank_device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        results = _steps(rank, world, device)
        # The wrapped models sit in reference cycles (FSDP's state, DDP's reducer) that hold the
        # process group: collect them while the interpreter is alive. Left to interpreter exit,
        # gloo's teardown aborted the process ("terminate called without an active exception")
        # in about 1 spawn in 15, with plain torch modules as well (0 in 60 with the collection).
        gc.collect()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _steps(rank, world, device) -> dict[str, dict]:
    """Each mode's loss averaged over the ranks and full gradients, as plain tensors."""
    results = {}
    with torch.device(device), deco_ops.use_backend("auto"):
        for mode in MODES:
            model = _model()
            wrapped = _wrap(model, mode, world)  # DDP's reducer lives as long as the wrapper: keep it through backward
            loss = _loss(wrapped, _batch(device).chunk(world)[rank])
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # gloo has no AVG: sum, then divide (NCCL alike here)
            results[mode] = {"loss": mean_loss / world, "grads": _full_grads(model)}
    return results


MODES = ("ddp", "fsdp2")


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Both modes in one spawn of 2 processes (process start-up dominates the cost)."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(2, str(tmp / "store"), str(tmp / "rank0.pt")), nprocs=2, join=True)
    return torch.load(tmp / "rank0.pt")


@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_two_processes_match_one(two_process_results, mode):
    """Each of 2 ranks (``_distributed``) takes half the batch; their averaged loss and gradients
    equal one process's over the whole batch on rank 0's device (DDP all-reduces gradients; FSDP2
    shards parameters, gathers them for forward and backward and reduce-scatters gradients)."""
    got = two_process_results[mode]
    device = _rank_device(0)
    with torch.device(device), deco_ops.use_backend("auto"):
        model = _model()
        loss = _loss(model, _batch(device))
        loss.backward()
    assert_close(got["loss"], loss.detach(), torch.float32, f"{mode} loss")
    want = _full_grads(model)
    assert got["grads"].keys() == want.keys()
    for name, grad in want.items():
        assert_close(got["grads"][name], grad, torch.float32, f"{mode} grad {name}")


def _checkpoint_cases():
    """name -> (callable of the leaves, leaf shapes); dropout > 0 where an op has it, so the
    recomputation must replay the same mask (checkpoint restores the RNG state it drew from)."""
    torch.manual_seed(0)
    projector = deco_ops.DeCoProjector(C, 8, hidden_features=12, grid=GRID, out_grid=OUT_GRID)
    attention = deco_ops.CrossAttention(16, 2, dropout=0.3, batch_first=True, add_bias_kv=True)
    resampler = deco_ops.QueryResampler(3, 16, C, 2, dropout=0.3)
    mlp = [(12, C), (12,), (8, 12), (8,)]
    tokens = (2, 16, C)
    pool = {"grid": GRID, "out_grid": OUT_GRID}
    lens = torch.tensor([7, 3])
    return {
        "adaptive_avg_pool_tokens": (lambda x: deco_ops.adaptive_avg_pool_tokens(x, GRID, OUT_GRID), [tokens]),
        "pool_linear": (lambda x, w, b: deco_ops.pool_linear(x, w, b, **pool), [tokens, (8, C), (8,)]),
        "pool_mlp": (lambda x, *p: deco_ops.pool_mlp(x, *p, **pool), [tokens, *mlp]),
        "mlp_pool": (lambda x, *p: deco_ops.mlp_pool(x, *p, **pool, mode="bilinear"), [tokens, *mlp]),
        "pool_mlp_packed": (
            lambda x, *p: deco_ops.pool_mlp_packed(x, torch.tensor([[4, 4], [2, 3]]), *p, stride=2)[0],
            [(22, C), *mlp],
        ),
        "cross_attention": (
            lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=lens, dropout_p=0.3),
            [(1, 3, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)],
        ),
        "DeCoProjector": (projector, [tokens]),
        "CrossAttention": (lambda q, kv: attention(q, kv, kv, need_weights=False)[0], [(2, 3, 16), (2, 7, 16)]),
        "QueryResampler": (lambda x: resampler(x, kv_lens=lens), [(2, 7, C)]),
    }


# every op and module on the default backend; on the Triton kernels the attention op (dropout
# inside the kernels) and both modules
CHECKPOINT_CASES = [("auto", name) for name in _checkpoint_cases()] + [
    ("triton", name) for name in ("cross_attention", "DeCoProjector", "CrossAttention")
]


@pytest.mark.parametrize("backend_name,name", CHECKPOINT_CASES, ids=str)
def test_activation_checkpointing(backend_name, name):
    """``checkpoint(fn, use_reentrant=False)`` recomputes the forward in backward: same output,
    same input and parameter gradients as without it, bit for bit."""
    fn, shapes = _checkpoint_cases()[name]
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else [
        p for cell in (fn.__closure__ or ()) if isinstance(cell.cell_contents, nn.Module) for p in cell.cell_contents.parameters()
    ]
    g = torch.Generator().manual_seed(2)
    inputs = [randn(*s, generator=g) for s in shapes]
    results = []
    for wrap in (lambda *t: fn(*t), lambda *t: checkpoint(fn, *t, use_reentrant=False)):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        for p in params:
            p.grad = None
        torch.manual_seed(3)  # the dropout draw
        with deco_ops.use_backend(backend_name):
            out = wrap(*leaves)
            out.backward(randn(*out.shape, generator=torch.Generator().manual_seed(4)))
        results.append([out.detach()] + [t.grad for t in leaves] + [p.grad.clone() for p in params])
    assert len(results[1]) == len(results[0])
    for i, (got, want) in enumerate(zip(*results[::-1])):
        assert torch.equal(got, want), f"{name}: result {i} differs under checkpoint"


def test_torch_compile_dynamic_batch_and_keys_compiles_once():
    """Batch sizes 2..5 and key counts 7..13 through the graphs compiled for the first call: the
    ops' fake implementations take symbolic sizes, so nothing specialises on them."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Tiny()
    resampler = deco_ops.QueryResampler(3, 32, C, 2)
    compiles = {}
    for name, fn in (("projector+attention", model), ("resampler", resampler)):
        counter = CompileCounterWithBackend("eager")  # Dynamo decides recompiles; its fake tensors run the ops' fake kernels
        compiled = torch.compile(fn, backend=counter, dynamic=True, fullgraph=True)
        for batch, keys in ((2, 7), (3, 9), (4, 11), (5, 13)):
            with deco_ops.use_backend("auto"):
                if name == "resampler":
                    x = torch.randn(batch, keys, C)
                    lens = torch.randint(1, keys + 1, (batch,))
                    out, ref = compiled(x, lens), resampler(x, lens)
                else:
                    x = torch.randn(batch, 16, C)
                    out, ref = compiled(x), model(x)
            out.sum().backward()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
            compiles.setdefault(name, []).append(counter.frame_count)
    assert all(counts[0] >= 1 and counts == counts[:1] * 4 for counts in compiles.values()), compiles


@pytest.mark.parametrize("name", ["pool_mlp", "mlp_pool", "merge_mlp", "cross_attention"])
def test_second_order_through_a_backward_without_formula_raises(name):
    """docs/api.md: these ops' backward ops have no autograd formula of their own, so a backward
    through their gradients (``create_graph=True``) must raise, never return a wrong value (a
    gradient that treated the backward as constant would be silently wrong)."""
    g = torch.Generator().manual_seed(0)
    x = randn(2, 16, 8, generator=g).requires_grad_(True)
    w1, b1 = randn(12, 8, generator=g), randn(12, generator=g)
    w2, b2 = randn(6, 12, generator=g), randn(6, generator=g)
    ops = {
        "pool_mlp": lambda: deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
        "mlp_pool": lambda: deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
        "merge_mlp": lambda: deco_ops.merge_mlp(x, torch.ones_like(x[0, 0]), None, randn(12, 32, generator=g),
                                                b1, w2, b2),
        "cross_attention": lambda: deco_ops.cross_attention(x.view(2, 4, 4, 8)[:, :2], x.view(2, 4, 4, 8), x.view(2, 4, 4, 8)),
    }
    (grad,) = torch.autograd.grad(ops[name]().square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd formula|not implemented"):
        grad.square().sum().backward()


def _regions_ending_in_a_torch_op():
    """name -> (region, leaf shapes): each ends in a PyTorch op whose backward runs first and so
    unpacks first, starting the recompute outside any op of ours."""
    torch.manual_seed(0)
    resampler = deco_ops.QueryResampler(3, 16, C, 2)
    w = torch.randn(5, 16)
    mlp = [torch.randn(12, C), torch.randn(12), torch.randn(16, 12), torch.randn(16)]
    return {
        "QueryResampler": (lambda x: resampler(x), [(2, 7, C)]),
        "cross_attention": (lambda q, k, v: F.linear(deco_ops.cross_attention(q, k, v).flatten(2), w),
                            [(1, 3, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)]),
        "pool_mlp": (lambda x: F.linear(deco_ops.pool_mlp(x, *mlp, grid=GRID, out_grid=OUT_GRID), w), [(2, 16, C)]),
    }


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton kernels on CPU tensors (the interpreter) against the PyTorch path")
@pytest.mark.parametrize("mode", ["plain", "dispatch_mode"])
@pytest.mark.parametrize("determinism_check", ["default", "none"])
@pytest.mark.parametrize("forward_backend,backward_backend", [("triton", "auto"), ("torch", "triton")])
@pytest.mark.parametrize("name", list(_regions_ending_in_a_torch_op()))
def test_checkpoint_recomputes_under_the_forward_s_settings(name, forward_backend, backward_backend, determinism_check, mode):
    """The recompute of a non-reentrant checkpoint starts when backward first unpacks one of the
    region's tensors, here in a PyTorch op, in the context backward runs in: with the forward in a
    ``use_backend`` block and ``backward()`` outside it (or on CUDA's autograd thread, which sees no
    block), the region was recomputed on the other backend (a CheckpointError; with the check off,
    kernels handed tensors of other shapes: a heap corruption in the interpreter). It now runs
    under the forward's blocks: the gradients are those of the same forward without checkpoint.
    ``dispatch_mode``: the forward under a dispatch mode (the op through ``torch.ops.deco``), the
    recompute without it (the plain path): both record the op's Function (SDPA's own node, which
    dense attention records outside a checkpoint, saves other tensors: a CheckpointError)."""
    fn, shapes = _regions_ending_in_a_torch_op()[name]
    g = torch.Generator().manual_seed(5)
    inputs = [randn(*s, generator=g) for s in shapes]
    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with deco_ops.use_backend(forward_backend), PassThrough() if mode == "dispatch_mode" else contextlib.nullcontext():
            out = checkpoint(fn, *leaves, use_reentrant=False, determinism_check=determinism_check) if checkpointed else fn(*leaves)
        with deco_ops.use_backend(backward_backend):
            grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for i, (got, want) in enumerate(zip(*grads[::-1])):
        assert torch.equal(got, want), f"{name}: gradient {i} differs under checkpoint"


def test_checkpoint_frame_is_found():
    """``deco_ops._checkpoint`` finds a checkpoint's frame through PyTorch internals (no public
    hook): this fails where a PyTorch release moves them, before a recompute silently stops
    following the forward's settings."""
    from deco_ops import _checkpoint

    found = []

    def region(x):
        hooks = _checkpoint.saved_tensors_hooks(False)
        found.append(hooks is not None and _checkpoint._checkpoint_frame(hooks[0]) is not None)
        return x.sin()

    x = randn(3).requires_grad_(True)
    checkpoint(region, x, use_reentrant=False).sum().backward()
    assert found == [True, False]  # the forward's frame; the recompute runs under other hooks


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the Triton kernels on CPU tensors (the interpreter) against the PyTorch path")
def test_checkpoint_recompute_leaves_a_block_opened_inside_the_region():
    """A ``use_backend`` block opened inside the region, around its first op of ours: the recompute
    must start outside it, as the forward did, so the ops after the block run on the outer backend
    again (a context copied at the first op held the block's setting, and leaving the block in the
    recompute restored it: the attention after it was recomputed on the kernels, a CheckpointError)."""
    torch.manual_seed(0)
    mlp = [torch.randn(12, C), torch.randn(12), torch.randn(16, 12), torch.randn(16)]
    w = torch.randn(5, 16)

    def region(x, q, k, v):
        with deco_ops.use_backend("triton"):
            y = deco_ops.pool_mlp(x, *mlp, grid=GRID, out_grid=OUT_GRID)
        return F.linear(deco_ops.cross_attention(q, k, v).flatten(2), w).square().sum() + y.square().sum()

    g = torch.Generator().manual_seed(6)
    inputs = [randn(*s, generator=g) for s in [(2, 16, C), (2, 3, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)]]
    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with deco_ops.use_backend("torch"):
            out = checkpoint(region, *leaves, use_reentrant=False) if checkpointed else region(*leaves)
            grads.append(torch.autograd.grad(out, leaves))
    for i, (got, want) in enumerate(zip(*grads[::-1])):
        assert torch.equal(got, want), f"gradient {i} differs under checkpoint"


def test_checkpoint_recomputes_on_two_threads_at_once():
    """Two outputs of one region, differentiated on two threads at the same time: each backward
    recomputes the region, both in the forward's context (a single kept context entered twice
    raised RuntimeError: cannot enter context). The recompute runs on the backend of the forward's
    block, though neither thread is inside it."""
    import threading
    import time

    w = randn(5, 16)
    calls = []

    def region(q, k, v):
        calls.append(None)
        time.sleep(0.2)  # the two recomputes overlap
        o = deco_ops.cross_attention(q, k, v).flatten(2)
        return F.linear(o, w), F.linear(o, 2 * w)

    leaves = [randn(*s).requires_grad_(True) for s in [(2, 3, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)]]
    with deco_ops.use_backend("torch"):  # Triton's interpreter is not thread-safe (a GPU's kernels are)
        outputs = checkpoint(region, *leaves, use_reentrant=False)
        expected = [torch.autograd.grad(region(*leaves)[i].sum(), leaves) for i in range(2)]
    calls.clear()
    results, errors = [None, None], []

    def differentiate(i):
        try:
            results[i] = torch.autograd.grad(outputs[i].sum(), leaves, retain_graph=True)
        except Exception as e:  # reported below, with the thread's error
            errors.append(e)

    threads = [threading.Thread(target=differentiate, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(calls) == 2, "each backward recomputes the region"
    for got, want in zip(results, expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_backward_node_runs_on_two_threads_at_once():
    """Two backward passes over one graph (``retain_graph=True``) on two threads may run the same
    node of ours at once: each runs in its own copy of the forward's context (one kept context
    entered by both raised RuntimeError: cannot enter context)."""
    import contextvars
    import threading
    from types import SimpleNamespace

    from deco_ops import _direct

    inside, release = threading.Event(), threading.Event()

    def backward(ctx, grad):
        if not inside.is_set():
            inside.set()
            release.wait(10)  # the first call stays inside until the second has run
        return grad

    run = _direct._in_forward_context(backward)
    ctx = SimpleNamespace(forward_context=contextvars.copy_context())
    first = threading.Thread(target=run, args=(ctx, 1))
    first.start()
    assert inside.wait(10)
    try:
        assert run(ctx, 2) == 2
    finally:
        release.set()
        first.join()


def _merge_reference(x, nw, w1, b1, w2, b2, norm):
    """Qwen2/2.5-VL's merger in eager PyTorch: each token normed over C, 2x2 blocks concatenated, MLP."""
    n = F.layer_norm(x, x.shape[-1:], nw, None, 1e-6) if norm == "layernorm" else F.rms_norm(x, x.shape[-1:], nw, 1e-6)
    return F.linear(F.gelu(F.linear(n.reshape(*x.shape[:-2], -1, 4 * x.shape[-1]), w1, b1)), w2, b2)


def _mlp_pool_reference(x, _, w1, b1, w2, b2):
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return F.adaptive_avg_pool2d(y.transpose(1, 2).unflatten(2, GRID), OUT_GRID).flatten(2).transpose(1, 2)


# name -> (fused op, eager twin, which of (norm weight, w1, b1, w2, b2) train): the cases that eager
# PyTorch trains on tokens made under torch.inference_mode (it saves no inference tensor for them)
INFERENCE_TOKEN_CASES = {
    "merge_mlp rmsnorm": (lambda x, nw, w1, b1, w2, b2: deco_ops.merge_mlp(x, nw, None, w1, b1, w2, b2, norm="rmsnorm"),
                          lambda *a: _merge_reference(*a, "rmsnorm"), (True, True, True, True, True)),
    "merge_mlp layernorm frozen": (lambda x, nw, w1, b1, w2, b2: deco_ops.merge_mlp(x, nw, None, w1, b1, w2, b2),
                                   lambda *a: _merge_reference(*a, "layernorm"), (False, True, True, True, True)),
    "mlp_pool w1 frozen": (lambda x, _, w1, b1, w2, b2: deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
                           _mlp_pool_reference, (False, False, True, True, True)),
    "mlp_pool second layer": (lambda x, _, w1, b1, w2, b2: deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=GRID, out_grid=OUT_GRID),
                              _mlp_pool_reference, (False, False, False, True, True)),
}


@pytest.mark.parametrize("name", list(INFERENCE_TOKEN_CASES))
def test_tokens_made_under_inference_mode_train_the_layers_after_them(backend, name):
    """A frozen vision tower run under ``torch.inference_mode()`` hands the projector inference
    tensors, which autograd cannot save for backward. Eager PyTorch trains the layers after them
    where it saves none (an RMSNorm's output, the first Linear's output, not the tokens); the
    fused ops raised "Inference tensors cannot be saved for backward" there (they kept the
    tokens to rebuild the norm or the pre-activation in the backward)."""
    fused, eager, trains = INFERENCE_TOKEN_CASES[name]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        x = randn(2, 16, 8, generator=g)
    params = [randn(8, generator=g) if name.startswith("merge") else None, randn(12, 32 if name.startswith("merge") else 8, generator=g),
              randn(12, generator=g), randn(6, 12, generator=g), randn(6, generator=g)]
    params = [p if p is None else p.requires_grad_(t) for p, t in zip(params, trains)]
    wrt = [p for p in params if p is not None and p.requires_grad]
    leaves = [p if p is None else p.detach().double().requires_grad_(p.requires_grad) for p in params]
    out, ref = fused(x, *params), eager(x.double(), *leaves)
    grad = randn(*ref.shape, generator=g)
    assert_close(out, ref, torch.float32)
    wants = torch.autograd.grad(ref, [p for p in leaves if p is not None and p.requires_grad], grad.double())
    for got, want in zip(torch.autograd.grad(out, wrt, grad), wants, strict=True):
        assert_close(got, want, torch.float32, "gradient")
