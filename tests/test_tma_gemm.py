"""kernels/tma_gemm.py, the persistent TMA GEMM with the bias + activation and act' epilogues,
against float64 references through Triton's interpreter (triton 3.9's interpreter runs tensor
descriptors; on a GPU the same tests run the compiled kernel, sm_90 only).

Inputs live inside NaN-filled buffers whose 16-byte padding keeps the rows TMA-aligned, so a tile
read past M, N or K that is not zero-filled by the descriptor turns the result into NaN; outputs
start NaN-filled, so a tile the persistent loop skips stays NaN. Shapes are not multiples of the
tile, and have more tiles than the interpreter's 3 persistent programs.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import deco_ops
from harness import DEVICE, assert_close, assert_rounded_once, guarded, guarded_strided, poisoned_empty, rel_err
from deco_ops import reference
from deco_ops.kernels import tma_gemm

if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (9, 0):
    pytest.skip("TMA descriptors and wgmma need sm_90", allow_module_level=True)

ACTIVATIONS = ("identity", "gelu", "gelu_tanh", "silu", "quick_gelu")
TMA_PAD = 8  # 16 bytes of 16-bit NaNs before, after and between rows: aligned rows for TMA


def _act(name):
    return (lambda t: t) if name == "identity" else reference.ACTIVATIONS[name]


def _act_grad(name, z):
    return torch.ones_like(z) if name == "identity" else reference.ACTIVATION_GRADS[name](z)


def _inputs(gen, dtype, *shapes, scale=1.0):
    return [guarded(torch.randn(*s, generator=gen).mul(scale).to(dtype), pad=TMA_PAD) for s in shapes]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("has_bias,store_pre", [(True, True), (False, False)])
def test_linear_act_matches_float64(activation, has_bias, store_pre):
    gen = torch.Generator().manual_seed(hash((activation, has_bias)) % 2**31)
    M, N, K = 70, 136, 40  # 3 x 3 tiles of 32 x 64 on 3 programs; K ends in a partial tile
    x, w, b = _inputs(gen, torch.float16, (M, K), (N, K), (N,))
    b = b if has_bias else None
    with poisoned_empty():
        out, pre = tma_gemm.tma_linear_act(x, w, b, activation, store_pre)
    ref_pre = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close(out, _act(activation)(ref_pre), torch.float16, "act(x @ w.T + b)")
    if store_pre:
        assert_close(pre, ref_pre, torch.float16, "pre-activation")
    else:
        assert pre is None


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_linear_act_reads_a_strided_or_expanded_bias(layout):
    """A bias at stride 4 between NaNs, or one value expanded over N (stride 0, one element
    allocated): the epilogue reads N consecutive elements, so the launcher copies it first."""
    gen = torch.Generator().manual_seed(13)
    x, w = _inputs(gen, torch.float16, (45, 64), (72, 64))
    b = torch.randn(72, generator=gen).to(torch.float16)
    b = guarded_strided(b) if layout == "strided" else b[:1].expand(72)
    with poisoned_empty():
        out, _ = tma_gemm.tma_linear_act(x, w, b, "gelu", False)
    assert_close(out, F.gelu(F.linear(x.double(), w.double(), b.double())), torch.float16, "gelu(x @ w.T + b)")


def test_linear_act_bf16():
    gen = torch.Generator().manual_seed(7)
    x, w, b = _inputs(gen, torch.bfloat16, (45, 64), (72, 64), (72,))
    with poisoned_empty():
        out, pre = tma_gemm.tma_linear_act(x, w, b, "gelu", True)
    ref_pre = F.linear(x.double(), w.double(), b.double())
    assert_close(pre, ref_pre, torch.bfloat16, "pre-activation")
    assert_close(out, F.gelu(ref_pre), torch.bfloat16, "gelu(x @ w.T + b)")


def test_linear_act_long_k_within_eager_error():
    """K = 1024: one fp32 accumulation rounded once, no worse than 1.5x eager fp16 F.linear."""
    gen = torch.Generator().manual_seed(11)
    x, w, b = _inputs(gen, torch.float16, (40, 1024), (24, 1024), (24,), scale=0.5)
    with poisoned_empty():
        out, _ = tma_gemm.tma_linear_act(x, w, b, "identity", False)
    ref = F.linear(x.double(), w.double(), b.double())
    eager = F.linear(x, w, b)
    assert_close(out, ref, torch.float16)
    assert rel_err(out, ref) <= 1.5 * rel_err(eager, ref), (rel_err(out, ref), rel_err(eager, ref))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_act_grad_matches_float64(activation):
    gen = torch.Generator().manual_seed(hash(activation) % 2**31)
    M, N, K = 70, 136, 48  # dy (M, K) @ w2 (K, N): the dH GEMM of the MLP backward
    dy, w2, z = _inputs(gen, torch.float16, (M, K), (K, N), (M, N))
    with poisoned_empty():
        dz, a = tma_gemm.tma_gemm_act_grad(dy, w2, z, activation)
    zd = z.double()
    assert_close(dz, (dy.double() @ w2.double()) * _act_grad(activation, zd), torch.float16, "dz")
    assert_close(a, _act(activation)(zd), torch.float16, "act(z)")


def test_act_grad_bf16_long_k():
    gen = torch.Generator().manual_seed(13)
    dy, w2, z = _inputs(gen, torch.bfloat16, (33, 1024), (1024, 40), (33, 40), scale=0.5)
    with poisoned_empty():
        dz, a = tma_gemm.tma_gemm_act_grad(dy, w2, z, "silu")
    zd = z.double()
    ref = (dy.double() @ w2.double()) * _act_grad("silu", zd)
    eager = (dy @ w2).float() * _act_grad("silu", z.float())
    assert_close(dz, ref, torch.bfloat16, "dz")
    assert rel_err(dz, ref) <= 1.5 * max(rel_err(eager.to(torch.bfloat16), ref), 1e-3)
    assert_close(a, F.silu(zd), torch.bfloat16, "silu(z)")


def test_linear_act_rounds_its_16_bit_outputs_once():
    """act(x @ w.T + b) and the pre-activation are the fp32 results each rounded once to fp16:
    all but a few equal the float64 value rounded (measured 0.2%: fp32 error at a rounding tie).
    An epilogue that rounds the pre-activation to 16 bits before the activation (eager PyTorch's
    two roundings) moves about a third of GELU's outputs by an ulp, below any relative tolerance."""
    gen = torch.Generator().manual_seed(17)
    x, b = _inputs(gen, torch.float16, (40, 16), (72,))
    (w,) = _inputs(gen, torch.float16, (72, 16), scale=16**-0.5)
    with poisoned_empty():
        out, pre = tma_gemm.tma_linear_act(x, w, b, "gelu", True)
    pre64 = F.linear(x.double(), w.double(), b.double())
    for what, got, want in (("pre-activation", pre, pre64), ("gelu", out, F.gelu(pre64))):
        assert_rounded_once(got, want, what)


