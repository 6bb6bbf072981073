"""The host path of a plain eager call (``deco_ops._plan``): per-signature plans that never change
what a call computes or raises, and a pinned number of Python-level calls per op call (cProfile's
count is deterministic; the time it stands for is ``python -m benchmarks.host_cost``'s to report)."""

import contextlib
import gc
import weakref
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import deco_ops
from benchmarks import host_cost
from deco_ops import _backend, _direct, _plan, attention, composed_attention, projector, reference_attention, strategy
from harness import DEVICE, assert_close, head_strided, randn

cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="counts the PyTorch path's calls on CPU tensors")

# op -> {mode: cProfile total_calls of one warm call with the user's default settings (no backend
# or strategy chosen: the PyTorch path on CPU tensors)}: measured, plus a margin of 2 for harmless
# drift (1 where 2 would pass issue 20's limit). Issue 20 asks for <= 60 per op call (the forward modes); the eager code these ops replace
# makes 21, 19, 18, 21, 13, 16, 8 and (two images) 36 calls, counted the same way
# (python -m benchmarks.host_cost). fwd+bwd counts torch's own backward() too (eager: 56-85 calls);
# pinned so that the backward ops' plans stay (test_backward_ops_are_planned checks each plan itself).
# autocast: fp32 inputs inside a bf16 autocast region, run as the plain call of the cast inputs
# (``_autocast.plain_call``: the casts, then the op's plan); through the dispatcher 183-389 calls.
CALLS = {
    "pool_mlp": {"infer": 34 + 2, "grad": 44 + 2, "fwd+bwd": 175 + 2, "autocast": 131 + 2, "autocast+bwd": 298 + 2},
    "pool_linear": {"infer": 32 + 2, "grad": 42 + 2, "fwd+bwd": 139 + 2, "autocast": 107 + 2, "autocast+bwd": 240 + 2},
    "adaptive_avg_pool_tokens": {"infer": 30 + 2, "grad": 39 + 2, "fwd+bwd": 125 + 2, "autocast": 73 + 2, "autocast+bwd": 194 + 2},
    "mlp_pool": {"infer": 36 + 2, "grad": 44 + 2, "fwd+bwd": 155 + 2, "autocast": 145 + 2, "autocast+bwd": 293 + 2},
    "merge_mlp": {"infer": 29 + 2, "grad": 43 + 2, "fwd+bwd": 170 + 2, "autocast": 147 + 2, "autocast+bwd": 315 + 2},
    "merge_mlp_grid": {"infer": 33 + 2, "grad": 48 + 2, "fwd+bwd": 183 + 2, "autocast": 151 + 2, "autocast+bwd": 328 + 2},
    "cross_attention": {"infer": 27 + 2, "grad": 29 + 2, "fwd+bwd": 81 + 2, "autocast": 114 + 2, "autocast+bwd": 194 + 2},
    "pool_mlp_packed": {"infer": 51 + 2, "grad": 59 + 1, "fwd+bwd": 197 + 2, "autocast": 173 + 2, "autocast+bwd": 345 + 2},
}
FORWARD_LIMIT = 60  # issue 20


@pytest.fixture
def default_path():
    """The default backend on CPU tensors (the PyTorch path), strategy ``auto``."""
    with deco_ops.use_backend("auto"), deco_ops.use_strategy("auto"):
        yield


@pytest.fixture
def user_settings(monkeypatch):
    """No backend or strategy chosen anywhere, as in a user's process: both read from the
    (unset) environment on every call."""
    tokens = [(setting, setting.overrides.set(None)) for setting in (_backend.SETTING, strategy.SETTING)]
    for setting, _ in tokens:
        monkeypatch.delenv(setting.var, raising=False)
    yield
    for setting, token in tokens:
        setting.overrides.reset(token)


@cpu_only
@pytest.mark.parametrize("op,mode", [(op, mode) for op, modes in CALLS.items() for mode in modes])
def test_python_calls_per_call(op, mode, user_settings):
    case = next(c for c in host_cost.CASES if c.name == op)
    run = host_cost.call_of(case, case.ours, mode)
    with host_cost.region(mode):
        calls = host_cost.python_calls(run)
    assert calls <= CALLS[op][mode], f"{op} {mode}: {calls} Python-level calls per call"
    assert mode not in ("infer", "grad") or CALLS[op][mode] <= FORWARD_LIMIT


def _pool_mlp(x, *params, grid=(4, 4)):
    return deco_ops.pool_mlp(x, *params, grid=grid, out_grid=(2, 2))


