"""Hardening of cross_attention and of the compressors together: fuzzed parity on the Triton
kernels (interpreter on a CPU) and on the default backend (SDPA's kernels), strided (a head dim
that is not unit-stride too) and shared inputs, and torch.compile of a model that chains both
compressors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import deco_ops
from deco_ops import reference_attention
from fuzz import dtypes, examples
from harness import assert_close, guarded, head_strided, poisoned_empty, randint, randn


@st.composite
def attention_shapes(draw):
    B = draw(st.integers(0, 5))
    M = draw(st.sampled_from([1, 2, 7, 17, 32, 33, 64, 100, 144, 257, 300]))
    N = draw(st.sampled_from([1, 3, 37, 64, 129, 257, 577, 1000, 2000]))
    D = draw(st.sampled_from([16, 32, 48, 64, 72, 80, 96, 128, 160, 256]))
    H = draw(st.integers(1, 3))
    # keep one interpreted case within a few seconds: B*H*M*N*D bounded
    while B * H * M * N * D > 2**22 and N > 1:
        N //= 2
    return B, M, N, H, D


@pytest.mark.parametrize("backend_name", ["triton", "auto"])
@examples(12)
@given(
    shape=attention_shapes(),
    shared=st.booleans(),
    with_lens=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "sliced", "head_strided"]),
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_fuzz_cross_attention(backend_name, shape, shared, with_lens, layout, dtype, seed):
    B, M, N, H, D = shape
    g = torch.Generator().manual_seed(seed)
    q = randn(1 if shared else B, M, H, D, dtype=dtype, generator=g)
    k = randn(B, N, H, D, dtype=dtype, generator=g)
    v = randn(B, N, H, D, dtype=dtype, generator=g)
    kv_lens = randint(0, N + 1, (B,), g, dtype=torch.int32) if with_lens else None
    if with_lens:
        pad = torch.arange(N)[None, :] >= kv_lens[:, None].long()
        k[pad], v[pad] = float("nan"), float("nan")
    if layout == "transposed":  # (B, H, N, D) storage, as a head-major projection would produce
        k, v = (t.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) for t in (k, v))
    elif layout == "sliced":  # rows of D inside a NaN-padded buffer (guard bands between heads)
        k, v = guarded(k), guarded(v)
    elif layout == "head_strided":  # (..., D, H) storage: the head dim is not unit-stride, in q too
        q, k, v = (head_strided(t) for t in (q, k, v))
    dout = randn(B, M, H, D, dtype=dtype, generator=g)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    with deco_ops.use_backend(backend_name), poisoned_empty():
        out = deco_ops.cross_attention(*leaves, kv_lens=kv_lens)
        grads = torch.autograd.grad(out, leaves, dout) if B else [torch.zeros_like(t) for t in leaves]
    ref = [t.detach().double().nan_to_num(0.0).requires_grad_(True) for t in leaves]
    ref_out = reference_attention.attention_dense(*ref, kv_lens=kv_lens)
    if B == 0:
        assert_close(out, ref_out, dtype, "out")
        return
    ref_grads = torch.autograd.grad(ref_out, ref, dout.double())
    eager = _eager_sdpa(*(t.detach().nan_to_num(0.0) for t in leaves), kv_lens, dout)
    for name, got, want, by_eager in zip(("out", "grad q", "grad k", "grad v"), (out, *grads), (ref_out, *ref_grads), eager):
        assert_close(got, want, dtype, name, eager=by_eager)


def _eager_sdpa(q, k, v, kv_lens, dout):
    """Output and q/k/v gradients of ``F.scaled_dot_product_attention`` in the inputs' dtype: the
    bound's scale where the float64 reference is exactly zero (one key: dq = dk = 0, and what is
    left is the rounding of P(dP - Delta), whose terms cancel), rows without keys as zeros."""
    B, N = k.shape[:2]
    mask = None if kv_lens is None else (torch.arange(N)[None, :] < kv_lens[:, None].long())[:, None, None, :]
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    heads_first = [t.expand(B, -1, -1, -1).transpose(1, 2) for t in leaves]
    out = F.scaled_dot_product_attention(*heads_first, attn_mask=mask).transpose(1, 2)
    grads = torch.autograd.grad(out, leaves, dout)
    return [t.detach().nan_to_num(0.0) for t in (out, *grads)]


class TwoCompressors(torch.nn.Module):
    """A toy MLLM front end: DeCo tokens and Q-Former tokens concatenated."""

    def __init__(self):
        super().__init__()
        self.deco = deco_ops.DeCoProjector(32, 48, grid=(6, 6), out_grid=(3, 3))
        self.resampler = deco_ops.QueryResampler(8, 48, 32, 4)

    def forward(self, x):
        return torch.cat([self.deco(x), self.resampler(x)], dim=1)


@pytest.mark.parametrize("backend_name", ["triton", "auto"])
def test_compile_two_op_model_matches_eager(backend_name):
    torch.manual_seed(3)
    model = TwoCompressors()
    x = torch.randn(2, 36, 32)
    with deco_ops.use_backend(backend_name):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = model(xe), compiled(xc)
        torch.testing.assert_close(yc, ye, rtol=0, atol=0)
        dy = torch.randn_like(ye)
        ge = torch.autograd.grad(ye, [xe, *model.parameters()], dy)
        gc = torch.autograd.grad(yc, [xc, *model.parameters()], dy)
        for a, b in zip(ge, gc):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert torch._dynamo.explain(model)(x).graph_break_count == 0


def test_offsets_past_2_31_elements():
    """k/v whose last batch starts past 2**31 elements into a lazily allocated buffer (only the
    touched pages are committed): 32-bit offset math would read the wrong keys or fault."""
    B, N, H, D = 3, 40, 2, 32
    stride_b = 2**30 + 64  # batch 2 starts at 2**31 + 128
    size = 1 + (B - 1) * stride_b + (N - 1) * H * D + (H - 1) * D + D
    k, v = (torch.empty(size, dtype=torch.float16).as_strided((B, N, H, D), (stride_b, H * D, D, 1)) for _ in range(2))
    k.copy_(randn(B, N, H, D, dtype=torch.float16))
    v.copy_(randn(B, N, H, D, dtype=torch.float16))
    q = randn(1, 5, H, D, dtype=torch.float16)
    dout = randn(B, 5, H, D, dtype=torch.float16)
    with deco_ops.use_backend("triton"):
        results = []
        for keys, values in ((k, v), (k.contiguous(), v.contiguous())):
            leaves = [q.clone().requires_grad_(True), keys.requires_grad_(True), values.requires_grad_(True)]
            out = deco_ops.cross_attention(*leaves)
            results.append([out, *torch.autograd.grad(out, leaves, dout)])
    for far, near in zip(*results):
        assert torch.equal(far, near)
    with deco_ops.use_backend("triton"):  # the weights kernel's offsets too
        weights = [deco_ops.cross_attention(q, keys, v.contiguous(), need_weights=True)[1] for keys in (k, k.contiguous())]
    assert torch.equal(*weights)