def test_refuses_a_gpu_before_hopper():
    """On an sm_80 GPU (faked: CUDA fake tensors, the arch patched) both launchers refuse by name
    before they build a descriptor; the module's tests skip there, so nothing else sees it."""
    with FakeTensorMode():
        x, w, z = (torch.empty(*s, dtype=torch.float16, device="cuda") for s in ((8, 16), (24, 16), (8, 24)))
    with mock.patch.object(tma_gemm, "device_arch", lambda device: 80):
        with pytest.raises(RuntimeError, match=r"sm_90 \(Hopper\) or newer GPU, cuda:0 is sm_80"):
            tma_gemm.tma_linear_act.__wrapped__(x, w, None, "gelu", False)
        with pytest.raises(RuntimeError, match="sm_90"):
            tma_gemm.tma_gemm_act_grad.__wrapped__(x, w.T, z, "gelu")


def test_rejects_what_tma_cannot_read():
    x = torch.randn(8, 12, dtype=torch.float16)  # 24-byte rows: not a 16-byte multiple
    w = torch.randn(16, 12, dtype=torch.float16)
    with pytest.raises(ValueError, match="x must be"):
        tma_gemm.tma_linear_act(x, w, None, "gelu", False)
    x, w = torch.randn(8, 16, dtype=torch.float16), torch.randn(12, 16, dtype=torch.float16)  # N = 12: 24-byte output rows
    with pytest.raises(ValueError, match="out"):
        tma_gemm.tma_linear_act(x, w, None, "gelu", False)
    with pytest.raises(ValueError, match="w must be"):
        tma_gemm.tma_linear_act(torch.randn(8, 16, dtype=torch.float16), torch.randn(16, 16), None, "gelu", False)
    with pytest.raises(TypeError, match="share one dtype"):
        tma_gemm.tma_linear_act(torch.randn(8, 16, dtype=torch.float16), torch.randn(16, 16, dtype=torch.bfloat16),
                                None, "gelu", False)
    with pytest.raises(ValueError, match="do not make a Linear"):
        tma_gemm.tma_linear_act(torch.randn(8, 16, dtype=torch.float16), torch.randn(16, 24, dtype=torch.float16),
                                None, "gelu", False)
    with pytest.raises(ValueError, match="do not match"):
        tma_gemm.tma_gemm_act_grad(torch.randn(8, 16, dtype=torch.float16), torch.randn(16, 24, dtype=torch.float16),
                                   torch.randn(8, 16, dtype=torch.float16), "gelu")
    x, w = torch.randn(8, 16, dtype=torch.float16), torch.randn(24, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not make a Linear"):  # 25 bias values: the epilogue would read 24
        tma_gemm.tma_linear_act(x, w, torch.randn(25, dtype=torch.float16), "gelu", False)
    with pytest.raises(TypeError, match="b must be torch.float16"):
        tma_gemm.tma_linear_act(x, w, torch.randn(24), "gelu", False)
    with pytest.raises(ValueError, match="x must be"):  # no rows
        tma_gemm.tma_linear_act(x[:0], w, None, "gelu", False)
    with pytest.raises(ValueError, match="z must be"):  # 50-byte rows
        tma_gemm.tma_gemm_act_grad(x, w.T.contiguous(), torch.randn(8, 25, dtype=torch.float16)[:, :24], "gelu")
    assert not tma_gemm.tma_compatible(torch.randn(8, 16, dtype=torch.float16)[:, 1:9])  # 2-byte offset base
    assert tma_gemm.tma_compatible(torch.randn(8, 16, dtype=torch.float16)[:, 8:])


@pytest.mark.parametrize("keep_residuals", [True, False])
def test_pool_mlp_tma_matches_float64(keep_residuals):
    """The composed projector with its first GEMM + bias + GELU on the TMA kernel (the candidate
    for pool_mlp on Hopper): pooled (B, P, C) -> Linear2(gelu(Linear1(pooled)))."""
    from deco_ops import composed

    gen = torch.Generator().manual_seed(17)
    pooled, w1, b1, w2, b2 = (torch.randn(*s, generator=gen).to(torch.float16)
                              for s in ((2, 36, 64), (72, 64), (72,), (40, 72), (40,)))
    with poisoned_empty():
        y, kept, pre = composed.pool_mlp_tma(pooled, w1, b1, w2, b2, "gelu", keep_residuals)
    ref_pre = F.linear(pooled.double(), w1.double(), b1.double())
    ref_y = F.linear(F.gelu(ref_pre), w2.double(), b2.double())
    eager_y, *_ = composed.pool_mlp(pooled, w1, b1, w2, b2, "gelu", keep_residuals)
    assert_close(y, ref_y, torch.float16, "y", eager=eager_y)
    if keep_residuals:
        assert kept is pooled
        assert_close(pre, ref_pre, torch.float16, "pre-activation")
    else:
        assert kept.numel() == 0 and pre.numel() == 0
    assert composed.tma_applies(pooled, w1, b1) is (DEVICE.type != "cuda" or torch.cuda.get_device_capability(DEVICE) == (9, 0))


# ----------------------------------------------------------------------------------------------
# the opt-in ``fused_tma`` candidates of pool_mlp, merge_mlp and mlp_activation_backward


def _projector_call(op, gen, dtype):
    """(call(x, *weights), x, weights): pool_mlp over a 6x6 -> 3x3 grid, or Qwen2-VL's merge_mlp
    (LayerNorm before a 2x2 merge, block order); widths 16-byte multiples, as TMA needs."""
    if op == "pool_mlp":
        x = torch.randn(2, 36, 64, generator=gen)
        shapes = ((72, 64), (72,), (40, 72), (40,))

        def call(x, w1, b1, w2, b2):
            return deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=(6, 6), out_grid=(3, 3))
    else:
        x = torch.randn(64, 32, generator=gen)
        shapes = ((32,), (32,), (64, 128), (64,), (48, 64), (48,))

        def call(x, nw, nb, w1, b1, w2, b2):
            return deco_ops.merge_mlp(x, nw, nb, w1, b1, w2, b2, merge_size=2, norm="layernorm", norm_position="pre")
    weights = [torch.randn(*s, generator=gen) / (s[-1] ** 0.5 if len(s) == 2 else 1.0) + (len(s) == 1) for s in shapes]
    return call, x.to(dtype), [w.to(dtype) for w in weights]


