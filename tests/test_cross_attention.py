"""cross_attention forward and dQ/dK/dV against float64 softmax attention, on the Triton kernels
(interpreter) and the default backend; dropout, determinism, schedules, packed keys, bad input."""

import contextlib
import math
from unittest import mock

import pytest
import torch
import triton
import triton.language as tl

import deco_ops
from deco_ops import attention, reference_attention as reference
from deco_ops.attention import cross_attention
from deco_ops.kernels import cross_attention_bwd, cross_attention_fwd, cross_attention_weights
from harness import DTYPES, assert_close, guarded, head_strided, leaf, poisoned_empty, randint, randn

FWD_KERNELS = [cross_attention_fwd.cross_attention_fwd_kernel, cross_attention_fwd.cross_attention_combine_kernel]
BWD_KERNELS = [
    cross_attention_bwd.cross_attention_bwd_single_pass_kernel,
    cross_attention_bwd.cross_attention_bwd_dkdv_kernel,
    cross_attention_bwd.cross_attention_bwd_dq_kernel,
]


def _case(B, Bq, M, N, H, D, lens, dtype, seed=0):
    """q, k, v, dout and kv_lens; keys past kv_lens are NaN (they must never be read into the result)."""
    g = torch.Generator().manual_seed(seed)
    q = randn(Bq, M, H, D, dtype=dtype, generator=g)
    k = randn(B, N, H, D, dtype=dtype, generator=g)
    v = randn(B, N, H, D, dtype=dtype, generator=g)
    dout = randn(B, M, H, D, dtype=dtype, generator=g)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    if kv_lens is not None:
        pad = torch.arange(N)[None, :] >= kv_lens[:, None]
        k[pad], v[pad] = float("nan"), float("nan")
    return q, k, v, dout, kv_lens


def _reference(q, k, v, dout, kv_lens, **kw):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out = reference.attention_dense(*leaves, kv_lens, **kw)
    out.backward(dout.double())
    return out.detach(), *(t.grad for t in leaves)


def _run(q, k, v, dout, kv_lens, **kw):
    # v in wider guard bands than k: its strides differ, so a kernel reading v with k's strides fails
    leaves = [guarded(t, pad).requires_grad_(True) for t, pad in zip((q, k, v), (3, 3, 5))]
    with poisoned_empty():
        out = cross_attention(*leaves, kv_lens=kv_lens, **kw)
        out.backward(guarded(dout))
    return out.detach(), *(t.grad for t in leaves)


def _check(got, want, dtype, kv_lens, N, tol=None):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert_close(g, w, dtype, name, tol)
    if kv_lens is not None:
        pad = torch.arange(N, device=got[2].device)[None, :] >= kv_lens.to(got[2].device)[:, None].long()
        for name, g in (("dk", got[2]), ("dv", got[3])):
            assert torch.equal(g[pad], torch.zeros_like(g[pad])), f"{name} of padding keys must be exactly 0"


# (B, q batch, M, N, H, D, kv_lens): BLIP-2 (32 x 257 / 577, D 64), M and N off the block sizes,
# head dims 72/80/128, lengths 0, 1 and N, shared and per-sample queries, both backward schedules.
CASES = [
    pytest.param(2, 1, 32, 257, 2, 64, [257, 0], id="blip2-shared-M32-N257-D64"),
    pytest.param(2, 2, 17, 37, 2, 72, [37, 1], id="M17-N37-D72"),
    pytest.param(1, 1, 1, 577, 1, 80, None, id="M1-N577-D80"),
    pytest.param(2, 2, 33, 1, 1, 32, [1, 0], id="M33-N1-D32"),
    pytest.param(2, 1, 144, 64, 1, 128, [64, 30], id="fa2-shared-M144-D128"),
    pytest.param(1, 1, 256, 37, 1, 32, None, id="fa2-M256-N37"),
    pytest.param(2, 2, 17, 1030, 1, 32, [1030, 513], id="M17-N1030"),
]


