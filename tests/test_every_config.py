"""Every config the kernels ship, on a GPU: each call below is planned (``_tuning.planning``: which
autotuned kernels it launches and the CUDA configs each one's fit rules admit for it), then run
once per admitted config of each kernel (that kernel forced to the config, the others on their
first) against float64. The rest of the CUDA suite runs with ``DECO_OPS_AUTOTUNE=0`` (the first
config only) and ``DECO_OPS_STRATEGY=fused``; here the calls also run under ``auto`` with autotuning
on, the way a user's first call picks a config (the GPU's table or a timing) and a strategy.

On a CPU the CUDA runs skip; the enumeration itself (planning prunes as for an H100) and the
forcing of one config run there: every autotuned kernel is reached and each launch admits a config.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import triton

import deco_ops
from deco_ops import reference, strategy
from deco_ops.kernels import _tuning, cross_attention_tma, merge_gemm, tma_gemm
from harness import DEVICE, DTYPES, assert_close, guarded, leaf, poisoned_empty, randn
from test_cross_attention import _case as attention_case
from test_cross_attention import _forced as forced_schedule
from test_cross_attention import _reference as attention_reference
from test_cross_attention import _run as attention_run
from test_merge import _case as merge_case
from test_merge import eager_merge_mlp
from test_packed import _mlp_params
from test_strategy_parity import C, HIDDEN, OPS, OUT

CUDA_ONLY = pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled configs: CUDA only (the interpreter runs one fixed config)")
KERNELS = {k.name: k for k in _tuning.TUNED_KERNELS}


def _projector(op: str, dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(what, deco_ops's, float64's) of a projector op of ``test_strategy_parity.OPS``, forward
    and every gradient."""
    call, ref_fn, x_shape, dy_shape = OPS[op]
    gen = torch.Generator().manual_seed(1)
    x = randn(*x_shape, dtype=dtype, generator=gen)
    params = [x, *_mlp_params(C, HIDDEN, OUT, dtype, seed=2)]
    dy = randn(*dy_shape, dtype=dtype, generator=gen)
    leaves = [leaf(guarded(p)) for p in params]
    with poisoned_empty():
        y = call(*leaves)
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    y64 = ref_fn(*ref)
    y64.backward(dy.double())
    return [("y", y, y64)] + [(f"grad {n}", a.grad, b.grad) for n, a, b in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref)]


def _attention(num_splits: int, single_pass: bool):
    """cross_attention with the forward split ``num_splits`` ways (2+: the combine kernel too)
    and the single-pass or the FA2 backward."""

    def results(dtype):
        q, k, v, dout, kv_lens = attention_case(2, 1, 17, 300, 2, 64, [300, 150], dtype)
        patches = forced_schedule(num_splits, single_pass)
        with patches[0], patches[1], patches[2]:
            got = attention_run(q, k, v, dout, kv_lens)
        want = attention_reference(q, k, v, dout, kv_lens)
        return list(zip(("out", "dq", "dk", "dv"), got, want))

    return results


def _attention_one_kernel(dtype):
    """cross_attention's opt-in one-kernel backward (144 queries: the FA2 case), shared queries."""
    q, k, v, dout, kv_lens = attention_case(2, 1, 144, 100, 2, 64, [100, 37], dtype)
    with deco_ops.use_strategy("fused_one_kernel"):
        got = attention_run(q, k, v, dout, kv_lens)
    return list(zip(("out", "dq", "dk", "dv"), got, attention_reference(q, k, v, dout, kv_lens)))


def _merge(dtype):
    """merge_mlp (norm statistics, merged GEMM, activation gradient, norm backward)."""
    params, dy = merge_case(dtype)
    leaves = [leaf(guarded(p)) for p in params]
    with poisoned_empty():
        y = deco_ops.merge_mlp(*leaves)
        y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    y64 = eager_merge_mlp(*ref)
    y64.backward(dy.double())
    names = ("x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2")
    return [("y", y, y64)] + [(f"grad {n}", a.grad, b.grad) for n, a, b in zip(names, leaves, ref)]