def _projector_inputs():
    return [t.to(DEVICE) for t in host_cost._projector_inputs()]


def test_plans_give_the_full_paths_bits_and_gradients(default_path):
    """A planned call (the second of a signature) equals the dispatched op, forward and backward."""
    inputs = _projector_inputs()
    outputs = []
    for dispatched in (False, False, True):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with _plan.unplanned() if dispatched else contextlib.nullcontext():
            y = _pool_mlp(*leaves)
        y.backward(torch.ones_like(y))
        outputs.append([y.detach(), *(t.grad for t in leaves)])
    for a, b in zip(outputs[1], outputs[2]):
        assert torch.equal(a, b)


def test_grad_mode_and_requires_grad_select_their_own_plan(default_path):
    x, *params = _projector_inputs()
    w1 = params[0].clone().requires_grad_(True)
    assert _pool_mlp(x, w1, *params[1:]).grad_fn.__class__.__name__ == "deco_pool_mlpBackward"
    with torch.no_grad():
        assert _pool_mlp(x, w1, *params[1:]).grad_fn is None
    assert _pool_mlp(x, *params).grad_fn is None
    assert _pool_mlp(x, w1, *params[1:]).grad_fn is not None


@pytest.mark.parametrize("grid,error,match", [
    ((4, 4.0), TypeError, "grid entries must be ints"),
    ((True, 16), TypeError, "grid entries must be ints"),
    ([4, 4.0], TypeError, "grid entries must be ints"),
    ((4, [4]), TypeError, "grid entries must be ints"),
    ((torch.tensor([4, 4]), 4), TypeError, "grid entries must be ints"),  # no tensor meets == in the last signatures' check
    ((2, 4), ValueError, "x has 16 tokens but grid"),
])
def test_arguments_equal_to_a_planned_call_still_raise(grid, error, match, default_path):
    """``(4, 4.0)`` and ``(True, 16)`` hash like ``(4, 4)`` and ``(1, 16)``: a signature keeps the
    types, as the last call's check does (each planned grid once as the last call, once as a plan
    remembered behind another)."""
    inputs = _projector_inputs()
    for planned in ((1, 16), (4, 4), (1, 16)):
        _pool_mlp(*inputs, grid=planned)
        with pytest.raises(error, match=match):
            _pool_mlp(*inputs, grid=grid)


class _SeesOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _variants(x, w):
    """(name, arguments, whether their signature is (x, w, (4, 4), 1.0)'s) for ``Plans.get``; ``1 == 1.0``
    and ``hash(1) == hash(1.0)``: only the value's type tells them apart."""
    yield "same", (x, w, (4, 4), 1.0), True
    yield "strides", (torch.cat([x, x], 1)[:, :4], w, (4, 4), 1.0), True  # the other strides are not part of a signature
    yield "last stride", (x.t().contiguous().t(), w, (4, 4), 1.0), False  # whether the last is 1 is
    yield "dtype", (x.double(), w, (4, 4), 1.0), False
    yield "shape", (x[:, :2], w, (4, 4), 1.0), False
    yield "requires_grad", (x.clone().requires_grad_(True), w, (4, 4), 1.0), False
    yield "parameter", (torch.nn.Parameter(x.clone()), w, (4, 4), 1.0), False
    yield "none for a tensor", (x, None, (4, 4), 1.0), False
    yield "tensor for a value", (x, w, (4, 4), torch.tensor(1.0)), False
    yield "item type", (x, w, (4, 4.0), 1.0), False
    yield "bool for an int", (x, w, (True, 4), 1.0), False
    yield "list for a tuple", (x, w, [4, 4], 1.0), False
    yield "value", (x, w, (4, 4), 0.25), False
    yield "int for a float", (x, w, (4, 4), 1), False  # equal and hashed alike: the type tells


@pytest.mark.parametrize("variant", [name for name, _, _ in _variants(torch.ones(3, 4), torch.ones(4))])
def test_the_last_signatures_are_checked_as_their_key_is(variant):
    """``Plans.get`` answers a call that repeats one of the last two signatures without building
    its key (``_plan.Recent``): every difference the key tells apart (module docstring) must miss
    there, in either slot and with a third signature cycling through the dictionary; strides alone
    but the last must hit."""
    x, w = torch.randn(3, 4), torch.randn(4)
    _, args, same = next(v for v in _variants(x, w) if v[0] == variant)
    built = []
    plans = _plan.Plans(lambda *a: built.append(a) or len(built))
    base, third = (x, w, (4, 4), 1.0), (x[:1], w, (4, 4), 1.0)
    assert plans.get(*base) == 1 and plans.get(*base) == 1
    assert plans.get(*args) == (1 if same else 2)  # checked against the last call's signature
    assert plans.get(*base) == 1  # the second slot, or the first
    assert plans.get(*base) == 1
    assert plans.get(*args) == (1 if same else 2)
    for _ in range(2):  # three signatures in turn: each one in neither slot when it comes
        assert [plans.get(*base), plans.get(*args), plans.get(*third)] == [1, 1 if same else 2, 2 if same else 3]
    assert len(built) == (2 if same else 3)
    assert _plan.signature(args) == _plan.signature(base) if same else _plan.signature(args) != _plan.signature(base)