@pytest.mark.parametrize("B,Bq,M,N,H,D,lens", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity(backend, B, Bq, M, N, H, D, lens, dtype):
    q, k, v, dout, kv_lens = _case(B, Bq, M, N, H, D, lens, dtype)
    _check(_run(q, k, v, dout, kv_lens), _reference(q, k, v, dout, kv_lens), dtype, kv_lens, N)


@pytest.mark.slow
@pytest.mark.parametrize("B,Bq,M,N,H,D", [(2, 1, 256, 1024, 2, 128), (4, 4, 32, 577, 12, 64), (2, 1, 144, 2048, 2, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_large(backend, B, Bq, M, N, H, D, dtype):
    lens = [N] + randint(0, N + 1, (B - 1,), torch.Generator().manual_seed(B)).tolist()
    q, k, v, dout, kv_lens = _case(B, Bq, M, N, H, D, lens, dtype)
    _check(_run(q, k, v, dout, kv_lens), _reference(q, k, v, dout, kv_lens), dtype, kv_lens, N)


def _forced(num_splits, single_pass):
    """Patches the forward key-split and backward schedule choices of the Triton launchers."""
    return [
        mock.patch.object(cross_attention_fwd, "choose_num_splits", return_value=num_splits),
        mock.patch.object(cross_attention_bwd, "choose_num_splits", return_value=num_splits),
        mock.patch.object(cross_attention_bwd, "use_single_pass", return_value=single_pass),
    ]


@pytest.mark.parametrize("num_splits,single_pass", [(1, True), (3, True), (1, False), (5, False)])
@pytest.mark.parametrize("Bq", [1, 2])
def test_schedules(num_splits, single_pass, Bq):
    """Unsplit and split-key forward (exact merge), single-pass and FA2 backward, same inputs."""
    q, k, v, dout, kv_lens = _case(2, Bq, 33, 300, 2, 64, [300, 150], torch.float32)
    patches = _forced(num_splits, single_pass)
    with deco_ops.use_backend("triton"), patches[0], patches[1], patches[2]:
        got = _run(q, k, v, dout, kv_lens)
    _check(got, _reference(q, k, v, dout, kv_lens), torch.float32, kv_lens, 300)


def _each_launch_twice(kernel, written):
    """``kernel``'s launches each run twice on the same arguments, as Triton's autotuner runs a new
    key's launch (every config timed on the call's own buffers, then the winner once more), with
    the outputs named in ``written`` set to NaN in between: what the second launch fails to write
    again stays NaN."""
    run, positions = kernel.fn.run, [kernel.arg_names.index(name) for name in written]

    def twice(*args, **kwargs):
        run(*args, **kwargs)
        for i in positions:
            args[i].fill_(float("nan"))
        return run(*args, **kwargs)

    return mock.patch.object(kernel.fn, "run", twice)


@pytest.mark.parametrize("schedule,Bq,num_splits", [
    ("single_pass", 2, 3), ("single_pass", 1, 1), ("fa2", 1, 1), ("one_kernel", 1, 1), ("one_kernel", 2, 1)])
def test_a_launch_repeated_on_its_buffers_gives_the_bits_of_one(schedule, Bq, num_splits):
    """The backward kernels that sum dQ over programs (key splits, batches sharing the queries, the
    one-kernel schedule's float atomics) count arrivals on counters the launcher zero-fills once per
    call. They count in generations of the group's size, and the one-kernel schedule's last program
    zeroes the fp32 sums it read: a repeated launch found its counters past ``members - 1`` and never
    wrote dQ again (on a GPU the output kept the first timed config's bits), or added into the last
    launch's sums."""
    single_pass, M = (True, 33) if schedule == "single_pass" else (False, 80)
    q, k, v, dout, kv_lens = _case(2, Bq, M, 150, 2, 32, [150, 70], torch.float32, seed=5)
    kernel = {"single_pass": cross_attention_bwd.cross_attention_bwd_single_pass_kernel,
              "fa2": cross_attention_bwd.cross_attention_bwd_dq_kernel,
              "one_kernel": cross_attention_bwd.cross_attention_bwd_dkdv_kernel}[schedule]
    strategy = deco_ops.use_strategy("fused_one_kernel" if schedule == "one_kernel" else "fused")
    patches = _forced(num_splits, single_pass)
    with deco_ops.use_backend("triton"), strategy, patches[0], patches[1], patches[2]:
        once = _run(q, k, v, dout, kv_lens)
        with _each_launch_twice(kernel, ["dq_ptr"]), mock.patch.object(kernel, "run", wraps=kernel.run) as launch:
            repeated = _run(q, k, v, dout, kv_lens)
    assert launch.call_count == 1
    assert all(torch.equal(a, b) for a, b in zip(once, repeated))
    _check(repeated, _reference(q, k, v, dout, kv_lens), torch.float32, kv_lens, 150)


def test_views_past_int32_head_offsets_are_copied_before_every_launch(monkeypatch):
    """The kernels compute a head's and a dim's offsets as int32 products (int64 casts made tiles
    spill). A view whose last head and dim lie 2**31 elements or more from its first (packed keys
    as ``(H, total_N, D).transpose(0, 1)`` at about 1M keys of 16 heads x 128 dims) is copied
    contiguous by every launcher, forward, backward and weights; others are passed as they are. The
    span is lowered here so that a small head-major view crosses it (no 8 GB through the interpreter)."""
    wide = torch.empty_strided((1, 2, 1), (1, 2**31, 1), device="meta")  # the last head 2**31 from the first
    narrow = torch.empty_strided((1, 2, 1), (1, 2**31 - 1, 1), device="meta")
    assert cross_attention_fwd.int32_heads(wide)[0].is_contiguous() and cross_attention_fwd.int32_heads(narrow)[0] is narrow
    q, k, v, dout, kv_lens = _case(2, 2, 5, 40, 4, 16, [40, 17], torch.float32, seed=3)
    k, v = (t.transpose(0, 2).contiguous().transpose(0, 2) for t in (k, v))  # head-major: head stride B*N*D
    monkeypatch.setattr(cross_attention_fwd, "INT32_SPAN", 2 * k.stride(2))
    kernels = [cross_attention_fwd.cross_attention_fwd_kernel, *BWD_KERNELS, cross_attention_weights.cross_attention_weights_kernel]
    with deco_ops.use_backend("triton"), contextlib.ExitStack() as stack:
        launches = [stack.enter_context(mock.patch.object(kernel, "run", wraps=kernel.run)) for kernel in kernels]
        leaves = [leaf(t) for t in (q, k, v)]
        out, weights = cross_attention(*leaves, kv_lens=kv_lens, need_weights=True, average_attn_weights=False)
        (out * dout).sum().backward()
    seen = [call.args[1] for launch in launches for call in launch.call_args_list]  # k_ptr, second everywhere
    assert seen and all(t.is_contiguous() for t in seen)
    _check((out.detach(), *(t.grad for t in leaves)), _reference(q, k, v, dout, kv_lens), torch.float32, kv_lens, 40)


def test_split_heuristic():
    """Split only when B*H*ceil(M/64) < 0.8 * SMs (132 on an H100 / without a GPU), at least 128 keys each."""
    cpu = torch.device("cpu")
    assert cross_attention_fwd.choose_num_splits(1 * 12 * 1, 257, cpu) == 3
    assert cross_attention_fwd.choose_num_splits(8 * 12 * 1, 577, cpu) == 2
    assert cross_attention_fwd.choose_num_splits(16 * 12 * 1, 577, cpu) == 1
    assert cross_attention_fwd.choose_num_splits(1, 100_000, cpu) == cross_attention_fwd.MAX_SPLITS
    assert cross_attention_bwd.use_single_pass(32, 128) and cross_attention_bwd.use_single_pass(64, 64)
    assert not cross_attention_bwd.use_single_pass(64, 128) and not cross_attention_bwd.use_single_pass(144, 16)
    # the query limit itself (M <= 128) runs single pass, one query more does not
    assert cross_attention_bwd.use_single_pass(128, 16) and not cross_attention_bwd.use_single_pass(129, 16)


def test_zero_length_and_nan_padding(backend):
    """kv_lens[b] == 0: zero output row, zero dq (per-sample q), zero dk/dv; NaN keys never leak."""
    q, k, v, dout, kv_lens = _case(3, 3, 5, 40, 2, 32, [0, 1, 40], torch.float32)
    out, dq, dk, dv = _run(q, k, v, dout, kv_lens)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(dq[0], torch.zeros_like(dq[0]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    torch.testing.assert_close(out[1], v[1, :1].expand(5, -1, -1))


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "saved-tensor-hooks"])
def test_weights_gradients_read_infinite_padding_as_zeros(hooked):
    """Keys past kv_lens may hold any garbage, +-inf too: the gradients through the weights (dQ = dS K
    with dS = 0 there) read them as zeros. On the default backend: eager softmax attention on the
    CPU, and the weights' own backward op where saved-tensor hooks are active (a checkpointed region)."""
    q, k, v, _, kv_lens = _case(2, 1, 3, 6, 2, 8, [6, 4], torch.float32, seed=9)
    k = k.nan_to_num(nan=float("inf"))
    leaves = [leaf(t) for t in (q, k)]
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooked else contextlib.nullcontext()
    with deco_ops.use_backend("auto"), hooks:
        _, weights = cross_attention(*leaves, v, kv_lens=kv_lens, need_weights=True)
    dw = randn(*weights.shape, generator=torch.Generator().manual_seed(10))
    refs = [leaf(t, torch.float64) for t in (q, k.nan_to_num(posinf=0.0))]
    scores = torch.einsum("bmhd,bnhd->bhmn", refs[0].expand(2, -1, -1, -1), refs[1]) * 8**-0.5
    p = torch.softmax(scores.masked_fill(torch.arange(6) >= kv_lens[:, None, None, None], -math.inf), -1).mean(1)
    for name, got, want in zip(("dq", "dk"), torch.autograd.grad(weights, leaves, dw), torch.autograd.grad(p, refs, dw.double())):
        assert_close(got, want, torch.float32, name)


@pytest.mark.parametrize("Bq,lens,masked,strided", [
    (2, None, False, "qkv"), (1, None, False, "k"), (1, [5, 2], False, "qkv"), (2, [5, 0], True, "v")])
def test_head_dim_of_any_stride(backend, Bq, lens, masked, strided):
    """q, k, v (those named by ``strided``) and dout whose head dim is not unit-stride, and kv_lens
    as a strided view, give the float64 reference (outputs, gradients and per-head weights), on the
    first call of a signature and on the planned one. SDPA's CPU kernels (the PyTorch backend)
    assume a unit stride there, which ``F.scaled_dot_product_attention`` checks; called directly
    they read other elements, and past q (outputs of 1e276)."""
    q, k, v, dout, kv_lens = _case(2, Bq, 4, 5, 3, 16, lens, torch.float32, seed=7)
    mask = randn(2, 1, 4, 5, generator=torch.Generator().manual_seed(8)) if masked else None
    bias = torch.zeros(2, 3, 4, 5, dtype=torch.float64) if mask is None else mask.double().expand(2, 3, 4, 5)
    want = _reference(q, k, v, dout, kv_lens, bias=None if mask is None else bias)
    if kv_lens is not None:  # every other element a length of 1: read as if contiguous, kv_lens[1] would be 1
        kv_lens = torch.stack((kv_lens, torch.ones_like(kv_lens)), 1)[:, 0]
        bias = bias.masked_fill(torch.arange(5)[None, None, None, :] >= kv_lens[:, None, None, None], -math.inf)
    scores = torch.einsum("bmhd,bnhd->bhmn", q.double().expand(2, -1, -1, -1), k.double().nan_to_num()) / 4 + bias
    want_weights = torch.softmax(scores, -1).nan_to_num()  # a row without keys: zero weights
    for _ in range(2):
        leaves = [(head_strided(t) if name in strided else guarded(t)).requires_grad_(True) for name, t in zip("qkv", (q, k, v))]
        with poisoned_empty():
            out = cross_attention(*leaves, kv_lens=kv_lens, attn_mask=mask)
            out.backward(head_strided(dout))
            _, weights = cross_attention(*leaves, kv_lens=kv_lens, attn_mask=mask, need_weights=True,
                                         average_attn_weights=False)
        _check((out.detach(), *(t.grad for t in leaves)), want, torch.float32, kv_lens, 5)
        assert_close(weights, want_weights, torch.float32, "weights")


@pytest.mark.parametrize("single_pass", [True, False])
def test_backward_is_bitwise_deterministic(single_pass):
    q, k, v, dout, kv_lens = _case(3, 1, 40, 300, 2, 64, [300, 77, 0], torch.float32, seed=3)
    patches = _forced(3, single_pass)
    with deco_ops.use_backend("triton"), patches[0], patches[1], patches[2]:
        first = _run(q, k, v, dout, kv_lens)
        second = _run(q, k, v, dout, kv_lens)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_frozen_inputs_skip_work():
    """FA2 schedule: no dK/dV kernel for frozen k, v; no dQ kernel for frozen q."""
    q, k, v, dout, _ = _case(1, 1, 144, 40, 1, 32, None, torch.float32)
    dkdv, dq = cross_attention_bwd.cross_attention_bwd_dkdv_kernel, cross_attention_bwd.cross_attention_bwd_dq_kernel
    with deco_ops.use_backend("triton"), mock.patch.object(dkdv, "run", wraps=dkdv.run) as dkdv_run, \
            mock.patch.object(dq, "run", wraps=dq.run) as dq_run:
        qq = q.clone().requires_grad_(True)
        cross_attention(qq, k, v).backward(dout)
        assert dkdv_run.call_count == 0 and dq_run.call_count == 1
        kk, vv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
        cross_attention(q, kk, vv).backward(dout)
        assert dkdv_run.call_count == 1 and dq_run.call_count == 1
    want = _reference(q, k, v, dout, None)
    assert_close(qq.grad, want[1], torch.float32, "dq")
    assert_close(kk.grad, want[2], torch.float32, "dk")
    assert_close(vv.grad, want[3], torch.float32, "dv")


@contextlib.contextmanager
def _runs_counted(kernels, call_through: bool):
    """Each kernel's ``run`` replaced by a mock (launching the kernel where ``call_through``), the mocks in order."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(mock.patch.object(kernel, "run", wraps=kernel.run if call_through else None))
               for kernel in kernels]


@pytest.mark.parametrize("single_pass", [True, False])
def test_triton_kernels_launch(single_pass):
    q, k, v, dout, kv_lens = _case(2, 1, 20, 50, 2, 32, [50, 20], torch.float16)
    kernels = FWD_KERNELS + BWD_KERNELS
    patches = _forced(2, single_pass)
    with deco_ops.use_backend("triton"), patches[0], patches[1], patches[2], \
            mock.patch.multiple(reference, attention_fwd=mock.DEFAULT, attention_bwd=mock.DEFAULT):
        with _runs_counted(kernels, call_through=True) as mocks:
            _run(q, k, v, dout, kv_lens)
    expected = [1, 1, 1, 0, 0] if single_pass else [1, 1, 0, 1, 1]
    assert [m.call_count for m in mocks] == expected


def test_schedule_follows_the_element_size():
    """The launcher picks the backward schedule by the inputs' element size: 64 queries at head dim
    64 fit the single pass's registers in fp16, not in fp32 (FA2's two kernels). Launches only
    counted (``run`` mocked)."""
    for dtype, want in ((torch.float16, [1, 0, 0]), (torch.float32, [0, 1, 1])):
        q, k, v, dout, _ = _case(1, 1, 64, 40, 1, 64, None, dtype)
        lse = randn(1, 1, 64, generator=torch.Generator().manual_seed(1))
        with _runs_counted(BWD_KERNELS, call_through=False) as mocks:
            cross_attention_bwd.cross_attention_bwd(dout, q, k, v, dout, lse, None, None, 1, 40, 0.125, 0.0, None)
        assert [m.call_count for m in mocks] == want, dtype


@pytest.mark.interpreter_only
def test_custom_scale_and_dtype_float64_on_interpreter(backend):
    """float64 runs on the reference path and under the interpreter (fp64 accumulation)."""
    q, k, v, dout, kv_lens = _case(2, 2, 6, 45, 1, 16, [45, 9], torch.float64)
    got = _run(q, k, v, dout, kv_lens, softmax_scale=0.3)
    _check(got, _reference(q, k, v, dout, kv_lens, scale=0.3), torch.float64, kv_lens, 45, tol=1e-6)
    _, lse = torch.ops.deco.cross_attention(q, k, v, kv_lens, None, 45, 0.3, 0.0, None, None, True)
    scores = torch.einsum("bmhd,bnhd->bhmn", q, k.nan_to_num()) * 0.3
    want = scores.masked_fill(torch.arange(45)[None, None, None, :] >= kv_lens[:, None, None, None], -math.inf).logsumexp(-1)
    assert lse.dtype == torch.float64, "the LSE of float64 inputs is float64, as the op's fake says"
    assert_close(lse, want, torch.float64, "lse", tol=1e-7)


# ----------------------------------------------------------------------------------------------
# dropout


@triton.jit
def _keep_kernel(out_ptr, rng_ptr, bh, M, N, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    keep = cross_attention_fwd.dropout_keep(tl.load(rng_ptr), tl.load(rng_ptr + 1), bh, M, N, rows[:, None], cols[None, :], p)
    tl.store(out_ptr + rows[:, None] * BLOCK_N + cols[None, :], keep.to(tl.int8))


@pytest.mark.skipif(not deco_ops._backend.interpreting(), reason="checks the kernel helper through the interpreter")
def test_reference_dropout_mask_is_the_kernels():
    """deco_ops.reference_attention.dropout_keep reproduces the kernels' tl.rand mask bit for bit."""
    rng = torch.tensor([2**61 + 12345, 2**33 + 7], dtype=torch.int64)
    H, M, N = 5, 16, 64
    got = torch.empty(M, N, dtype=torch.int8)
    _keep_kernel[(1,)](got, rng, 2 * H + 3, M, N, 0.37, BLOCK_M=M, BLOCK_N=N)
    want = reference.dropout_keep(tuple(rng.tolist()), H, M, N, torch.tensor(2), torch.tensor(3),
                                  torch.arange(M)[:, None], torch.arange(N)[None, :], 0.37)
    assert torch.equal(got.bool(), want)


def _dropout_run(q, k, v, dout, kv_lens, p, seed):
    return _run(q, k, v, dout, kv_lens, dropout_p=p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("single_pass", [True, False])
def test_dropout_same_mask_on_both_backends(single_pass):
    q, k, v, dout, kv_lens = _case(2, 1, 17, 90, 2, 32, [90, 41], torch.float32)
    patches = _forced(2, single_pass)
    with deco_ops.use_backend("triton"), patches[0], patches[1], patches[2]:
        got = _dropout_run(q, k, v, dout, kv_lens, 0.3, seed=5)
    with deco_ops.use_backend("torch"):
        want = _dropout_run(q, k, v, dout, kv_lens, 0.3, seed=5)
    no_dropout = _reference(q, k, v, dout, kv_lens)
    assert (got[0] - no_dropout[0]).abs().max() > 0.1
    _check(got, want, torch.float32, kv_lens, 90)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_chunked_reference_past_one_chunk(dropout_p):
    """The PyTorch backend's chunked online softmax (strategy ``fused``: the path every CPU call with
    dropout takes) over more keys than one chunk (``reference.CHUNK``), the later keys scored highest
    so the running maximum grows between chunks (the sum and the output must be rescaled), and a batch
    entry without keys (zeros): output and gradients against float64 softmax attention; under
    dropout with the kernels' mask at every key (``reference.dropout_keep`` with the call's (seed,
    offset), counted over all N keys)."""
    B, M, H, N = 3, 3, 2, reference.CHUNK + 37
    q, k, v, dout, kv_lens = _case(B, 1, M, N, H, 8, [N, reference.CHUNK + 5, 0], torch.float32, seed=2)
    k[:, reference.CHUNK:] *= 4
    rng = torch.tensor([2**40 + 3, 2**20 + 11])
    keep = None
    if dropout_p:
        index = [torch.arange(n).view([-1 if i == d else 1 for i in range(4)]) for d, n in enumerate((B, H, M, N))]
        keep = reference.dropout_keep(tuple(rng.tolist()), H, M, N, *index, dropout_p)
    with deco_ops.use_backend("torch"), deco_ops.use_strategy("fused"), \
            mock.patch.object(attention, "_draw_rng", return_value=rng):
        got = _run(q, k, v, dout, kv_lens, dropout_p=dropout_p)
    _check(got, _reference(q, k, v, dout, kv_lens, keep=keep, dropout_p=dropout_p), torch.float32, kv_lens, N)


@pytest.mark.interpreter_only  # float64
def test_dropout_gradcheck(backend):
    """With the generator in a fixed state the op is a deterministic function of q, k, v (fast mode:
    the numerical and analytical Jacobians are compared along random directions)."""
    q, k, v, _, kv_lens = _case(2, 1, 3, 20, 1, 16, [20, 11], torch.float64)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)

    def fn(q, k, v):
        return cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.25, generator=torch.Generator().manual_seed(11))

    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_dropout_kept_fraction(backend):
    """q = 0 makes attention uniform and v = 1 makes the output (kept keys / N) / (1 - p) per row."""
    B, M, N, H, D, p = 2, 16, 200, 2, 16, 0.2
    q = torch.zeros(1, M, H, D)
    k = torch.randn(B, N, H, D)
    v = torch.ones(B, N, H, D)
    out = cross_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(0))
    kept = out[..., 0] * (1 - p) * N
    torch.testing.assert_close(kept, kept.round(), atol=1e-3, rtol=0)
    n = B * M * H * N
    fraction = kept.sum().item() / n
    assert abs(fraction - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_dropout_expectation_is_no_dropout(backend):
    """Inverted dropout is unbiased: the mean output over seeds approaches the no-dropout output."""
    q, k, v, _, _ = _case(1, 1, 4, 24, 1, 16, None, torch.float32)
    seeds = 64
    mean = sum(cross_attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(s)) for s in range(seeds)) / seeds
    exact = cross_attention(q, k, v)
    # Per element: var(mean) = p/(1-p) * sum_j P_j^2 v_j^2 / seeds.
    P = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q, k) * 16**-0.5, -1)
    std = (0.3 / 0.7 * torch.einsum("bhmn,bnhd->bmhd", P**2, v**2) / seeds).sqrt()
    assert ((mean - exact).abs() <= 6 * std + 1e-6).all()
    assert (mean - exact).abs().max() > 0


