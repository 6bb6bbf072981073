"""kernels/cross_attention_tma.py, the TMA-descriptor attention forward for Hopper, against float64
references through Triton's interpreter (triton 3.9's interpreter runs tensor descriptors and
warp-specialised loops; on a GPU the same tests run the compiled kernel, sm_90 only).

Inputs live inside NaN-filled buffers whose padding keeps every stride 16-byte aligned (TMA), v's
wider than k's (every v stride differs from k's: a kernel reading v with k's strides fails), and
keys past ``kv_lens`` are NaN, so a descriptor that reads past a batch's keys, a head's dims or a
split's end turns the result into NaN; outputs start NaN-filled, so a row or split left unwritten
stays NaN. Key counts are not multiples of the key block (257), and the shapes reach each tile the
launcher picks: several heads per program (M < 64), a 64-query tile, the warp-specialised 128-query
tile (dense keys only: ragged keys take 64-query tiles, ``tile``).
"""

import functools
from unittest import mock

import pytest
import torch

import deco_ops
from deco_ops import attention, reference_attention as reference
from deco_ops.kernels import cross_attention_tma as tma
from deco_ops.kernels._tuning import device_smem_limit
from harness import DEVICE, assert_close, guarded, poisoned_empty, randn

if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) != (9, 0):
    pytest.skip("TMA descriptors: the kernel is built for sm_90", allow_module_level=True)

PAD = 8  # NaNs between rows of the last dim: (D + 8) elements keep 16-bit and fp32 strides 16-byte multiples


def _case(B, Bq, M, N, H, D, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (randn(b, L, H, D, dtype=dtype, generator=g) for b, L in ((Bq, M), (B, N), (B, N)))
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    if kv_lens is not None:
        pad = torch.arange(N)[None, :] >= kv_lens[:, None]
        k[pad], v[pad] = float("nan"), float("nan")
    return q, k, v, kv_lens


def _reference(q, k, v, kv_lens):
    """(O, LSE) in float64: rows without keys give O = 0, LSE = +inf."""
    B, N, H, D = k.shape
    q64 = q.double().expand(B, -1, -1, -1)
    valid = torch.ones(B, N, dtype=torch.bool) if kv_lens is None else torch.arange(N)[None, :] < kv_lens[:, None].long()
    k64 = torch.where(valid[:, :, None, None], k.double(), 0.0)
    s = torch.einsum("bmhd,bnhd->bhmn", q64, k64) * D**-0.5
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    dead = torch.isinf(lse)
    out = reference.attention_dense(q64, k64, torch.where(valid[:, :, None, None], v.double(), 0.0), kv_lens)
    return out, lse.masked_fill(dead, float("inf"))


def _check(out, lse, q, k, v, kv_lens, dtype):
    ref_out, ref_lse = _reference(q, k, v, kv_lens)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, dtype, "O")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE: +inf exactly for the rows without keys"
    assert_close(lse, ref_lse, torch.float32, "LSE")


# (B, q batch, M, N, H, D, kv_lens, dtype, splits): the launcher's tile for each is in the id.
CASES = [
    pytest.param(2, 2, 32, 257, 4, 64, [257, 100], torch.float16, None, id="blip2-heads2-N257-lens"),
    pytest.param(2, 1, 32, 257, 4, 64, None, torch.bfloat16, None, id="blip2-heads2-shared-bf16"),
    pytest.param(1, 1, 32, 257, 2, 64, [200], torch.float16, 3, id="heads2-split3-lens"),
    pytest.param(2, 2, 17, 70, 3, 80, [70, 0], torch.float32, None, id="M17-heads1-D80-fp32-empty"),
    pytest.param(1, 1, 70, 75, 2, 32, None, torch.float16, 2, id="M70-tile64-split2"),
    pytest.param(2, 2, 130, 75, 1, 32, None, torch.float16, None, id="M130-ws128"),
    pytest.param(2, 2, 130, 75, 1, 32, [75, 33], torch.float16, None, id="M130-tile64-lens"),
]


def _rows_guarded(t: torch.Tensor, extra: int = 128, pad: int = PAD) -> torch.Tensor:
    """``t`` (B, N, H, D) as the first N rows of each batch of a NaN-filled (B, N + extra, H, D + pad)
    buffer: a descriptor that does not stop at N reads NaN in every batch (``guarded`` leaves the
    next batch's finite keys after an earlier batch's last row)."""
    B, N, H, D = t.shape
    buffer = torch.full((B, N + extra, H, D + pad), float("nan"), dtype=t.dtype, device=t.device)
    view = buffer[:, :N, :, :D]
    view.copy_(t)
    return view