def test_a_list_changed_in_place_is_another_signature(default_path):
    """A grid passed as a list and then changed in place by the caller is a new signature: the
    last signatures hold copies of list arguments, not the caller's lists (same token counts, so
    only the windows tell the plans apart)."""
    x, *params = _projector_inputs()
    grid, out_grid = [4, 4], [2, 2]
    first = deco_ops.pool_mlp(x, *params, grid=grid, out_grid=out_grid)
    assert torch.equal(deco_ops.pool_mlp(x, *params, grid=grid, out_grid=out_grid), first)
    grid[:], out_grid[:] = [2, 8], [1, 4]
    want = deco_ops.pool_mlp(x, *params, grid=(2, 8), out_grid=(1, 4))
    assert not torch.equal(want, first)
    assert torch.equal(deco_ops.pool_mlp(x, *params, grid=grid, out_grid=out_grid), want)
    assert torch.equal(deco_ops.pool_mlp(x, *params, grid=[2, 8], out_grid=[1, 4]), want)


def test_the_last_signatures_include_the_global_state(default_path):
    """Grad mode, a strategy or backend block, autocast, a dispatch mode, ``unplanned``: the last
    calls' plans are not reused (a new plan, or the full path: None)."""
    x = torch.randn(3, 4)
    plans = _plan.Plans(lambda *a: object())
    planned = plans.get(x, (4, 4))
    assert plans.get(x, (4, 4)) is planned
    with torch.no_grad():
        assert plans.get(x, (4, 4)) not in (planned, None)
    with deco_ops.use_strategy("composed"):
        assert plans.get(x, (4, 4)) not in (planned, None)
    with deco_ops.use_backend("torch"):
        assert plans.get(x, (4, 4)) not in (planned, None)
    assert plans.get(x, (4, 4)) is planned
    with _plan.unplanned():  # every call takes its full path
        assert plans.get(x, (4, 4)) is None
    with torch.autocast("cpu"):
        assert plans.get(x, (4, 4)) is None
    with _SeesOps():
        assert plans.get(x, (4, 4)) is None
    assert plans.get(x, (4, 4)) is planned


def test_kv_lens_values_are_read_on_every_call(default_path):
    """A planned call holds no kv_lens values: out-of-range lengths are clamped into [0, N] on every
    call, as on the first (checked) one."""
    q, k, v = (t.to(DEVICE) for t in host_cost._attention_inputs())
    N = k.shape[1]
    for lens, clamped in (([N, 3], [N, 3]), ([N + 4, -2], [N, 0]), ([1, N + 1], [1, N])):
        got = deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor(lens, device=DEVICE))
        want = deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor(clamped, device=DEVICE))
        assert torch.equal(got, want), lens


@cpu_only
def test_settings_are_part_of_the_signature(default_path, monkeypatch):
    """A strategy or backend chosen after a call was planned runs, not the plan of before; so does
    a strategy set through the environment, and a decision table that changed."""
    q, k, v = host_cost._attention_inputs()
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    with mock.patch.object(composed_attention, "cpu_kernel", wraps=composed_attention.cpu_kernel) as twin:
        deco_ops.cross_attention(q, k, v)
        assert twin.call_count == 1  # auto on the PyTorch backend: SDPA
        with deco_ops.use_strategy("fused"):
            deco_ops.cross_attention(q, k, v)
        monkeypatch.setenv(strategy.ENV_VAR, "fused")
        with deco_ops.use_strategy("auto"):  # the override of the fixture, as set
            deco_ops.cross_attention(q, k, v)
        assert twin.call_count == 2
        deco_ops.cross_attention(q, k, v)
        assert twin.call_count == 3
    with mock.patch.object(projector.pool_gemm, "pool_gemm", wraps=projector.pool_gemm.pool_gemm) as kernel:
        _pool_mlp(*host_cost._projector_inputs())
        assert not kernel.called
        if deco_ops._backend.interpreting():
            with deco_ops.use_backend("triton"), deco_ops.use_strategy("fused"):
                _pool_mlp(*host_cost._projector_inputs())
            assert kernel.call_count == 1


