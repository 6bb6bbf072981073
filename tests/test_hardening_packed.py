"""Fuzzed parity of the remaining public ops on the Triton kernels (interpreter on a CPU) and on
the default backend:
pool_linear, the packed ragged-batch ops, bilinear resampling and the project-then-pool order,
each against float64 PyTorch (F.adaptive_avg_pool*/F.interpolate, F.linear)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import deco_ops
from deco_ops import reference
from fuzz import BACKENDS, dtypes, examples, grid_pairs, lay_out, layouts
from harness import assert_close, poisoned_empty, randn

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture
def triton_backend():
    with deco_ops.use_backend("triton"):
        yield


def _resample64(x, grid, out_grid, mode):
    """float64 reference of one (B, N, C) grid: adaptive average or (bi/tri)linear interpolation."""
    if mode == "average":
        return reference.adaptive_avg_pool_tokens(x, grid, out_grid)
    B, _, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, *grid)
    out = F.interpolate(img, size=tuple(out_grid), mode="bilinear" if len(grid) == 2 else "trilinear", align_corners=False)
    return out.reshape(B, C, math.prod(out_grid)).transpose(1, 2)


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(6)
@given(grids=grid_pairs(max_side=20, max_tokens=400), B=st.integers(1, 3), C=st.integers(1, 70), out=st.integers(1, 70),
       bias=st.booleans(), dtype=dtypes, layout=layouts, seed=st.integers(0, 2**16))
def test_fuzz_pool_linear(backend_name, grids, B, C, out, bias, dtype, layout, seed):
    grid, out_grid = grids
    g = torch.Generator().manual_seed(seed)
    x = lay_out(randn(B, math.prod(grid), C, dtype=dtype, generator=g), layout).requires_grad_(True)
    w = randn(out, C, dtype=dtype, scale=C**-0.5, generator=g).requires_grad_(True)
    b = randn(out, dtype=dtype, generator=g).requires_grad_(True) if bias else None
    dy = randn(B, math.prod(out_grid), out, dtype=dtype, generator=g)
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y = deco_ops.pool_linear(x, w, b, grid=grid, out_grid=out_grid)
        y.backward(dy)
    ref = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    y64 = reference.pool_linear(*ref, grid, out_grid)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, "y")
    for name, got, want in zip("xwb", (x, w, b), ref):
        if got is not None:
            assert_close(got.grad, want.grad, dtype, f"grad {name}")


@st.composite
def packed_batches(draw):
    n = draw(st.integers(1, 4))
    rank = draw(st.sampled_from([2, 3]))
    grids, outs = [], []
    for _ in range(n):
        grid = tuple(draw(st.integers(1, 18 if rank == 2 else 6)) for _ in range(rank))
        grids.append(grid)
        outs.append(tuple(draw(st.integers(1, side + 2)) for side in grid))
    return grids, outs


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(6)
@given(batch=packed_batches(), C=st.integers(1, 70), mode=st.sampled_from(["average", "bilinear"]), dtype=dtypes, seed=st.integers(0, 2**16))
def test_fuzz_packed_pool(backend_name, batch, C, mode, dtype, seed):
    grids, outs = batch
    g = torch.Generator().manual_seed(seed)
    x = randn(sum(math.prod(s) for s in grids), C, dtype=dtype, generator=g).requires_grad_(True)
    op = deco_ops.adaptive_avg_pool_tokens_packed if mode == "average" else deco_ops.bilinear_pool_tokens_packed
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y, cu = op(x, torch.tensor(grids), out_grids=torch.tensor(outs))
    dy = randn(*y.shape, dtype=dtype, generator=g)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    pieces, start = [], 0
    for grid, out_grid in zip(grids, outs):
        n = math.prod(grid)
        pieces.append(_resample64(x64[start:start + n][None], grid, out_grid, mode)[0])
        start += n
    y64 = torch.cat(pieces)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert cu.tolist() == [0] + list(torch.tensor([math.prod(o) for o in outs]).cumsum(0).tolist())
    assert_close(y, y64, dtype, "y")
    assert_close(dx, dx64, dtype, "grad x")


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(6)
@given(grids=grid_pairs(max_side=14, max_tokens=200), B=st.integers(1, 2), C=st.integers(1, 48), hidden=st.integers(1, 64),
       out=st.integers(1, 48), mode=st.sampled_from(["average", "bilinear"]), activation=st.sampled_from(["gelu", "gelu_tanh", "silu"]),
       dtype=dtypes, seed=st.integers(0, 2**16))
def test_fuzz_mlp_pool(backend_name, grids, B, C, hidden, out, mode, activation, dtype, seed):
    grid, out_grid = grids
    g = torch.Generator().manual_seed(seed)
    x = randn(B, math.prod(grid), C, dtype=dtype, generator=g)
    params = [randn(hidden, C, dtype=dtype, scale=C**-0.5, generator=g), randn(hidden, dtype=dtype, generator=g),
              randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=g), randn(out, dtype=dtype, generator=g)]
    leaves = [t.requires_grad_(True) for t in [x, *params]]
    dy = randn(B, math.prod(out_grid), out, dtype=dtype, generator=g)
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y = deco_ops.mlp_pool(*leaves, grid=grid, out_grid=out_grid, activation=activation, mode=mode)
        y.backward(dy)

    def eager(x, w1, b1, w2, b2):  # PLLaVA's order: project every token, then pool
        return _resample64(F.linear(reference.ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2), grid, out_grid, mode)

    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = eager(*ref)
    y64.backward(dy.double())
    same_dtype = [t.detach().clone().requires_grad_(True) for t in leaves]
    y_eager = eager(*same_dtype)
    y_eager.backward(dy)
    assert_close(y, y64, dtype, "y", eager=y_eager)
    for name, got, want, base in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref, same_dtype):
        assert_close(got.grad, want.grad, dtype, f"grad {name}", eager=base.grad)


@pytest.mark.parametrize("backend_name", BACKENDS)
@examples(6)
@given(batch=packed_batches(), C=st.integers(1, 48), hidden=st.integers(1, 64), out=st.integers(1, 48),
       mode=st.sampled_from(["average", "bilinear"]), order=st.sampled_from(["pool_mlp", "mlp_pool"]),
       dtype=dtypes, seed=st.integers(0, 2**16))
def test_fuzz_packed_projectors(backend_name, batch, C, hidden, out, mode, order, dtype, seed):
    """pool_mlp_packed and mlp_pool_packed against a float64 loop over the images."""
    grids, outs = batch
    g = torch.Generator().manual_seed(seed)
    x = randn(sum(math.prod(s) for s in grids), C, dtype=dtype, generator=g)
    params = [randn(hidden, C, dtype=dtype, scale=C**-0.5, generator=g), randn(hidden, dtype=dtype, generator=g),
              randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=g), randn(out, dtype=dtype, generator=g)]
    leaves = [t.requires_grad_(True) for t in [x, *params]]
    op = deco_ops.pool_mlp_packed if order == "pool_mlp" else deco_ops.mlp_pool_packed
    with deco_ops.use_backend(backend_name), poisoned_empty():
        y, _ = op(leaves[0], torch.tensor(grids), *leaves[1:], out_grids=torch.tensor(outs), mode=mode)
    dy = randn(*y.shape, dtype=dtype, generator=g)
    y.backward(dy)

    def loop(x, w1, b1, w2, b2):
        mlp = lambda t: F.linear(F.gelu(F.linear(t, w1, b1)), w2, b2)  # noqa: E731
        pieces, start = [], 0
        for grid, out_grid in zip(grids, outs):
            xi = x[start:start + math.prod(grid)][None]
            start += math.prod(grid)
            pieces.append((mlp(_resample64(xi, grid, out_grid, mode)) if order == "pool_mlp"
                           else _resample64(mlp(xi), grid, out_grid, mode))[0])
        return torch.cat(pieces)

    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = loop(*ref)
    y64.backward(dy.double())
    same_dtype = [t.detach().clone().requires_grad_(True) for t in leaves]
    y_eager = loop(*same_dtype)
    y_eager.backward(dy)
    assert_close(y, y64, dtype, "y", eager=y_eager)
    for name, got, want, base in zip(("x", "w1", "b1", "w2", "b2"), leaves, ref, same_dtype):
        assert_close(got.grad, want.grad, dtype, f"grad {name}", eager=base.grad)


def test_offsets_past_2_31_elements():
    """Token rows 2**27+1 elements apart: token index x stride passes 2**31 within 36 tokens, so
    32-bit offset math in the packed gathers or GEMM loads would read the wrong rows (or fault).
    The buffer is allocated lazily: only the touched pages are committed."""
    C, stride = 8, 2**27 + 1
    grids = torch.tensor([[6, 6]])
    x = torch.empty(35 * stride + C, dtype=torch.float16).as_strided((36, C), (stride, 1))
    x.copy_(randn(36, C, dtype=torch.float16))
    dense = x.contiguous()
    w1, w2 = randn(16, C, dtype=torch.float16), randn(8, 16, dtype=torch.float16)
    for mode in ("average", "bilinear"):
        assert torch.equal(deco_ops.pool_mlp_packed(x, grids, w1, None, w2, None, stride=2, mode=mode)[0],
                           deco_ops.pool_mlp_packed(dense, grids, w1, None, w2, None, stride=2, mode=mode)[0])
        op = deco_ops.adaptive_avg_pool_tokens_packed if mode == "average" else deco_ops.bilinear_pool_tokens_packed
        assert torch.equal(op(x, grids, stride=2)[0], op(dense, grids, stride=2)[0])
    grads = []
    for tokens in (x, dense):  # mlp_pool: its backward kernel re-reads the tokens by their strides
        leaves = [tokens.requires_grad_(True), w1.clone().requires_grad_(True)]
        y = deco_ops.mlp_pool(leaves[0][None], leaves[1], None, w2, None, grid=(6, 6), out_grid=(3, 3))
        grads.append([y, *torch.autograd.grad(y, leaves, torch.ones_like(y))])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    dy = torch.empty(35 * stride + 8, dtype=torch.float16).as_strided((36, 8), (stride, 1))
    dy.copy_(randn(36, 8, dtype=torch.float16))
    pre = randn(36, 16, dtype=torch.float16)
    far = torch.ops.deco.mlp_activation_backward(dy, w2, pre, "gelu")
    near = torch.ops.deco.mlp_activation_backward(dy.contiguous(), w2, pre, "gelu")
    assert all(torch.equal(a, b) for a, b in zip(far, near))