# ----------------------------------------------------------------------------------------------
# packed keys


@pytest.mark.parametrize("single_pass", [True, False])
def test_packed_keys(backend, single_pass):
    """cu_seqlens_k: k, v packed (total_N, H, D); batch b owns rows cu[b]..cu[b+1]; rows of no batch
    get zero gradients. The offsets come as a strided view (every other element a 0: read as if
    contiguous, batch 0 would own no key and batch 1 all of batch 0's)."""
    lens = [37, 0, 90, 1]
    H, D, M = 2, 32, 9
    total = sum(lens) + 5
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    cu = torch.stack((cu, torch.zeros_like(cu)), 1)[:, 0]
    g = torch.Generator().manual_seed(0)
    q = randn(len(lens), M, H, D, generator=g)
    k, v = randn(total, H, D, generator=g), randn(total, H, D, generator=g)
    dout = randn(len(lens), M, H, D, generator=g)
    patches = _forced(2, single_pass)
    with patches[0], patches[1], patches[2]:
        got = _run(q, k, v, dout, None, cu_seqlens_k=cu)
    padded_k, kv_lens, real = reference.unpack_keys(k, cu, max(lens))
    padded_v, _, _ = reference.unpack_keys(v, cu, max(lens))
    want = list(_reference(q, padded_k, padded_v, dout, kv_lens))
    want[2] = reference.pack_keys(want[2], cu, real, total)
    want[3] = reference.pack_keys(want[3], cu, real, total)
    _check(got, want, torch.float32, None, total)
    assert torch.equal(got[2][-5:], torch.zeros_like(got[2][-5:]))