def _run(call, x, weights, dy):
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    y = call(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


SM90_ONLY = pytest.mark.skipif(DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) != (9, 0),
                               reason="the TMA candidates are offered on sm_90 only")


@SM90_ONLY
@pytest.mark.parametrize("op", ["pool_mlp", "merge_mlp"])
def test_opt_in_candidates_run_through_the_ops(op):
    """``use_strategy("fused_tma")`` runs the op's first GEMM (bias + GELU epilogue) and the
    backward's dz GEMM (act' epilogue) on the TMA kernel; output and every gradient match the op in
    float64 within 2x eager fp16's error. Under ``auto`` the TMA kernel never runs (opt-in)."""
    gen = torch.Generator().manual_seed(29)
    call, x, weights = _projector_call(op, gen, torch.float16)
    dy = torch.randn(call(x, *weights).shape, generator=gen).to(torch.float16)
    with deco_ops.use_backend("torch"):
        ref = _run(call, x.double(), [w.double() for w in weights], dy.double())
    with deco_ops.use_strategy("composed"):
        eager = _run(call, x, weights, dy)
    launches, choose = mock.Mock(wraps=tma_gemm._launch), mock.Mock(wraps=deco_ops.strategy.choose)
    with mock.patch.object(tma_gemm, "_launch", launches), mock.patch.object(deco_ops.strategy, "choose", choose):
        with deco_ops.use_strategy("fused_tma"), poisoned_empty():
            out = _run(call, x, weights, dy)
        assert [c.args[7] for c in launches.call_args_list] == [tma_gemm.BIAS_ACT, tma_gemm.ACT_GRAD]
        _run(call, x, weights, dy)
        assert launches.call_count == 2, "auto ran the opt-in TMA GEMM"
    # the interpreter's auto runs fused anyway: a GPU's auto leaves these out because they are opt-in
    offered = [c.args[0]["fused_tma"] for c in choose.call_args_list if "fused_tma" in c.args[0]]
    assert len(offered) >= 2 and all(c.opt_in for c in offered)  # forward and backward, once per plan
    names = ["y", "dx", *(f"d{name}" for name in ("w1", "b1", "w2", "b2") if op == "pool_mlp")]
    names += [f"d{name}" for name in ("norm_w", "norm_b", "w1", "b1", "w2", "b2") if op == "merge_mlp"]
    for name, o, r, e in zip(names, out, ref, eager):
        assert_close(o, r, torch.float16, name, eager=e)