@pytest.mark.parametrize("B,Bq,M,N,H,D,lens,dtype,splits", CASES)
def test_forward_matches_float64(B, Bq, M, N, H, D, lens, dtype, splits):
    q, k, v, kv_lens = _case(B, Bq, M, N, H, D, lens, dtype, seed=M + N)
    with poisoned_empty():
        out, lse = tma.cross_attention_tma_fwd(guarded(q, PAD), _rows_guarded(k), _rows_guarded(v, 160, 2 * PAD), kv_lens, None,
                                               B, N, D**-0.5, splits)
    _check(out, lse, q, k, v, kv_lens, dtype)


def test_tiles_of_the_cases():
    """The cases above reach every tile: several heads, one head below 64 queries, the 64-query
    tile, the warp-specialised 128-query tile."""
    assert tma.tile(32, 4, 64) == (32, 2, False) and tma.tile(32, 12, 64) == (32, 2, False)
    assert tma.tile(17, 3, 80) == (32, 1, False) and tma.tile(70, 2, 32) == (64, 1, False)
    assert tma.tile(130, 1, 32) == (128, 1, True) and tma.tile(256, 16, 128) == (128, 1, True)
    assert tma.tile(130, 1, 32, ragged=True) == (64, 1, False)  # ragged keys: never warp-specialised


@pytest.mark.parametrize("M", [32, 130])
def test_packed_keys(M):
    """cu_seqlens_k: each batch's descriptor starts at its own first row and ends at its length.
    Packed keys are ragged: from 128 queries they take the 64-query tile, never the warp-specialised
    one (``tile``: NaN on the H200)."""
    dtype, H, D = torch.float16, 2, 64
    cu = torch.tensor([0, 40, 40, 137], dtype=torch.int32)  # key lengths 40, 0, 97
    g = torch.Generator().manual_seed(5)
    q = randn(3, M, H, D, dtype=dtype, generator=g)
    kp, vp = (randn(137, H, D, dtype=dtype, generator=g) for _ in range(2))
    kernel = tma.cross_attention_tma_kernel
    with poisoned_empty(), mock.patch.object(kernel, "run", wraps=kernel.run) as launch:
        out, lse = tma.cross_attention_tma_fwd(guarded(q, PAD), guarded(kp, PAD), guarded(vp, 2 * PAD), None, cu, 3, 97, D**-0.5)
    assert (launch.call_args.kwargs["BLOCK_M"], launch.call_args.kwargs["WARP_SPECIALIZE"]) == (min(M, 64), False)
    k, kv_lens, _ = reference.unpack_keys(kp, cu, 97)
    v, _, _ = reference.unpack_keys(vp, cu, 97)
    _check(out, lse, q, k, v, kv_lens.to(torch.int32), dtype)


def test_rejects_what_tma_cannot_read():
    q, k, v = (torch.randn(1, 8, 2, 12, dtype=torch.float16) for _ in range(3))  # 24-byte head stride
    with pytest.raises(ValueError, match="q must be"):
        tma.cross_attention_tma_fwd(q, k, v, None, None, 1, 8, 0.3)
    q, k, v = (torch.randn(1, 8, 2, 16, dtype=torch.float64) for _ in range(3))  # aligned, but no float64 kernel
    with pytest.raises(ValueError, match="q must be fp16/bf16/fp32"):
        tma.cross_attention_tma_fwd(q, k, v, None, None, 1, 8, 0.3)
    assert not tma.tma_addressable(torch.randn(1, 8, 2, 16, dtype=torch.float16)[..., 1:9])  # 2-byte offset base
    assert tma.tma_addressable(torch.randn(1, 8, 2, 16, dtype=torch.float16)[..., 8:])


def _inputs(lens=(70, 30)):
    q, k, v, kv_lens = _case(2, 2, 32, 70, 2, 32, list(lens), torch.float16, seed=9)  # two heads per program
    return [guarded(t, PAD).requires_grad_(True) for t in (q, k, v)], kv_lens