def test_packed_keys_filling_k(backend):
    """FlashAttention's usual packing: cu_seqlens_k ends at total_N (every row owned), the last
    sequence shorter than the longest; the reference pads each sequence itself (not by
    ``reference.unpack_keys``, which the PyTorch path runs)."""
    lens, H, D, M = [5, 2, 3], 2, 8, 3
    g = torch.Generator().manual_seed(2)
    q, dout = randn(1, M, H, D, generator=g), randn(len(lens), M, H, D, generator=g)
    k, v = randn(sum(lens), H, D, generator=g), randn(sum(lens), H, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pad = [torch.nn.utils.rnn.pad_sequence(t.split(lens), batch_first=True) for t in (k, v)]
    want = list(_reference(q, *pad, dout, torch.tensor(lens)))
    want[2], want[3] = (torch.cat([w[b, :n] for b, n in enumerate(lens)]) for w in want[2:])
    _check(_run(q, k, v, dout, None, cu_seqlens_k=cu), want, torch.float32, None, max(lens))
    # the weights too: each batch's keys from its own first row cu[b]
    scores = torch.einsum("bmhd,bnhd->bhmn", q.double().expand(len(lens), -1, -1, -1), pad[0].double()) * D**-0.5
    dropped = torch.arange(max(lens))[None, :] >= torch.tensor(lens)[:, None]
    with poisoned_empty():
        _, weights = cross_attention(q, k, v, cu_seqlens_k=cu, need_weights=True, average_attn_weights=False)
    assert_close(weights, torch.softmax(scores.masked_fill(dropped[:, None, None, :], -math.inf), -1), torch.float32, "weights")


def test_packed_keys_with_a_mask_and_weights():
    """Packed keys on the default backend (each sequence padded to the longest, gradients packed
    back), against float64 per sequence: dQ alone (frozen keys and values), and with an ``attn_mask``
    over the longest sequence the output, the per-head weights and the gradients of both."""
    lens, H, D, M = [5, 2, 3], 2, 8, 3
    g = torch.Generator().manual_seed(4)
    q, k, v = randn(1, M, H, D, generator=g), randn(sum(lens), H, D, generator=g), randn(sum(lens), H, D, generator=g)
    dout = randn(len(lens), M, H, D, generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.rand(len(lens), 1, M, max(lens), generator=g) > 0.3  # per query x key, over the longest sequence
    mask[..., 0] = True
    refs = [leaf(t, torch.float64) for t in (q, k, v)]
    keys, values = (torch.nn.utils.rnn.pad_sequence(t.split(lens), batch_first=True) for t in refs[1:])
    padding = torch.arange(max(lens)) >= torch.tensor(lens)[:, None, None, None]
    scores = torch.einsum("bmhd,bnhd->bhmn", refs[0].expand(len(lens), -1, -1, -1), keys) * D**-0.5
    q_alone = leaf(q)
    with deco_ops.use_backend("auto"):
        (dq,) = torch.autograd.grad(cross_attention(q_alone, k, v, cu_seqlens_k=cu), q_alone, dout)
        leaves = [leaf(t) for t in (q, k, v)]
        out, weights = cross_attention(*leaves, cu_seqlens_k=cu, attn_mask=mask, need_weights=True, average_attn_weights=False)
    unmasked = torch.einsum("bhmn,bnhd->bmhd", torch.softmax(scores.masked_fill(padding, -math.inf), -1), values)
    assert_close(dq, torch.autograd.grad(unmasked, refs[0], dout.double(), retain_graph=True)[0], torch.float32, "dq alone")
    p = torch.softmax(scores.masked_fill(~mask | padding, -math.inf), -1)
    ref = torch.einsum("bhmn,bnhd->bmhd", p, values)
    dw = randn(*weights.shape, generator=g)
    grads = torch.autograd.grad((out, weights), leaves, (dout, dw))
    ref_grads = torch.autograd.grad((ref, p), refs, (dout.double(), dw.double()))
    for name, got, expected in zip(("out", "weights", "dq", "dk", "dv"), (out, weights, *grads), (ref, p, *ref_grads)):
        assert_close(got, expected, torch.float32, name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-q", "per-batch-q"])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["per-sequence", "padded"])
@pytest.mark.parametrize("ragged", ["packed", "kv_lens"])
def test_ragged_keys_on_the_cpu_kernel_both_ways(auto_backend, monkeypatch, ragged, per_sequence, shared):
    """Packed keys and ``kv_lens`` on the default backend, run one SDPA call per sequence or as one
    padded call (``composed_attention.per_sequence``, forced each way), against float64 per
    sequence: an empty sequence, key rows after the last sequence (packed) or NaN past each length
    (kv_lens), a mask over the longest sequence with a query row that drops every key of its
    sequence, and every gradient (the weights take eager's softmax on the CPU: ``test_masks``).
    Inputs inside NaN-filled buffers, outputs and gradients poisoned."""
    from deco_ops import composed_attention
    monkeypatch.setattr(composed_attention, "_RAGGED_FROM", 0 if per_sequence else 1 << 62)
    monkeypatch.setattr(composed_attention, "_PER_SEQUENCE_FROM", 0)
    lens, tail, H, D, M = [6, 0, 9, 2], 3, 2, 8, 3
    B, longest = len(lens), max(lens)
    g = torch.Generator().manual_seed(5)
    q = randn(1 if shared else B, M, H, D, generator=g)
    dout = randn(B, M, H, D, generator=g)
    mask = torch.rand(B, 1, M, longest, generator=g) > 0.3
    mask[..., 0] = True
    mask[2, :, 1] = False  # query 1 of sequence 2 reads no key: zeros
    if ragged == "packed":
        k, v = (randn(sum(lens) + tail, H, D, generator=g) for _ in range(2))
        keys = {"cu_seqlens_k": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)}
        padded = lambda t: torch.nn.utils.rnn.pad_sequence(t[: sum(lens)].split(lens), batch_first=True)  # noqa: E731
    else:
        k, v, _, kv_lens = _case(B, 1, 1, longest, H, D, lens, torch.float32, seed=5)[1:]
        keys = {"kv_lens": torch.tensor([6, -3, 40, 2], dtype=torch.int32)}  # outside [0, N]: clamped
        padded = lambda t: t.nan_to_num(0.0)  # noqa: E731
    refs = [leaf(t, torch.float64) for t in (q, k, v)]
    dropped = ~mask | (torch.arange(longest) >= torch.tensor(lens)[:, None, None, None])
    scores = torch.einsum("bmhd,bnhd->bhmn", refs[0].expand(B, -1, -1, -1), padded(refs[1])) * D**-0.5
    p = torch.softmax(scores.masked_fill(dropped, -math.inf), -1).nan_to_num(0.0)
    ref = torch.einsum("bhmn,bnhd->bmhd", p, padded(refs[2]))
    leaves = [guarded(t, pad).requires_grad_(True) for t, pad in zip((q, k, v), (2, 3, 5))]
    with (poisoned_empty(),
          mock.patch.object(composed_attention, "ragged_forward", wraps=composed_attention.ragged_forward) as forward,
          mock.patch.object(composed_attention, "ragged_backward", wraps=composed_attention.ragged_backward) as backward):
        out = cross_attention(*leaves, **keys, attn_mask=mask)
        grads = torch.autograd.grad(out, leaves, guarded(dout))
    assert forward.called == backward.called == per_sequence  # the path forced ran
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    for name, got, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert_close(got, expected.nan_to_num(0.0), torch.float32, name)
    assert torch.equal(out[2, 1], torch.zeros_like(out[2, 1])) and torch.equal(out[1], torch.zeros_like(out[1]))
    if ragged == "packed":
        assert torch.equal(grads[1][-tail:], torch.zeros_like(grads[1][-tail:]))
    else:
        past = torch.arange(longest)[None, :] >= kv_lens[:, None]
        for name, grad in (("dk", grads[1]), ("dv", grads[2])):
            assert torch.equal(grad[past], torch.zeros_like(grad[past])), f"{name} past kv_lens must be exactly 0"


def test_ragged_keys_run_per_sequence_where_it_measured_faster():
    """The rule ``per_sequence`` applies, at the sizes it was measured on (K elements per
    sequence, padding): BLIP-2's 4 x 257 keys x 12 heads x 64, packed or by ``kv_lens``, and two
    sequences of 1024 and 600 keys x 16 x 128 per sequence; 64 short sequences padded; a long
    sequence among short ones per sequence (its padded copy would be 16x the keys); tiny keys padded."""
    from deco_ops import composed_attention

    def packed(lens, H, D):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        return composed_attention.per_sequence(torch.empty(sum(lens), H, D), None, cu, max(lens))

    def by_lengths(lens, N, H, D):
        return composed_attention.per_sequence(torch.empty(len(lens), N, H, D), torch.tensor(lens), None, N)

    assert packed([257] * 4, 12, 64) and packed([1024, 600], 16, 128) and by_lengths([257, 200, 150, 257], 257, 12, 64)
    assert not packed([16] * 64, 12, 64) and not by_lengths([16] * 64, 16, 12, 64) and not packed([3, 5, 2, 7] * 16, 2, 8)
    assert packed([1000] + [4] * 63, 2, 8) and by_lengths([1000] + [4] * 63, 1000, 2, 8)
    assert not by_lengths([1, 0], 64, 2, 8)  # 2,048 elements: below ``_RAGGED_FROM``


@pytest.mark.parametrize("D", [1, 256])
def test_head_dims_at_the_limits(D):
    """Head dims 1 and 256 (``MAX_HEAD_DIM``), the range's ends, are computed, not refused."""
    q, k, v, dout, kv_lens = _case(2, 1, 3, 5, 1, D, [5, 2], torch.float32, seed=D)
    with deco_ops.use_backend("torch"):
        _check(_run(q, k, v, dout, kv_lens), _reference(q, k, v, dout, kv_lens), torch.float32, kv_lens, 5)


def test_packed_keys_all_empty(backend):
    """Every batch row owns no key (cu_seqlens_k all 0: a batch of images with no tokens): zero
    output and zero gradients, as kv_lens of 0 give, the weights too."""
    g = torch.Generator().manual_seed(1)
    q, dout = randn(2, 3, 2, 8, generator=g), randn(2, 3, 2, 8, generator=g)
    k, v = randn(4, 2, 8, generator=g), randn(4, 2, 8, generator=g)
    cu = torch.zeros(3, dtype=torch.int32)
    out, dq, dk, dv = _run(q, k, v, dout, None, cu_seqlens_k=cu)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t, torch.zeros_like(t)), name
    _, weights = cross_attention(q, k, v, cu_seqlens_k=cu, need_weights=True)
    assert weights.shape[:2] == (2, 3) and torch.equal(weights, torch.zeros_like(weights))


# ----------------------------------------------------------------------------------------------
# memory, torch.library, bad input


def test_saved_for_backward_bytes(capsys):
    """Autograd keeps q, k, v, O and the fp32 LSE; eager softmax attention also keeps the M x N
    probabilities. At M=256, N=4608, D=64: (2*M*D + 2*N*D + M) / (M*D + 2*N*D + M*N) = 0.35."""
    M, N, H, D = 256, 4608, 1, 64
    q = torch.randn(1, M, H, D, requires_grad=True)
    k = torch.randn(1, N, H, D, requires_grad=True)
    v = torch.randn(1, N, H, D, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    def eager():
        s = torch.einsum("bmhd,bnhd->bhmn", q, k) * D**-0.5
        return torch.einsum("bhmn,bnhd->bmhd", torch.softmax(s, -1), v)

    # What is saved is the custom op's inputs and outputs whatever backend computes them; the
    # reference backend keeps this large case fast on a CPU.
    with deco_ops.use_backend("torch"):
        ratio = saved_bytes(lambda: cross_attention(q, k, v)) / saved_bytes(eager)
    with capsys.disabled():
        print(f"\nsaved-for-backward bytes, cross_attention / eager (M={M}, N={N}, D={D}): {ratio:.3f}")
    assert ratio <= 0.5


def test_dropout_stream_of_a_traced_call_is_not_read():
    """While torch.compile or opcheck traces an op with dropout its seed tensor is a FakeTensor,
    without values (on the H200 opcheck failed on the read): the PyTorch paths get 0-d tensors, on
    which the reference's Philox draws exactly what it draws from the ints of an eager call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deco_ops.attention import _rng_pair

    rng = torch.tensor([2**40 + 17, 96], dtype=torch.int64)
    with FakeTensorMode() as mode:
        seed, offset = _rng_pair(mode.from_tensor(rng))
        assert seed.shape == offset.shape == () and seed.dtype == torch.int64
    ints = _rng_pair(rng)
    assert ints == (2**40 + 17, 96)
    index = torch.arange(4096, dtype=torch.int64) * 7919
    ints_keep, tensor_keep = (reference.dropout_keep(pair, 1, 1, 1, 0, 0, 0, index, 0.5) for pair in (ints, tuple(rng)))
    assert torch.equal(ints_keep, tensor_keep) and 0 < int(ints_keep.sum()) < 4096


def test_opcheck(backend):
    q, k, v, dout, kv_lens = _case(2, 1, 5, 40, 2, 16, [40, 13], torch.float32)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rng = torch.tensor([7, 0], dtype=torch.int64)
    bias = torch.randn(2, 1, 1, 40).masked_fill(torch.rand(2, 1, 1, 40) > 0.7, float("-inf")).expand(2, 2, 5, 40)
    torch.library.opcheck(torch.ops.deco.cross_attention, (*leaves, kv_lens, None, 40, 0.25, 0.0, None, None, True))
    torch.library.opcheck(torch.ops.deco.cross_attention, (*leaves, None, None, 40, 0.25, 0.2, rng, bias, True))
    torch.library.opcheck(torch.ops.deco.cross_attention, (q, k, v, kv_lens, None, 40, 0.25, 0.0, None, None, False))  # inference: no LSE
    out, lse = torch.ops.deco.cross_attention(q, k, v, kv_lens, None, 40, 0.25, 0.2, rng, bias, True)
    torch.library.opcheck(
        torch.ops.deco.cross_attention_backward, (dout, q, k, v, out, lse, kv_lens, None, 40, 0.25, 0.2, rng, True, True, bias)
    )
    for average in (True, False):
        torch.library.opcheck(torch.ops.deco.cross_attention_weights,
                              (*leaves[:2], lse, kv_lens, None, 40, 0.25, 0.2, rng, bias, average))


def test_compiles_with_dynamic_shapes_and_scale():
    """``torch.compile(dynamic=True)`` makes the key count and the float arguments symbolic: the
    checks compare them (a ``math`` function of a SymFloat breaks the graph), one graph serves
    every key count and scale."""
    def attend(q, k, v, scale):
        return cross_attention(q, k, v, softmax_scale=scale, kv_lens=torch.tensor([k.shape[1], 2]))

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=True, backend="aot_eager")
    with deco_ops.use_backend("torch"):
        for n, scale in ((7, 0.3), (9, 0.5)):
            q, k, v = randn(2, 3, 2, 8), randn(2, n, 2, 8), randn(2, n, 2, 8)
            assert_close(compiled(q, k, v, scale), attend(q.double(), k.double(), v.double(), scale), torch.float32)


def test_empty_batch(backend):
    q, k, v = torch.randn(1, 3, 2, 16), torch.randn(0, 5, 2, 16), torch.randn(0, 5, 2, 16)
    assert cross_attention(q, k, v).shape == (0, 3, 2, 16)


def _good():
    return dict(q=torch.randn(2, 4, 2, 16), k=torch.randn(2, 9, 2, 16), v=torch.randn(2, 9, 2, 16))


def _packed(cu, dtype=torch.int32):
    return {"k": torch.randn(9, 2, 16), "v": torch.randn(9, 2, 16), "cu_seqlens_k": torch.tensor(cu, dtype=dtype)}


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"q": torch.randn(2, 4, 32)}, ValueError, "q must have 4 dimensions"),
        ({"k": torch.randn(2, 9, 32)}, ValueError, "k must be"),
        ({"v": torch.randn(2, 9, 2, 8)}, ValueError, "k and v must have the same shape"),
        ({"q": torch.randn(2, 4, 3, 16)}, ValueError, "heads"),
        ({"q": torch.randn(2, 4, 2, 8)}, ValueError, "head dim"),
        ({"q": torch.randn(3, 4, 2, 16)}, ValueError, "q has batch 3"),
        ({"k": torch.randn(2, 9, 2, 16, dtype=torch.float16)}, TypeError, "k has dtype"),
        ({"q": torch.randn(2, 4, 2, 16).int()}, TypeError, "q has dtype"),
        ({"q": torch.randn(2, 4, 2, 300), "k": torch.randn(2, 9, 2, 300), "v": torch.randn(2, 9, 2, 300)}, ValueError, "head dim must be"),
        ({"kv_lens": torch.tensor([9, 9, 9])}, ValueError, "kv_lens has 3 entries"),
        ({"kv_lens": torch.tensor([9.0, 1.0])}, TypeError, "kv_lens must be int32 or int64"),
        ({"attn_mask": torch.zeros(4, 8)}, ValueError, "attn_mask of shape"),
        ({"attn_mask": torch.zeros(4, 9, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
        ({"attn_mask": torch.zeros(4, 9, device="meta")}, ValueError, "attn_mask is on meta"),
        ({"kv_lens": torch.tensor([[1, 1]])}, ValueError, "kv_lens must have 1 dimensions"),
        ({"kv_lens": torch.tensor([1, 1], device="meta")}, ValueError, "kv_lens is on meta"),
        ({"k": torch.randn(2, 9, 2, 16, device="meta"), "v": torch.randn(2, 9, 2, 16, device="meta")}, ValueError, "k is on meta"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"softmax_scale": "big"}, TypeError, "softmax_scale"),
        ({"generator": 3}, TypeError, "generator"),
        ({"cu_seqlens_k": torch.tensor([0, 4, 9], dtype=torch.int32)}, ValueError, r"k must be \(total_N"),
        (_packed([0, 4, 9], torch.int64), TypeError, "cu_seqlens_k must be int32"),
        (_packed([0, 5, 4]), ValueError, "never decrease"),
        (_packed([0, 4, 10]), ValueError, "total_N=9"),
        (_packed([0, 4, 9]) | {"kv_lens": torch.tensor([1, 1])}, ValueError, "either kv_lens or cu_seqlens_k"),
        ({"q": "queries"}, TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_input(change, error, match):
    args = _good() | change
    with deco_ops.use_backend("triton"), mock.patch.object(cross_attention_fwd.cross_attention_fwd_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    launch.assert_not_called()


def test_flop_and_byte_counts():
    assert cross_attention_fwd.flops(2, 12, 32, 257, 64) == 4 * 2 * 12 * 32 * 257 * 64
    assert cross_attention_bwd.flops(2, 12, 32, 257, 64) == 10 * 2 * 12 * 32 * 257 * 64
    assert cross_attention_bwd.flops(2, 8, 256, 1024, 128) == 14 * 2 * 8 * 256 * 1024 * 128
    shared = cross_attention_fwd.bytes_moved(8, 12, 32, 577, 64, 2, shared_q=True)
    assert shared < cross_attention_fwd.bytes_moved(8, 12, 32, 577, 64, 2)
    assert cross_attention_bwd.bytes_moved(8, 12, 32, 577, 64, 2) > 4 * 8 * 577 * 12 * 64 * 2


# (B, q batch, M, N, H, D, kv_lens, dtype): many queries (the FA2 schedule), shared queries with a
# batch without keys, per-batch queries off the block sizes
ONE_KERNEL_CASES = [
    pytest.param(3, 1, 144, 70, 2, 32, [70, 33, 0], torch.float16, id="shared-lens0-fp16"),
    pytest.param(2, 2, 130, 45, 1, 64, None, torch.float32, id="M130-N45-fp32"),
]


@pytest.mark.parametrize("B,Bq,M,N,H,D,lens,dtype", ONE_KERNEL_CASES)
def test_one_kernel_backward(B, Bq, M, N, H, D, lens, dtype):
    """``use_strategy("fused_one_kernel")``: many queries' backward in the dK/dV kernel alone, dQ
    added up by float atomics (the FA2 dQ kernel never runs); dQ, dK, dV match float64, and dK, dV
    are the FA2 schedule's bits (the same tiles, Delta from O either way). Opt-in and not
    deterministic: ``auto`` never runs it and deterministic mode never offers it."""
    q, k, v, dout, kv_lens = _case(B, Bq, M, N, H, D, lens, dtype, seed=11)
    dkdv, dq_kernel = cross_attention_bwd.cross_attention_bwd_dkdv_kernel, cross_attention_bwd.cross_attention_bwd_dq_kernel
    with deco_ops.use_backend("triton"), mock.patch.object(dkdv, "run", wraps=dkdv.run) as dkdv_run, \
            mock.patch.object(dq_kernel, "run", wraps=dq_kernel.run) as dq_run, \
            mock.patch.object(deco_ops.strategy, "choose", wraps=deco_ops.strategy.choose) as choose:
        with deco_ops.use_strategy("fused_one_kernel"):
            got = _run(q, k, v, dout, kv_lens)
        offered = [c.args[0]["fused_one_kernel"] for c in choose.call_args_list if "fused_one_kernel" in c.args[0]]
        assert offered and all(c.opt_in and not c.deterministic for c in offered)
        assert (dkdv_run.call_count, dq_run.call_count) == (1, 0)
        assert dkdv_run.call_args.kwargs["DQ_ATOMIC"]
        fa2 = _run(q, k, v, dout, kv_lens)
        assert (dkdv_run.call_count, dq_run.call_count) == (2, 1), "auto ran the opt-in one-kernel backward"
        torch._C._set_deterministic_algorithms(True)  # the flag alone: use_deterministic_algorithms costs seconds here
        try:
            with deco_ops.use_strategy("fused_one_kernel"):
                _run(q, k, v, dout, kv_lens)
        finally:
            torch._C._set_deterministic_algorithms(False)
        assert (dkdv_run.call_count, dq_run.call_count) == (3, 2), "deterministic mode ran the float-atomic dQ"
    _check(got, _reference(q, k, v, dout, kv_lens), dtype, kv_lens, N)
    assert torch.equal(got[2], fa2[2]) and torch.equal(got[3], fa2[3])


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "saved-tensor-hooks"])
@pytest.mark.parametrize("logits", [3.0, 10.0], ids=["logits9", "logits100"])
def test_weights_and_their_gradients_as_accurate_as_softmax(backend, logits, hooked):
    """``need_weights``' probabilities against float64 softmax, and dQ, dK through them (a loss on
    the weights), within 2x eager fp32 softmax's own error (what nn.MultiheadAttention returns).
    From exp(S - LSE) alone each row was off 1 by the fp32 LSE's rounding: at logits near 100 the
    weights had 1000x and dQ 500x eager's error on the PyTorch path, 150x and 100x on the kernels;
    each row is now divided by its own sum (kernels/cross_attention_weights.py). Under saved-tensor
    hooks (a checkpointed region) the default backend's CPU path runs the weights' op, not eager
    softmax attention."""
    B, M, N, H, D = 2, 3, 300, 2, 16
    g = torch.Generator().manual_seed(7)
    q, k = randn(B, M, H, D, generator=g, scale=logits), randn(B, N, H, D, generator=g, scale=logits)
    v, grad = randn(B, N, H, D, generator=g), randn(B, H, M, N, generator=g)

    def softmax(qq, kk):
        return torch.softmax(torch.einsum("bmhd,bnhd->bhmn", qq, kk) * D ** -0.5, -1)

    def ours(qq, kk):
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if hooked else contextlib.nullcontext()
        with hooks:
            return cross_attention(qq, kk, v.to(qq.dtype), need_weights=True, average_attn_weights=False)[1]

    def run(fn, dtype):
        qq, kk = leaf(q.to(dtype)), leaf(k.to(dtype))
        w = fn(qq, kk)
        (w * grad.to(dtype)).sum().backward()
        return w.detach().double(), qq.grad.double(), kk.grad.double()

    exact = run(softmax, torch.float64)
    for name, got, eager, want in zip(("weights", "dq", "dk"), run(ours, torch.float32), run(softmax, torch.float32), exact):
        assert (got - want).norm() <= 2 * (eager - want).norm(), name  # 0.4-1.7x over ten cases on the kernels


def test_dropout_on_meta_tensors():
    """Meta q, k, v with dropout run as SDPA runs them there (shapes, forward and backward, the
    weights too): the dropout seed drawn on the meta device has no values, and the PyTorch path read
    them (NotImplementedError "Cannot copy out of meta tensor")."""
    def meta(*shape, **kwargs):
        return torch.empty(*shape, device="meta", **kwargs)

    q, k = meta(2, 3, 2, 8, requires_grad=True), meta(2, 5, 2, 8, requires_grad=True)
    with deco_ops.use_backend("auto"):
        out, weights = cross_attention(q, k, k, dropout_p=0.2, need_weights=True, kv_lens=meta(2, dtype=torch.int32))
        (out.sum() + weights.sum()).backward()
        assert out.shape == (2, 3, 2, 8) and weights.shape == (2, 3, 5) and out.device.type == "meta"
        assert q.grad.shape == q.shape and k.grad.shape == k.shape
        module = deco_ops.CrossAttention(16, 2, dropout=0.1, device="meta")
        assert module(meta(3, 2, 16), meta(5, 2, 16), meta(5, 2, 16))[0].shape == (3, 2, 16)


def test_numpy_scalars_for_scale_and_dropout(backend):
    """``softmax_scale`` and ``dropout_p`` as numpy's float32 scalars, as SDPA takes them (and as the
    modules take numpy's reals for their dropout): the same result as the Python floats (a
    TypeError for the scale and a ValueError 'dropout_p must be a float in [0, 1), got
    np.float32(0.0)' for a dropout in range before)."""
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(21)
    q, k, v = (randn(2, n, 2, 16, generator=gen) for n in (4, 9, 9))
    want = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().transpose(1, 2) for t in (q, k, v)), scale=float(np.float32(0.3))).transpose(1, 2)
    got = cross_attention(q, k, v, softmax_scale=np.float32(0.3), dropout_p=np.float32(0.0))
    assert_close(got, want, torch.float32)
    seeded = [cross_attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(3)) for p in (np.float32(0.25), 0.25)]
    assert torch.equal(seeded[0], seeded[1])


def test_unpack_keys_cpu_copies_equal_the_gather():
    """``reference.unpack_keys`` copies each CPU sequence into zeros; the same tensor as the gather
    it runs elsewhere (a subclass takes that path here), empty sequences and padding rows included."""

    class Other(torch.Tensor):
        pass

    torch.manual_seed(0)
    k = torch.randn(23, 3, 8)
    cu = torch.tensor([0, 5, 5, 23], dtype=torch.int32)
    fast = reference.unpack_keys(k, cu, 19)
    slow = reference.unpack_keys(k.as_subclass(Other), cu, 19)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b.as_subclass(torch.Tensor))