@SM90_ONLY
def test_merge_mlp_float32_norm_before_a_16_bit_mlp_keeps_tma():
    """The mix autocast hands ``merge_mlp`` (fp32 tokens and norm, fp16 Linears) still offers the
    TMA candidate: the rows it feeds the GEMM are the MLP's fp16. Output and every gradient as the
    composed twin's within 2x its error against float64."""
    gen = torch.Generator().manual_seed(37)
    call, x, weights = _projector_call("merge_mlp", gen, torch.float16)
    x, weights = x.float(), [w.float() if i < 2 else w for i, w in enumerate(weights)]
    dy = torch.randn(call(x, *weights).shape, generator=gen).to(torch.float16)
    with deco_ops.use_backend("torch"):
        ref = _run(call, x.double(), [w.double() for w in weights], dy.double())
    with deco_ops.use_strategy("composed"):
        eager = _run(call, x, weights, dy)
    launches = mock.Mock(wraps=tma_gemm._launch)
    with mock.patch.object(tma_gemm, "_launch", launches), deco_ops.use_strategy("fused_tma"):
        out = _run(call, x, weights, dy)
    assert [c.args[7] for c in launches.call_args_list] == [tma_gemm.BIAS_ACT, tma_gemm.ACT_GRAD]
    assert out[0].dtype == torch.float16 and out[1].dtype == torch.float32
    for name, o, r, e in zip(["y", "dx", "dnorm_w", "dnorm_b", "dw1", "db1", "dw2", "db2"], out, ref, eager):
        assert_close(o, r, torch.float16, name, eager=e)


