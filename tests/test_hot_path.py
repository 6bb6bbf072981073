"""The hot path stays lean: kernel-launch budgets per op, no host syncs in dense ops, no grid axis
over its limit, every launch under its input's device, fp32 under torch's new precision API, and
(with CUDA) capture in a CUDA graph.

Launches are counted on Triton's interpreter (``tests/hot_path.py``); docs/launches.md's table "Kernel
launches per op" holds the same numbers and ``test_readme_table_matches_budget`` keeps them equal.
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import pytest
import torch

import deco_ops
from deco_ops import _backend, reference
from deco_ops import reference_attention
from deco_ops.kernels import _host_arith, _tuning, adaptive_pool, cross_attention_bwd, cross_attention_fwd, packed_pool, pool_gemm
from harness import assert_close, guarded, randn
from hot_path import Launches, TorchOps, count

interpreter_only = pytest.mark.skipif(not _backend.interpreting(), reason="counts launches through Triton's interpreter")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GRIDS = torch.tensor([[6, 6], [4, 5]])
OUT_GRIDS = torch.tensor([[3, 3], [2, 2]])


def _mlp(C=16, hidden=24, out=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [randn(*s, dtype=dtype, generator=g, scale=0.3) for s in ((hidden, C), (hidden,), (out, hidden), (out,))]


def _cases():
    """name -> (function of the leaves -> output, leaves, index of the token input(s) that a
    frozen vision tower leaves without grad, or () where every input is the tokens)."""
    g = torch.Generator().manual_seed(0)
    x = randn(2, 36, 16, generator=g)
    packed = randn(56, 16, generator=g)
    q, k, v = randn(2, 4, 2, 16, generator=g), randn(2, 20, 2, 16, generator=g), randn(2, 20, 2, 16, generator=g)
    packed_kv = randn(27, 2, 16, generator=g), randn(27, 2, 16, generator=g)
    kv_lens = torch.tensor([20, 7])
    cu = torch.tensor([0, 20, 27], dtype=torch.int32)
    grid = dict(grid=(6, 6), out_grid=(3, 3))
    return {
        "adaptive_avg_pool_tokens": (lambda x: deco_ops.adaptive_avg_pool_tokens(x, **grid), [x], ()),
        "bilinear_pool_tokens": (lambda x: deco_ops.bilinear_pool_tokens(x, **grid), [x], ()),
        "pool_linear": (lambda x, w, b: deco_ops.pool_linear(x, w, b, **grid), [x, *_mlp(out=24)[:2]], (0,)),
        "pool_mlp": (lambda x, *p: deco_ops.pool_mlp(x, *p, **grid), [x, *_mlp()], (0,)),
        "mlp_pool": (lambda x, *p: deco_ops.mlp_pool(x, *p, **grid), [x, *_mlp()], (0,)),
        "adaptive_avg_pool_tokens_packed": (
            lambda x: deco_ops.adaptive_avg_pool_tokens_packed(x, GRIDS, out_grids=OUT_GRIDS)[0], [packed], ()),
        "pool_mlp_packed": (lambda x, *p: deco_ops.pool_mlp_packed(x, GRIDS, *p, out_grids=OUT_GRIDS)[0], [packed, *_mlp()], (0,)),
        "mlp_pool_packed": (lambda x, *p: deco_ops.mlp_pool_packed(x, GRIDS, *p, out_grids=OUT_GRIDS)[0], [packed, *_mlp()], (0,)),
        "cross_attention": (lambda q, k, v: deco_ops.cross_attention(q, k, v), [q, k, v], (1, 2)),
        "cross_attention kv_lens+dropout": (
            lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.1), [q, k, v], (1, 2)),
        "cross_attention cu_seqlens_k": (
            lambda q, k, v: deco_ops.cross_attention(q, k, v, cu_seqlens_k=cu), [q, *packed_kv], (1, 2)),
    }


# op -> (forward, backward, backward with frozen tokens), each (Triton launches, torch kernels);
# None where the op has no parameters to train.
BUDGET = {
    "adaptive_avg_pool_tokens": ((1, 0), (1, 0), None),
    "bilinear_pool_tokens": ((1, 0), (1, 0), None),
    "pool_linear": ((1, 0), (1, 3), (0, 2)),
    "pool_mlp": ((1, 1), (2, 5), (1, 4)),
    "mlp_pool": ((2, 0), (1, 6), (1, 5)),
    "adaptive_avg_pool_tokens_packed": ((1, 4), (1, 0), None),
    "pool_mlp_packed": ((1, 5), (2, 5), (1, 4)),
    "mlp_pool_packed": ((2, 4), (1, 6), (1, 5)),
    "cross_attention": ((1, 0), (1, 0), (1, 0)),
    "cross_attention kv_lens+dropout": ((1, 3), (1, 0), (1, 0)),  # int64 kv_lens: clamped into int32's range, then cast
    "cross_attention cu_seqlens_k": ((1, 0), (1, 2), (1, 2)),
}


def _measure(fn, leaves, frozen):
    """(forward, backward, frozen backward) counts, each after a warm-up call (cached tables built).
    Asserts that every launch ran under the device guard of a tensor on its device."""
    def step(train):
        params = [t.clone().requires_grad_(i in train) for i, t in enumerate(leaves)]
        y = fn(*params)
        dy = torch.ones_like(y)
        fwd = count(lambda: fn(*params))
        y = fn(*params)
        bwd = count(lambda: y.backward(dy))
        assert fwd[0].unguarded == [] and bwd[0].unguarded == [], "launch outside kernels._device.device_guard"
        return fwd, bwd

    every = range(len(leaves))
    step(every)
    (fwd_l, fwd_t), (bwd_l, bwd_t) = step(every)
    result = [(fwd_l.total(), fwd_t.total()), (bwd_l.total(), bwd_t.total()), None]
    if frozen:
        step([i for i in every if i not in frozen])
        _, (fz_l, fz_t) = step([i for i in every if i not in frozen])
        result[2] = (fz_l.total(), fz_t.total())
    return tuple(result)


@interpreter_only
def test_launch_budget(monkeypatch):
    """Every public op launches exactly its budget: Triton kernels and torch kernels (cuBLAS GEMMs,
    reductions, casts; views and allocations not counted), forward and backward, with value checks
    off as on CUDA. Backward adds no zero-filled gradients for the residual/LSE outputs nothing used.
    Every Triton launch runs inside ``kernels._device.device_guard`` of a tensor on its device (on
    CUDA: that device current, its current stream used)."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    measured = {name: _measure(*case) for name, case in _cases().items()}
    assert measured == BUDGET