def test_environment_variables_are_part_of_the_signature(user_settings, monkeypatch):
    """``DECO_OPS_BACKEND`` and ``TRITON_INTERPRET`` changed after a call was planned are read
    again, as on a first call: a bad backend raises, and so does the triton backend on CPU tensors
    once the interpreter is off (a plan holds neither)."""
    inputs = _projector_inputs()
    _pool_mlp(*inputs)
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DECO_OPS_BACKEND must be one of"):
        _pool_mlp(*inputs)
    if DEVICE.type != "cpu" or not _backend.interpreting():
        return
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    monkeypatch.setenv(strategy.ENV_VAR, "fused")  # the kernels, untimed
    _pool_mlp(*inputs)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs Triton's interpreter"):
        _pool_mlp(*inputs)


def test_deterministic_mode_and_autocast_are_not_reused(monkeypatch):
    x = torch.randn(2, 3)
    key = _plan.signature((x, (4, 4)))
    with torch.autocast("cpu"):
        assert _plan.signature((x, (4, 4))) is None  # autocast: the full path (its casts, its dtype rules)
    assert _plan._deterministic is torch._C._get_deterministic_algorithms  # what use_deterministic_algorithms sets
    # (the flag, not torch.use_deterministic_algorithms(True) itself: its first use costs seconds)
    monkeypatch.setattr(_plan, "_deterministic", lambda: True)
    assert _plan.signature((x, (4, 4))) != key
    monkeypatch.undo()
    # warn-only deterministic mode runs flash's non-deterministic backward (composed_attention.deterministic_backward)
    assert _plan._warn_only is torch._C._get_deterministic_algorithms_warn_only
    monkeypatch.setattr(_plan, "_warn_only", lambda: True)
    assert _plan.signature((x, (4, 4))) != key
    monkeypatch.undo()
    assert _plan.signature((x, (4, 4))) == key


def test_strategy_decisions_drop_the_plans(default_path):
    plans = projector._pool_mlp_plans
    _pool_mlp(*_projector_inputs())
    assert plans._plans
    strategy.preload({})
    assert not plans._plans
    with mock.patch.object(plans, "_build", wraps=plans._build) as build:
        _pool_mlp(*_projector_inputs())  # the last signature's check went with its plan: built again, once
        _pool_mlp(*_projector_inputs())
    assert build.call_count == 1


def test_a_build_that_drops_the_plans_leaves_none_of_before():
    """A plan's build may drop every plan (its strategy choice loads a tuning table, whose decisions
    ``strategy.preload`` hands over): the signature before it is built again, not answered from the
    last signatures as they were before the drop."""
    x = torch.randn(3, 4)
    built = []

    def build(x, grid):
        built.append(grid)
        if grid == (2, 8):
            strategy.preload({})
        return len(built)

    plans = _plan.Plans(build)
    assert [plans.get(x, (4, 4)), plans.get(x, (4, 4)), plans.get(x, (2, 8)), plans.get(x, (4, 4))] == [1, 1, 2, 3]


def test_plans_are_bounded_and_hold_no_tensor(default_path, monkeypatch):
    monkeypatch.setattr(_plan, "MAX_PLANS", 3)
    x, *params = _projector_inputs()
    for batch in range(1, 6):
        _pool_mlp(x.expand(batch, -1, -1), *params)
    plans = projector._pool_mlp_plans
    assert len(plans._plans) == 3
    with mock.patch.object(plans, "_build", wraps=plans._build) as build:  # the oldest went first: batch 3 kept, 1 built again
        _pool_mlp(x.expand(3, -1, -1), *params)
        assert build.call_count == 0
        _pool_mlp(x.expand(1, -1, -1), *params)
        assert build.call_count == 1
    x = torch.randn(7, 16, 16, device=DEVICE)
    alive = weakref.ref(x)
    _pool_mlp(x, *params)
    del x
    gc.collect()
    assert alive() is None