@SM90_ONLY
def test_candidates_only_where_tma_can_read():
    """The fit rules (``composed.tma_applies``, ``act_grad_tma_applies``) refuse what a descriptor
    cannot address or the kernel does not take; a forced ``fused_tma`` then runs the op's ``fused``
    path, as right as ever. The backward of ``y.sum()`` gets a stride-0 dy: no TMA for dz."""
    from deco_ops import composed

    gen = torch.Generator().manual_seed(31)
    x, w1, b1, dy, pre = (torch.randn(*s, generator=gen).to(torch.float16) for s in ((2, 36, 64), (72, 64), (72,), (5, 40), (5, 72)))
    w2 = torch.randn(40, 72, generator=gen).to(torch.float16)
    assert composed.tma_applies(x, w1, b1) and composed.act_grad_tma_applies(dy, w2, pre)
    assert not composed.tma_applies(x.float(), w1.float(), b1.float())  # fp32
    assert not composed.tma_applies(x, w1[:36], b1[:36])  # 36 hidden rows of 72 bytes: dz/act rows unaligned
    assert not composed.tma_applies(x[..., :60], w1[:, :60], b1)  # 120-byte input rows, a strided w1
    assert not composed.tma_applies(x, w1, b1.float())  # a bias of another dtype
    assert not composed.tma_applies(x, w1.bfloat16(), None)  # a w1 of another dtype than the rows
    assert not composed.act_grad_tma_applies(dy[:1].expand(5, 40), w2, pre)  # y.sum()'s dy
    assert not composed.act_grad_tma_applies(dy, w2.float(), pre)
    assert not composed.act_grad_tma_applies(dy, w2, pre.bfloat16())  # pre of another dtype than dy and w2
    assert not composed.act_grad_tma_applies(dy, w2[:, :36], pre[:, :36])

    w1n, b1n, w2n = (t.detach().requires_grad_() for t in (w1[:36].contiguous(), b1[:36].clone(), w2[:, :36].contiguous()))
    xg = x.detach().requires_grad_()
    launches = mock.Mock(wraps=tma_gemm._launch)
    with mock.patch.object(tma_gemm, "_launch", launches), deco_ops.use_strategy("fused_tma"):
        y = deco_ops.pool_mlp(xg, w1n, b1n, w2n, None, grid=(6, 6), out_grid=(3, 3))
        y.float().sum().backward()
    assert launches.call_count == 0
    pooled = F.adaptive_avg_pool2d(x.double().view(2, 6, 6, 64).permute(0, 3, 1, 2), (3, 3)).flatten(2).transpose(1, 2)
    ref = F.linear(F.gelu(F.linear(pooled, w1n.double(), b1n.double())), w2n.double())
    assert_close(y, ref, torch.float16, "y")


@SM90_ONLY
def test_a_plan_made_on_aligned_operands_takes_what_tma_cannot_read():
    """A plan keeps the choice of its first call, and its key holds no addresses and of the strides
    only whether the last is 1. After a TMA call: a misaligned view of w1 (same shape) runs the
    first Linear in PyTorch, ``y.sum()``'s stride-0 dy the pointer act' GEMM, and so does a dy of
    the first call's signature whose rows are not 16-byte aligned (before: the TMA launchers
    raised)."""
    gen = torch.Generator().manual_seed(37)
    x, w1, b1, w2 = (torch.randn(*s, generator=gen).to(torch.float16) for s in ((2, 36, 64), (72, 64), (72,), (40, 72)))
    w1_view = torch.full((72, 65), float("nan"), dtype=torch.float16)[:, 1:]
    w1_view.copy_(w1)
    assert not tma_gemm.tma_compatible(w1_view)
    dy = torch.randn(2, 9, 40, generator=gen).to(torch.float16)
    dy_view = torch.full((2, 9, 41), float("nan"), dtype=torch.float16)[..., 1:]  # unit last stride, rows misaligned
    dy_view.copy_(dy)
    assert not tma_gemm.tma_compatible(dy_view)
    launches = mock.Mock(wraps=tma_gemm._launch)
    deco_ops.strategy.forget()
    results = []
    with mock.patch.object(tma_gemm, "_launch", launches), deco_ops.use_strategy("fused_tma"):
        for weight, grad in ((w1, dy), (w1_view, None), (w1, dy_view)):
            xg = x.detach().requires_grad_()
            y = deco_ops.pool_mlp(xg, weight, b1, w2, None, grid=(6, 6), out_grid=(3, 3))
            if grad is None:
                y.sum().backward()  # dy = ones expanded: stride 0
            else:
                y.backward(grad)
            results.append((y.detach(), xg.grad))
            if grad is dy:
                assert [c.args[7] for c in launches.call_args_list] == [tma_gemm.BIAS_ACT, tma_gemm.ACT_GRAD]
    assert [c.args[7] for c in launches.call_args_list] == [tma_gemm.BIAS_ACT, tma_gemm.ACT_GRAD, tma_gemm.BIAS_ACT]
    x64 = x.double().requires_grad_()
    pooled = F.adaptive_avg_pool2d(x64.view(2, 6, 6, 64).permute(0, 3, 1, 2), (3, 3)).flatten(2).transpose(1, 2)
    ref = F.linear(F.gelu(F.linear(pooled, w1.double(), b1.double())), w2.double())
    for (y, dx), grad in zip(results, (dy.double(), torch.ones_like(ref), dy.double())):
        (dx_ref,) = torch.autograd.grad(ref, x64, grad, retain_graph=True)
        assert_close(y, ref, torch.float16, "y")
        assert_close(dx, dx_ref, torch.float16, "dx")