# (B, q batch, M queries, key splits, schedule, what needs a gradient) -> backward launches by name,
# torch kernels: Delta comes from O inside the gradient kernels (no preprocess launch) and dQ partials
# of split keys or of queries shared by the batch are summed inside the launch (no torch.sum, no
# cast; the only torch kernel is the zero-fill of the int32 arrival counters).
ATTENTION_BACKWARD = {
    (2, 2, 5, 1, "single_pass", "qkv"): ({"cross_attention_bwd_single_pass_kernel": 1}, 0),
    (2, 1, 5, 3, "single_pass", "qkv"): ({"cross_attention_bwd_single_pass_kernel": 1}, 1),
    (2, 1, 40, 1, "fa2", "qkv"): ({"cross_attention_bwd_dq_kernel": 1, "cross_attention_bwd_dkdv_kernel": 1}, 1),
    (2, 2, 40, 1, "fa2", "kv"): ({"cross_attention_bwd_dkdv_kernel": 1}, 0),
}


@interpreter_only
@pytest.mark.parametrize("case", ATTENTION_BACKWARD, ids=lambda c: "-".join(map(str, c)))
def test_attention_backward_launches(monkeypatch, case):
    """One Triton launch per gradient kernel and no reduction launch: shared queries, split keys,
    both schedules, frozen inputs (was: one more Triton launch for Delta, and a torch.sum plus a
    cast for split or shared dQ). The gradients are checked against float64."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    B, Bq, M, splits, schedule, need = case
    g = torch.Generator().manual_seed(6)
    q, k, v = randn(Bq, M, 2, 16, generator=g), randn(B, 70, 2, 16, generator=g), randn(B, 70, 2, 16, generator=g)
    dout = randn(B, M, 2, 16, generator=g)
    leaves = [t.clone().requires_grad_(name in need) for t, name in ((q, "q"), (k, "k"), (v, "v"))]
    with mock.patch.object(cross_attention_bwd, "choose_num_splits", return_value=splits), \
            mock.patch.object(cross_attention_bwd, "use_single_pass", return_value=schedule == "single_pass"):
        out = deco_ops.cross_attention(*leaves)
        launches, ops = count(lambda: out.backward(dout))
    assert (dict(launches.counts), ops.total()) == ATTENTION_BACKWARD[case], ops.ops
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    reference_attention.attention_dense(*ref).backward(dout.double())
    for got, want in zip(leaves, ref):
        if got.requires_grad:
            assert_close(got.grad, want.grad, torch.float32)


def test_readme_table_matches_budget():
    doc = (Path(__file__).parents[1] / "docs" / "launches.md").read_text()
    section = doc.split("# Kernel launches per op", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        name, *cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
        rows[name] = tuple(None if c == "-" else tuple(int(n) for n in re.findall(r"\d+", c)) for c in cells)
    assert rows == BUDGET


@interpreter_only
def test_dense_ops_never_sync_with_the_host(monkeypatch):
    """With value checks off (the CUDA default), no dense op reads a device value on the host in
    forward or backward: no .item()/bool()/int(), nonzero, torch.equal or .tolist()."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    packed_only = ("_packed", "cu_seqlens_k")
    generator = torch.Generator().manual_seed(3)
    cases = {n: c for n, c in _cases().items() if not n.endswith(packed_only)}
    q, k, v = cases["cross_attention"][1]
    cases["cross_attention generator"] = (
        lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor([3, 20]), dropout_p=0.2, generator=generator),
        [q, k, v], ())
    for name, (fn, leaves, _) in cases.items():
        params = [t.clone().requires_grad_(True) for t in leaves]
        with Launches() as launches, TorchOps(launches) as ops:
            y = fn(*params)
            y.backward(torch.ones_like(y))
        assert ops.syncs == [], f"{name} synchronises: {ops.syncs}"