def _attention_weights(dtype):
    """cross_attention with a boolean mask and per-head weights (the weights kernel), forward."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (randn(*shape, dtype=dtype, generator=gen) for shape in ((2, 17, 2, 64), (2, 90, 2, 64), (2, 90, 2, 64)))
    mask = torch.rand(2, 1, 17, 90, generator=gen).to(DEVICE) > 0.3
    with poisoned_empty():
        out, weights = deco_ops.cross_attention(q, k, v, attn_mask=mask, need_weights=True, average_attn_weights=False)
    scores = torch.einsum("bmhd,bnhd->bhmn", q.double(), k.double()) * 64 ** -0.5
    p64 = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return [("out", out, torch.einsum("bhmn,bnhd->bmhd", p64, v.double())), ("weights", weights, p64)]


def _tma_linear_act(dtype):
    """The Hopper TMA GEMM (16-bit only) with its bias + GELU epilogue, forward."""
    if dtype == torch.float32:
        return []
    gen = torch.Generator().manual_seed(5)
    x, w, b = randn(40, 64, dtype=dtype, generator=gen), randn(48, 64, dtype=dtype, generator=gen), randn(48, dtype=dtype, generator=gen)
    with poisoned_empty():
        act, pre = tma_gemm.tma_linear_act(x, w, b, "gelu", store_pre=True)
    pre64 = torch.nn.functional.linear(x.double(), w.double(), b.double())
    return [("pre", pre, pre64), ("act", act, torch.nn.functional.gelu(pre64))]


def _tma_act_grad(dtype):
    """The Hopper TMA GEMM (16-bit only) with its act' epilogue (dz of the MLP backward), whose fit
    rule admits other tiles than the bias + GELU epilogue's."""
    if dtype == torch.float32:
        return []
    gen = torch.Generator().manual_seed(6)
    dy, w2, z = randn(40, 48, dtype=dtype, generator=gen), randn(48, 64, dtype=dtype, generator=gen), randn(40, 64, dtype=dtype, generator=gen)
    with poisoned_empty():
        dz, act = tma_gemm.tma_gemm_act_grad(dy, w2, z, "gelu")
    z64 = z.double()
    return [("dz", dz, (dy.double() @ w2.double()) * reference.ACTIVATION_GRADS["gelu"](z64)),
            ("act", act, torch.nn.functional.gelu(z64))]


def _attention_tma(dtype):
    """The TMA attention forward (opt-in ``fused_tma``, 16-bit, sm_90): two heads per program, kv_lens."""
    if dtype == torch.float32:
        return []
    q, k, v, dout, kv_lens = attention_case(2, 2, 32, 70, 2, 32, [70, 30], dtype)
    with poisoned_empty():
        out, _ = cross_attention_tma.cross_attention_tma_fwd(*(guarded(t, 8) for t in (q, k, v)), kv_lens, None, 2, 70, 32**-0.5)
    return [("out", out, attention_reference(q, k, v, dout, kv_lens)[0])]


# name -> results(dtype): one small shape per kernel family, forward and backward
# Outputs summed with atomics in an order that changes from run to run (the one-kernel backward's
# shared-query dQ): two runs agree to rounding, not bit for bit
ATOMIC_SUMS = {("attention_one_kernel", "dq")}

CASES = {
    **{op: (lambda dtype, op=op: _projector(op, dtype)) for op in ("pool_mlp", "mlp_pool", "pool_mlp_packed")},
    "attention_split_single_pass": _attention(3, True),
    "attention_fa2": _attention(1, False),
    "attention_one_kernel": _attention_one_kernel,
    "merge_mlp": _merge,
    "attention_weights": _attention_weights,
    "tma_linear_act": _tma_linear_act,
    "tma_act_grad": _tma_act_grad,
    "attention_tma": _attention_tma,
}