def test_dropping_the_oldest_plan_while_another_thread_does(default_path, monkeypatch):
    """Threads building plans past ``MAX_PLANS`` at once (a serving process whose packed layouts or
    lengths vary) both dropped the oldest plan: picked by ``next(iter(plans))``, then deleted, so
    the second delete raised ``KeyError`` out of the op call, or the pick "dictionary changed size
    during iteration" (4 threads, 3000 pooling calls each of varying lengths: one of either). Here
    "another thread" drops the oldest plan as soon as one is picked by iterating."""
    monkeypatch.setattr(_plan, "MAX_PLANS", 2)
    plans = projector._pool_mlp_plans

    class DroppedMeanwhile(type(plans._plans)):
        def __iter__(self):
            for key in list(super().__iter__()):
                self.pop(key, None)
                yield key

    monkeypatch.setattr(plans, "_plans", DroppedMeanwhile())
    x, *params = _projector_inputs()
    for batch in range(1, 6):
        y = _pool_mlp(x.expand(batch, -1, -1), *params)
        assert_close(y, _pool_mlp(x.double().expand(batch, -1, -1), *(p.double() for p in params)), torch.float32)
    assert len(plans._plans) <= 2


@pytest.mark.parametrize("op,backward_op", [("pool_mlp", "mlp_activation_backward"), ("pool_linear", "unpool_tokens"),
                                            ("cross_attention_lens", "cross_attention_backward"),
                                            ("mlp_pool", "mlp_pool_act_backward"), ("merge_mlp", "merge_norm_backward"),
                                            ("merge_mlp_grid", "merge_norm_backward"),
                                            ("pool_mlp_packed", "unpool_tokens_packed")])
def test_backward_ops_are_planned(op, backward_op, default_path):
    """The ops that autograd formulas call keep their implementation per signature too, and a
    planned backward gives the dispatched op's gradients."""
    case, inputs = _case_inputs(op)
    plans = getattr(_direct.deco, backward_op)._plans
    plans.clear()
    grads = []
    for dispatched in (False, False, True):
        leaves = [t.clone().requires_grad_(i < case.differentiable) for i, t in enumerate(inputs)]
        with _plan.unplanned() if dispatched else contextlib.nullcontext():
            y = case.ours(*leaves)
            y.backward(torch.ones_like(y))
        grads.append([t.grad for t in leaves[:case.differentiable]])
        if not dispatched:
            assert len(plans._plans) == 1
    for a, b in zip(grads[1], grads[2]):
        assert torch.equal(a, b)


def test_inference_leaves_the_lse_out(default_path, monkeypatch):
    """``need_lse`` is decided where grad mode and requires_grad are known: an inference call asks
    the composed forward for no LSE (the cheapest SDPA call on CUDA), a call autograd records does."""
    q, k, v = (t.to(DEVICE) for t in host_cost._attention_inputs())
    lens = torch.tensor([k.shape[1], 3], device=DEVICE)  # masked: not the dense call SDPA's own op runs whole on CPU
    asked = []
    real_forward = composed_attention.forward
    monkeypatch.setattr(composed_attention, "forward", lambda *a, need_lse=True, **kw: asked.append(need_lse) or real_forward(
        *a, need_lse=need_lse, **kw))
    with deco_ops.use_strategy("composed"):
        out = deco_ops.cross_attention(q, k, v, kv_lens=lens)
        with torch.no_grad():
            deco_ops.cross_attention(q, k, v.requires_grad_(True), kv_lens=lens)
        trained = deco_ops.cross_attention(q, k, v, kv_lens=lens)
    assert asked == [False, False, True]
    assert torch.equal(out, trained.detach())


def test_inference_calls_with_weights_keep_the_lse_when_planned(backend):
    """An inference call that asks for the weights (``nn.MultiheadAttention``'s default, in eval)
    needs the LSE they are normalised by, on its planned calls too (the second call of a signature
    runs the plan the first one made), though no backward will read it. On the CPU the default
    backend's plan computes them as eager softmax attention, except under saved-tensor hooks (a
    checkpointed region), where the ops run: the third call."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (randn(*shape, generator=g) for shape in ((2, 3, 2, 8), (2, 7, 2, 8), (2, 7, 2, 8)))
    want = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) / 8**0.5, -1)
    hooks = (contextlib.nullcontext(), contextlib.nullcontext(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
    with torch.no_grad():
        for call, hooked in zip(("first", "planned", "planned, hooked"), hooks):
            with hooked:
                out, weights = deco_ops.cross_attention(q, k, v, need_weights=True, average_attn_weights=False)
            assert_close(weights, want, torch.float32, f"weights, {call} call")
            assert_close(out, torch.einsum("bhmn,bnhd->bmhd", want, v.double()), torch.float32, f"output, {call} call")


def test_an_op_run_without_the_lse_refuses_to_differentiate(backend):
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in host_cost._attention_inputs())
    args = (None, None, k.shape[1], 0.25, 0.0, None, None)
    out, lse = torch.ops.deco.cross_attention(q, k, v, *args, False)
    assert lse.shape == (0,)
    full, full_lse = torch.ops.deco.cross_attention(q, k, v, *args, True)
    assert torch.equal(out, full) and full_lse.shape == (2, 2, 4)
    with pytest.raises(RuntimeError, match="need_lse=False"):
        out.sum().backward()


# cross_attention with kv_lens: masked, so not SDPA's CPU op whole (test_dense_cpu_attention_is_sdpas_own_op);
# deco's autograd Function and backward op run
_ATTENTION_LENS = host_cost.Case(
    "cross_attention_lens", lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor([k.shape[1], 3], device=k.device)),
    None, host_cost._attention_inputs, 3)


def _case_inputs(op):
    """``op``'s host_cost case and its inputs on the test device (grid tables stay on the CPU)."""
    case = next(c for c in (*host_cost.CASES, _ATTENTION_LENS) if c.name == op)
    return case, [t.to(DEVICE) if t.is_floating_point() else t for t in case.inputs()]


