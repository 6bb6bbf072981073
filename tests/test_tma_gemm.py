"""kernels/tma_gemm.py, the persistent TMA GEMM with the bias + activation and act' epilogues,
against float64 references through Triton's interpreter (triton 3.9's interpreter runs tensor
descriptors; on a GPU the same tests run the compiled kernel, sm_90 only).

Inputs live inside NaN-filled buffers whose 16-byte padding keeps the rows TMA-aligned, so a tile
read past M, N or K that is not zero-filled by the descriptor turns the result into NaN; outputs
start NaN-filled, so a tile the persistent loop skips stays NaN. Shapes are not multiples of the
tile, and have more tiles than the interpreter's 3 persistent programs.
"""

import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, assert_close, guarded, poisoned_empty, rel_err
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
    assert composed.tma_applies(pooled, w1, b1) is (DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) == (9, 0))
    assert not composed.tma_applies(pooled.float(), w1.float(), b1.float())