def test_opt_in_strategy_runs_it_and_backward_follows():
    """``use_strategy("fused_tma")`` runs the TMA forward through ``deco_ops.cross_attention``;
    the existing backward kernels read its O and LSE. Under ``auto`` it never runs (opt-in)."""
    (q, k, v), kv_lens = _inputs()
    dout = randn(*q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
    runs = mock.Mock(wraps=tma.cross_attention_tma_fwd)
    with mock.patch.object(tma, "cross_attention_tma_fwd", runs), poisoned_empty():
        with deco_ops.use_strategy("fused_tma"):
            out = deco_ops.cross_attention(q, k, v, kv_lens=kv_lens)
        out.backward(guarded(dout))
        assert runs.call_count == 1
        deco_ops.cross_attention(q, k, v, kv_lens=kv_lens)
        assert runs.call_count == 1, "auto ran an opt-in candidate"
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference.attention_dense(*leaves, kv_lens)
    ref.backward(dout.double())
    assert_close(out, ref, q.dtype, "O")
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert_close(t.grad, r.grad, q.dtype, name)


@pytest.mark.parametrize("change", ["dropout", "mask", "fp32", "unaligned"])
def test_fit_rule_refuses_what_the_kernel_leaves_out(change):
    """Dropout, additive masks, fp32 and tensors TMA cannot read stay on the fused kernel, even
    when ``fused_tma`` is selected (as ``composed`` keeps dropout on the fused path)."""
    (q, k, v), kv_lens = _inputs(lens=(70, 70))
    dropout_p, bias = 0.0, None
    if change == "dropout":
        dropout_p = 0.1
    elif change == "mask":
        bias = torch.zeros(2, 2, 32, 70)
    elif change == "fp32":
        q, k, v = (t.float() for t in (q, k, v))
    else:
        k = torch.randn(2, 70, 2, 34, dtype=torch.float16)[..., 1:33]
    assert not attention._tma_applies(q, k, v, kv_lens, None, dropout_p, bias)
    base = functools.partial(attention._tma_applies, kv_lens=kv_lens, cu_seqlens_k=None, dropout_p=0.0, attn_bias=None)
    assert base(*(t.half() for t in (q, k, v))) is (change != "unaligned")


def test_head_dims_past_128_stay_on_the_pointer_kernels_from_64_queries():
    """Head dim 256: no 64- or 128-query tile fits Hopper's shared memory at any stage count, so the
    fit rule refuses the candidate there and a forced ``fused_tma`` runs the pointer-load kernels
    (before: an autotuner with no config left raised). 32 queries still fit (one 32-row tile)."""
    limit = device_smem_limit(DEVICE)
    assert tma.applies(32, 2, 256, 2, limit, ragged=False)
    for M, ragged in ((64, False), (130, False), (130, True)):
        assert not tma.applies(M, 2, 256, 2, limit, ragged)
    assert tma.applies(130, 2, 128, 2, limit, ragged=False)
    q, k, v, _ = _case(1, 1, 64, 70, 1, 256, None, torch.float16, seed=17)
    runs = mock.Mock(wraps=tma.cross_attention_tma_fwd)
    with mock.patch.object(tma, "cross_attention_tma_fwd", runs), deco_ops.use_strategy("fused_tma"), poisoned_empty():
        out = deco_ops.cross_attention(*(guarded(t, PAD) for t in (q, k, v)))
    assert runs.call_count == 0
    assert_close(out, reference.attention_dense(q.double(), k.double(), v.double(), None), q.dtype, "O")


def test_a_plan_made_on_aligned_tensors_reads_misaligned_views_with_pointers():
    """A plan keeps the choice of its first call, and its key holds no strides or addresses: views
    of the same shapes that TMA cannot read, later, run the pointer-load kernels (before: the TMA
    launcher refused them with a ValueError)."""
    (q, k, v), kv_lens = _inputs()
    misaligned = [torch.full((*t.shape[:-1], t.shape[-1] + 1), float("nan"), dtype=t.dtype)[..., 1:] for t in (q, k, v)]
    for view, t in zip(misaligned, (q, k, v)):
        view.copy_(t.detach())
    assert not any(map(tma.tma_addressable, misaligned))
    runs = mock.Mock(wraps=tma.cross_attention_tma_fwd)
    deco_ops.strategy.forget()
    with mock.patch.object(tma, "cross_attention_tma_fwd", runs), deco_ops.use_strategy("fused_tma"), poisoned_empty():
        first = deco_ops.cross_attention(q.detach(), k.detach(), v.detach(), kv_lens=kv_lens)
        assert runs.call_count == 1
        second = deco_ops.cross_attention(*misaligned, kv_lens=kv_lens)
        assert runs.call_count == 1
    ref = reference.attention_dense(*(t.detach().double() for t in (q, k, v)), kv_lens)
    assert_close(first, ref, q.dtype, "O, TMA")
    assert_close(second, ref, q.dtype, "O, pointer kernels")