@pytest.mark.parametrize("op", ["mlp_pool", "merge_mlp", "merge_mlp_grid", "pool_mlp_packed"])
def test_plans_of_the_projectors_run_what_the_full_path_runs(op, default_path):
    """Planned calls of the dense, merge and packed projectors against the dispatched op: the same
    bits, forward and backward."""
    case, inputs = _case_inputs(op)
    runs = []
    for dispatched in (False, False, True):
        leaves = [t.clone().requires_grad_(i < case.differentiable) for i, t in enumerate(inputs)]
        with _plan.unplanned() if dispatched else contextlib.nullcontext():
            y = case.ours(*leaves)
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view(y.shape))
        runs.append([y.detach(), *(t.grad for t in leaves[:case.differentiable])])
    for planned, full in zip(runs[1], runs[2]):
        assert torch.equal(planned, full)


def _packed_call(inputs, grids, out_grids, op="pool_mlp_packed"):
    x, w1, b1, w2, b2 = inputs[:5]
    if op != "pool_mlp_packed":  # the resampling ops: x alone
        return getattr(deco_ops, op)(x, torch.tensor(grids), out_grids=torch.tensor(out_grids))
    return deco_ops.pool_mlp_packed(x, torch.tensor(grids), w1, b1, w2, b2, out_grids=torch.tensor(out_grids))


@pytest.mark.parametrize("op", ["pool_mlp_packed", "adaptive_avg_pool_tokens_packed", "bilinear_pool_tokens_packed"])
def test_packed_plans_are_keyed_on_the_tables_values(op, default_path):
    """Grid tables of one shape and other values (input or output grids) take their own plan; the
    caller owns the cu_seqlens a planned call returns (writing to it changes no later call)."""
    _, inputs = _case_inputs("pool_mlp_packed")
    layouts = [([[4, 4], [3, 4]], [[2, 2], [2, 2]]), ([[3, 4], [4, 4]], [[1, 3], [2, 2]]), ([[4, 4], [3, 4]], [[3, 1], [2, 2]]),
               ([[4, 4], [3, 4]], [[1, 1], [2, 2]])]
    for grids, out_grids in layouts:
        with _plan.unplanned():
            want, want_cu = _packed_call(inputs, grids, out_grids, op)
        for _ in range(2):  # the first call builds the plan, the second runs it
            y, cu = _packed_call(inputs, grids, out_grids, op)
            assert torch.equal(y, want) and torch.equal(cu, want_cu)
            cu.fill_(-1)


@pytest.mark.parametrize("grids,error,match", [
    ([[4, 4], [0, 4]], ValueError, r"grids\[1\] = \(0, 4\): entries must be >= 1"),
    ([[4, 4], [4, 4]], ValueError, "x has 28 tokens but grids need"),
    ([[4.0, 4.0], [3.0, 4.0]], TypeError, "grids must be an integer tensor"),
])
def test_packed_tables_are_checked_on_every_new_layout(grids, error, match, default_path):
    _, inputs = _case_inputs("pool_mlp_packed")
    out_grids = [[2, 2], [2, 2]]
    for _ in range(2):
        _packed_call(inputs, [[4, 4], [3, 4]], out_grids)
    with pytest.raises(error, match=match):
        _packed_call(inputs, grids, out_grids)