def launches(case: str, dtype: torch.dtype) -> dict[str, list]:
    """kernel name -> the CUDA configs its fit rules admit in ``case`` (first launch of each
    kernel; nothing runs)."""
    with deco_ops.use_backend("triton"), _tuning.planning() as plan:
        CASES[case](dtype)
    admitted = {}
    for name, _, candidates in plan:
        admitted.setdefault(name, candidates)
    return admitted


@contextlib.contextmanager
def only(kernel: _tuning.TunedKernel, config):
    """``kernel`` launches ``config`` (with ``DECO_OPS_AUTOTUNE=0``, the first fitting config is
    launched untimed; here the only one), with fresh caches so no earlier choice is reused."""
    with mock.patch.object(kernel, "configs", [config]), mock.patch.object(kernel, "cache", {}), \
            mock.patch.object(kernel, "chosen", {}), mock.patch.object(kernel, "_pending", None):
        yield


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Autotuning on and the strategy measured, as for a user; decisions kept in a scratch cache
    and forgotten afterwards (the rest of the suite runs fixed configs, fused)."""
    monkeypatch.setenv("DECO_OPS_AUTOTUNE", "1")
    monkeypatch.setenv(strategy.CACHE_DIR_ENV, str(tmp_path))
    strategy.forget()
    with deco_ops.use_backend("auto"), deco_ops.use_strategy("auto"):
        yield
    strategy.forget()


def _check(results, dtype, what: str) -> None:
    for name, got, want in results:
        assert got.dtype == dtype, f"{what}: {name}"
        assert_close(got, want, dtype, f"{what}: {name}")


def test_every_autotuned_kernel_is_planned_with_admitted_configs():
    reached = {}
    for case in CASES:
        for dtype in DTYPES:
            for name, configs in launches(case, dtype).items():
                assert configs, f"{case} {dtype}: no config of {name} fits"
                assert all(c in KERNELS[name].cuda_configs for c in configs), name
                reached.setdefault(name, set()).update(_tuning.config_label(c) for c in configs)
    assert set(reached) == set(KERNELS), f"kernels no case launches: {sorted(set(KERNELS) - set(reached))}"


def test_merge_gemm_admits_the_tiles_that_compiled_without_spills():
    """merge_gemm's fit rule as ``python -m deco_ops.aot`` measured it (``merge_gemm.fits``): planned
    as for an H100, 16-bit operands take every tile, fp32 tokens only the 64x64 ones, also before a
    16-bit MLP (autocast's case: the fp32 A tile is held until its rounding), exact fp32 dots only
    64x64x32; on sm_80 16-bit operands take tiles of at most 64x64, fp32 ones only 32x64x32."""

    def tile(c):
        return tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))

    def planned(x_dtype, w_dtype):
        params, _ = merge_case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
        params = [p.to(x_dtype if i < 3 else w_dtype) for i, p in enumerate(params)]
        with deco_ops.use_backend("triton"), _tuning.planning() as plan:
            deco_ops.merge_mlp(*params)
        return {tile(c) for name, _, configs in plan if name == "merge_gemm_kernel" for c in configs}

    def fitting(elem_bytes, ieee, arch):
        return {tile(c) for c in merge_gemm.cuda_configs() if merge_gemm.fits(c, elem_bytes, ieee, arch)}

    square = {(64, 64, 64), (64, 64, 32)}
    if _tuning.device_arch(DEVICE) == 90:  # a CPU plans as an H100
        assert planned(torch.float16, torch.float16) == {tile(c) for c in merge_gemm.cuda_configs()}
        assert planned(torch.float32, torch.float16) == square
        ieee = _tuning.input_precision(torch.float32) == "ieee"
        assert planned(torch.float32, torch.float32) == ({(64, 64, 32)} if ieee else square)
    assert fitting(4, False, 90) == square and fitting(4, True, 90) == {(64, 64, 32)}
    assert fitting(2, False, 80) == square | {(32, 64, 32)}
    assert fitting(4, False, 80) == fitting(4, True, 80) == {(32, 64, 32)}


def test_forcing_a_config_launches_it():
    """``only`` on the interpreter: a tile other than the interpreter's own runs and is right."""
    kernel = KERNELS["pool_gemm_kernel"]
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2})
    with deco_ops.use_backend("triton"), only(kernel, config), \
            mock.patch.object(kernel, "run", wraps=kernel.run) as run:
        _check(_projector("pool_mlp", torch.float32), torch.float32, "forced config")
        assert kernel.best_config is config
    assert run.called