@interpreter_only
def test_unchecked_kv_lens_are_clamped(monkeypatch):
    """With value checks off, kv_lens outside [0, N] read no key out of bounds: the kernels clamp."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    g = torch.Generator().manual_seed(4)
    q, k, v = (randn(2, 3, 1, 16, generator=g), randn(2, 9, 1, 16, generator=g), randn(2, 9, 1, 16, generator=g))
    with deco_ops.use_backend("triton"):
        got = deco_ops.cross_attention(guarded(q), guarded(k), guarded(v), kv_lens=torch.tensor([-4, 1000]))
    want = reference_attention.attention_dense(q.double(), k.double(), v.double(), torch.tensor([0, 9]))
    assert_close(got, want, torch.float32)


@interpreter_only
def test_grid_axes_within_limits():
    """Huge batches keep every grid axis within CUDA's limits (axis 0 < 2**31, axes 1-2 <= 65535):
    BLIP-2 feature extraction at B = 6000 x 12 heads (both backward schedules, split keys) and a
    pooling batch of 70000 images. Grids are resolved and recorded, the kernels not run (the
    GEMM-only kernels, gemm_act_grad and mlp_pool's, share pool_gemm's 1D tile grid)."""
    B, H = 6000, 12
    with Launches(execute=False) as launches:
        x = torch.empty(70000, 4, 1)
        adaptive_pool.pool_tokens(x, (1, 2, 2), (1, 1, 1))
        adaptive_pool.unpool_tokens(torch.empty(70000, 1, 1), (1, 2, 2), (1, 1, 1))
        pool_gemm.pool_gemm(x, (1, 2, 2), (1, 1, 1), torch.empty(8, 1), None, "gelu", True, True)
        geometry = packed_pool.dense_geometry((1, 2, 2), (1, 1, 1), 70000, x.device)
        packed_pool.pool_packed(x.view(-1, 1), geometry, 70000, "average")
        packed_pool.unpool_packed(torch.empty(70000, 1), geometry, 280000, "average")
        for M in (32, 160):  # single pass, FA2
            q, kv = torch.empty(B, M, H, 1), torch.empty(B, 16, H, 1)
            out, lse = cross_attention_fwd.cross_attention_fwd(q, kv, kv, None, None, B, 16, 1.0, 0.0, None)
            long = torch.empty(1, 512, H, 1)
            cross_attention_fwd.cross_attention_fwd(q[:1], long, long, None, None, 1, 512, 1.0, 0.0, None, num_splits=4)
            cross_attention_bwd.cross_attention_bwd(out, q, kv, kv, out, lse, None, None, B, 16, 1.0, 0.0, None)
    names = {name for name, _ in launches.grids}
    assert len(names) == 10, names
    assert launches.grid_violations() == []


def test_fp32_precision_new_api():
    """``fp32_precision`` decides fp32 dots; reading it never raises (the legacy ``allow_tf32``
    does, once the new API was used), and fp32 ops run under "tf32"."""
    matmul = torch.backends.cuda.matmul
    g = torch.Generator().manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, p = randn(2, 16, 8, generator=g).to(dev), [t.to(dev) for t in _mlp(C=8)]
    q, k, v = (randn(*s, generator=g).to(dev) for s in ((1, 4, 1, 16), (2, 9, 1, 16), (2, 9, 1, 16)))
    try:
        for setting, expected in (("tf32", "tf32"), ("ieee", "ieee"), ("none", "ieee")):
            matmul.fp32_precision = setting
            assert _tuning.input_precision(torch.float32) == expected
            assert _tuning.input_precision(torch.float16) == _tuning.input_precision(torch.bfloat16) == "tf32"  # 16-bit dots ignore it
        matmul.fp32_precision = "tf32"
        with deco_ops.use_backend("triton"):
            y = deco_ops.pool_mlp(x, *p, grid=(4, 4), out_grid=(2, 2))
            o = deco_ops.cross_attention(q, k, v)
        ref = reference.pool_mlp(x.double(), *(t.double() for t in p), (4, 4), (2, 2), "gelu")
        assert_close(y, ref, torch.float32, tol=1e-3)
        assert_close(o, reference_attention.attention_dense(q.double(), k.double(), v.double(), None), torch.float32, tol=1e-3)
    finally:
        matmul.fp32_precision = "none"


def test_host_arith_is_exact_past_int32():
    """The launchers' grids, splits and block sizes come from ``_host_arith`` (Triton's own helpers
    without their wrapper): exact at multiples, where an off-by-one adds a program or doubles a
    tile, and past 2**31 rows."""
    for n in (1, 15, 16, 17, 64, 1000, 2**31 - 1, 2**31, 2**31 + 1, 3 * 2**32):
        assert _host_arith.next_power_of_2(n) == 1 << (n - 1).bit_length(), n
        for d in (1, 16, 64, 1000):
            assert _host_arith.cdiv(n, d) == -(-n // d), (n, d)


@cuda_only
def test_cuda_graph_capture_of_warmed_up_ops(monkeypatch):
    """After one eager call (autotuning, cached tables), the ops capture into a CUDA graph and
    replay on new input values. Value checks read values on the host, so they stay off (as they
    are on CUDA by default; the suite switches them on)."""
    monkeypatch.setenv("DECO_OPS_CHECKS", "0")
    dev = torch.device("cuda")
    x = torch.randn(2, 576, 64, device=dev, dtype=torch.float16)
    p = [t.to(dev, torch.float16) for t in _mlp(C=64, hidden=128, out=64)]
    q, kv = (torch.randn(2, 32, 2, 64, device=dev, dtype=torch.float16) for _ in range(2))
    kv_lens = torch.tensor([32, 7], device=dev)

    def run():
        return (deco_ops.pool_mlp(x, *p, grid=(24, 24), out_grid=(12, 12)),
                deco_ops.mlp_pool(x, *p, grid=(24, 24), out_grid=(12, 12)),
                deco_ops.cross_attention(q, kv, kv, kv_lens=kv_lens))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    x.copy_(torch.randn_like(x))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, run()):
        assert_close(got, want, torch.float16)


@cuda_only
def test_inputs_on_a_side_stream_and_another_device():
    """Launches follow the input's device and its current stream."""
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for dev in devices[-1:]:
        x = torch.randn(2, 36, 16, device=dev)
        p = [t.to(dev) for t in _mlp()]
        want = reference.pool_mlp(x.double(), *(t.double() for t in p), (6, 6), (3, 3), "gelu")
        stream = torch.cuda.Stream(dev)
        with torch.cuda.stream(stream), torch.cuda.device(devices[0]):  # another device current
            y = deco_ops.pool_mlp(x, *p, grid=(6, 6), out_grid=(3, 3))
        torch.cuda.synchronize(dev)
        assert_close(y, want, torch.float32)