def _graph_nodes(tensor):
    """The names of the autograd nodes ``tensor``'s gradient runs through."""
    names, todo = [], [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            names.append(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    return names


def _in_nan_buffer(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a strided view of a NaN-filled buffer (a wider last dim)."""
    buffer = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), dtype=t.dtype, device=t.device)
    buffer[..., : t.shape[-1]] = t
    return buffer[..., : t.shape[-1]]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shared,D,scale", [(False, 8, None), (True, 8, None), (False, 80, None), (False, 64, 0.1),
                                            (True, 24, 0.3), (False, 24, 24**-0.5)])
def test_dense_cpu_attention_is_sdpas_own_op(dtype, shared, D, scale, default_path):
    """On the PyTorch backend a dense call (no kv_lens, mask or dropout) is SDPA's CPU kernel whole,
    forward and backward: planned, it calls that ATen op differentiably, so autograd records the
    op's own node and no Python Function; its output and gradients are the bits of the dispatched
    op (composed forward, deco's backward op on the same kernel), and within eager float64's reach."""
    g = torch.Generator().manual_seed(D + shared)
    B, M, N, H = 3, 5, 37, 2
    q = torch.randn(1 if shared else B, M, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, N, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, M, H, D, generator=g, dtype=torch.float64)
    runs = []
    for dispatched in (False, False, True):
        leaves = [_in_nan_buffer(t.to(dtype)).requires_grad_(True) for t in (q, k, v)]
        with _plan.unplanned() if dispatched else contextlib.nullcontext():
            out = deco_ops.cross_attention(*leaves, softmax_scale=scale)
        names = _graph_nodes(out)
        assert not any(name.startswith("deco_") for name in names) != dispatched, names
        out.backward(dout.to(dtype))
        runs.append([out.detach(), *(t.grad for t in leaves)])
    for planned, full in zip(runs[1], runs[2]):
        assert torch.equal(planned, full)
    if dtype != torch.float64:  # the bits of F.scaled_dot_product_attention itself (its default scale is ours),
        # which runs this kernel for fp32 and 16-bit inputs (its math path for float64)
        leaves = [t.to(dtype).transpose(1, 2) for t in (q.expand(B, -1, -1, -1), k, v)]
        assert torch.equal(runs[1][0], F.scaled_dot_product_attention(*leaves, scale=scale).transpose(1, 2))
    assert (runs[1][0].double() - reference_attention.attention_dense(q, k, v, scale=scale)).abs().max() < (
        1e-13 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_planned_attention_output_is_contiguous(scale, backend):
    """A planned call returns its output ``(B, M, H, D)``-contiguous, as the full path does, whatever
    the layout of q's storage (heads first: SDPA's CPU kernel lays its output out as q is)."""
    g = torch.Generator().manual_seed(21)
    B, M, N, H, D = 2, 3, 5, 2, 4
    q = torch.randn(B, H, M, D, generator=g).to(DEVICE).transpose(1, 2)  # heads-first storage
    k, v = (torch.randn(B, N, H, D, generator=g).to(DEVICE) for _ in range(2))
    want = reference_attention.attention_dense(q.double(), k.double(), v.double(), scale=scale)
    for _ in range(2):
        out = deco_ops.cross_attention(q, k, v, softmax_scale=scale)
        assert out.is_contiguous()
        assert (out.double() - want).abs().max() < 1e-5


def test_flags_given_as_tensors_are_read_on_every_call(backend):
    """``need_weights`` and ``average_attn_weights`` given as 0-d tensors (truthy as the bools they
    hold) are read on every call: a plan's signature holds a tensor's metadata, not its value."""
    g = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((2, 3, 2, 4), (2, 5, 2, 4), (2, 5, 2, 4)))
    mask = torch.rand(3, 5, generator=g).to(DEVICE) > 0.3
    for need, average, attn_mask in ((True, True, None), (True, False, None), (False, True, None), (True, True, None),
                                     (False, False, mask), (True, False, mask), (False, True, mask), (True, True, mask)):
        got = deco_ops.cross_attention(q, k, v, attn_mask=attn_mask, need_weights=torch.tensor(need),  # each flag
                                       average_attn_weights=average if attn_mask is not None else torch.tensor(average))  # alone
        want = deco_ops.cross_attention(q, k, v, attn_mask=attn_mask, need_weights=need, average_attn_weights=average)
        assert type(got) is type(want)
        for a, b in zip(got if need else (got,), want if need else (want,)):
            assert a.shape == b.shape and torch.equal(a, b)


@cpu_only
@pytest.mark.parametrize("strided", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("between", [False, True])
def test_head_stride_is_part_of_the_signature(strided, between, default_path):
    """The plan of a dense call whose head dims are unit-stride calls SDPA's CPU kernel on them as
    they are (``attention._on_cpu_sdpa``); a call of the same shapes with a strided head dim
    (``strided``: which of q, k, v) is another signature, found as such right after (``Recent``'s
    guard) and, with another signature ``between``, by its key: it gives the float64 reference
    forward and backward. On the unit-stride plan the kernel reads other elements of the buffer."""
    g = torch.Generator().manual_seed(len(strided) + 5 * between)
    B, M, N, H, D = 2, 5, 37, 3, 16
    q, k, v, dout = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, M, H, D), (B, N, H, D), (B, N, H, D), (B, M, H, D)))
    want = reference_attention.attention_dense(q, k, v)
    want_grads = torch.autograd.grad(reference_attention.attention_dense(*(t.requires_grad_(True) for t in (q, k, v))), (q, k, v), dout)
    deco_ops.cross_attention(*(_in_nan_buffer(t.float()) for t in (q, k, v)))  # the unit-stride plan
    if between:
        deco_ops.cross_attention(*(t[:1].float() for t in (q, k, v)))
        deco_ops.cross_attention(*(t[1:].float() for t in (q, k, v)))
    leaves = [(head_strided(t.detach().float()) if name in strided else t.detach().float()).requires_grad_(True)
              for name, t in zip("qkv", (q, k, v))]
    out = deco_ops.cross_attention(*leaves)
    out.backward(head_strided(dout.float()))
    for got, expected in zip((out.detach(), *(t.grad for t in leaves)), (want, *want_grads)):
        assert (got.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("mask_shape,dtype,lens,weights", [
    ((2, 1, 1, 37), torch.bool, None, None), ((5, 37), torch.float32, [37, 11], None), ((2, 2, 5, 37), torch.bool, [37, 11], True),
    ((1, 2, 1, 1), torch.float32, None, False), (None, None, None, True), (None, None, [37, 11], False)])
def test_masked_calls_are_planned(mask_shape, dtype, lens, weights, backend):
    """A call with a mask or the weights is planned too (its own table: ``_masked_plans``): the
    checks and the strategy once per signature, the mask's values read on every call (a second
    mask of the same signature is the one applied), the dispatched op's bits forward and backward."""
    g = torch.Generator().manual_seed(len(mask_shape or ()) + (lens is None) + 3 * (weights is None))
    B, M, N, H, D = 2, 5, 37, 2, 16
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((1, M, H, D), (B, N, H, D), (B, N, H, D)))
    kv_lens = None if lens is None else torch.tensor(lens, device=DEVICE)
    masks = []
    for _ in range(2 if mask_shape else 0):  # two masks of one signature
        values = torch.rand(mask_shape, generator=g)
        masks.append((values > 0.4) if dtype == torch.bool else torch.where(values > 0.4, values, float("-inf")))
    if mask_shape and mask_shape[-2] > 1:  # the second one with a query that sees no key: zeros
        masks[1][..., 0, :] = False if dtype == torch.bool else float("-inf")
    masks = masks or [None, None]
    kwargs = {} if weights is None else {"need_weights": True, "average_attn_weights": weights}
    runs = []
    for mask, dispatched in ((masks[0], False), (masks[1], False), (masks[1], True)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with _plan.unplanned() if dispatched else contextlib.nullcontext():
            result = deco_ops.cross_attention(*leaves, kv_lens=kv_lens, attn_mask=mask if mask is None else mask.to(DEVICE), **kwargs)
        outputs = list(result) if weights is not None else [result]
        sum(o.sum() for o in outputs).backward()
        runs.append([o.detach() for o in outputs] + [t.grad for t in leaves])
    for planned, full in zip(runs[1], runs[2]):
        assert torch.equal(planned, full)
    if mask_shape:
        assert not torch.equal(runs[0][0], runs[1][0])  # the second mask, not the first, was applied
    assert attention._masked_plans._plans


@cpu_only
def test_a_small_masked_attention_call_skips_the_padding_check(user_settings):
    """cross_attention with kv_lens on tiny CPU tensors: K is below ``_CHECKED_FROM``, so the two
    zeroing copies run instead of the check that could skip them (three reductions, ~30 Python-level
    calls: 87 per call with it; 54 before the check, one more since for the planned masks' shared
    helper), within issue 20's limit."""
    run = host_cost.call_of(_ATTENTION_LENS, _ATTENTION_LENS.ours, "infer")
    with host_cost.region("infer"):
        calls = host_cost.python_calls(run)
    assert calls <= 55 <= FORWARD_LIMIT, f"{calls} Python-level calls per call"