@pytest.mark.parametrize("block_n", [256, 128, 64])
def test_act_grad_epilogue_of_every_tile_width(block_n):
    """``gemm_act_grad`` stores a tile in quarters (BLOCK_N >= 256, its 128x256 config) or halves
    (narrower): each width forced through the interpreter on a hidden width of 300, wide enough
    that every quarter of a 256-wide tile holds columns and the second column tile is partial
    (the suite's own cases, 40 wide, leave three quarters masked out), against float64."""
    from deco_ops.kernels import gemm_act_grad

    kernel = KERNELS["gemm_act_grad_kernel"]
    config = triton.Config({"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 16, "GROUP_M": 2})
    gen = torch.Generator().manual_seed(block_n)
    M, K, N = 37, 48, 300
    dy, w2, z = randn(M, K, generator=gen), randn(K, N, scale=K**-0.5, generator=gen), randn(M, N, generator=gen)
    with deco_ops.use_backend("triton"), only(kernel, config), poisoned_empty():
        dz, act = gemm_act_grad.gemm_act_grad(guarded(dy), guarded(w2), guarded(z), "gelu")
        assert kernel.best_config is config
    z64 = z.double()
    assert_close(dz, (dy.double() @ w2.double()) * reference.ACTIVATION_GRADS["gelu"](z64), torch.float32, "dz")
    assert_close(act, reference.ACTIVATIONS["gelu"](z64), torch.float32, "act(z)")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_admitted_config(case, dtype):
    with deco_ops.use_backend("triton"):
        for name, configs in launches(case, dtype).items():
            for config in configs:
                with only(KERNELS[name], config):
                    _check(CASES[case](dtype), dtype, f"{name} {_tuning.config_label(config)}")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_auto_with_autotuning(case, dtype, measured):
    """What a user's call does: the strategy measured (fused or composed) and the kernels'
    configs from the GPU's table or timed."""
    _check(CASES[case](dtype), dtype, "auto")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
def test_modules_under_auto(dtype, measured):
    """DeCoProjector and the nn.MultiheadAttention drop-in under ``auto``, against float64 eager."""
    torch.manual_seed(0)
    proj = deco_ops.DeCoProjector(C, OUT, hidden_features=HIDDEN, grid=(4, 5), out_grid=(2, 3)).to(dtype)
    attn = deco_ops.CrossAttention(OUT, 1, batch_first=True).to(dtype)
    mha = torch.nn.MultiheadAttention(OUT, 1, batch_first=True, dtype=torch.float64)
    mha.load_state_dict(attn.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = randn(2, 20, C, dtype=dtype, generator=gen)
    queries = randn(2, 5, OUT, dtype=dtype, generator=gen)
    tokens = proj(guarded(x))
    out = attn(queries, tokens, tokens, need_weights=False)[0]
    p64 = [t.detach().double() for t in (proj.fc1.weight, proj.fc1.bias, proj.fc2.weight, proj.fc2.bias)]
    tokens64 = reference.pool_mlp(x.double(), *p64, (4, 5), (2, 3))
    assert_close(tokens, tokens64, dtype, "DeCoProjector")
    assert_close(out, mha(queries.double(), tokens.double(), tokens.double(), need_weights=False)[0], dtype, "CrossAttention")
