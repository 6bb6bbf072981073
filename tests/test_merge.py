"""merge_mlp / merge_mlp_packed, forward and every gradient, against float64 eager PyTorch written
the way the HF modules compute it (Qwen's ``view``, InternVL's ``pixel_shuffle``)."""

import contextlib
import itertools
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import deco_ops
from deco_ops import _plan, reference
from deco_ops._direct import deco
from deco_ops.kernels import gemm_act_grad, merge_gemm, merge_norm
from fuzz import dtypes, examples
from harness import DEVICE, assert_close, guarded, guarded_strided, head_strided, leaf, peak_bytes, poisoned_empty, randn, training_step

NAMES = ("x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2")
KERNELS = [merge_norm.merge_norm_stats_kernel, merge_gemm.merge_gemm_kernel, gemm_act_grad.gemm_act_grad_kernel,
           merge_norm.merge_norm_backward_kernel]


def pixel_shuffle(x, scale):
    """InternVL's pixel_shuffle (HF ``InternVLModel.pixel_shuffle``), transcribed, for (B, H, W, C)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


def eager_merge_mlp(x, nw, nb, w1, b1, w2, b2, *, grid=None, merge_size=2, order="block", norm="layernorm",
                    norm_position="pre", eps=1e-6, activation="gelu", with_pre=False):
    """The HF modules' sequence in plain PyTorch (differentiable): norm, merge, Linear, act, Linear;
    the norm's rows cast to the Linears' dtype where it differs (a float32 norm, a 16-bit MLP).
    ``with_pre``: (output, pre-activation), the raw op's two outputs."""
    S = merge_size

    def normalize(t):
        if norm == "layernorm":
            return F.layer_norm(t, (t.shape[-1],), nw, nb, eps)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        return t * nw if nw is not None else t

    def merged(t):
        if order == "block":
            return t.reshape(*t.shape[:-2], -1, S * S * t.shape[-1])
        *T, H, W = grid
        frames = t.reshape(-1, H, W, t.shape[-1])
        return pixel_shuffle(frames, 1 / S).reshape(t.shape[0], -1, S * S * t.shape[-1])

    h = merged(normalize(x)) if norm_position == "pre" else normalize(merged(x))
    h = h if torch.is_autocast_enabled(h.device.type) else h.to(w1.dtype)
    pre = F.linear(h, w1, b1)
    y = F.linear(reference.ACTIVATIONS[activation](pre), w2, b2)
    return (y, pre) if with_pre else y


def _case(dtype, *, B=2, N=24, C=12, hidden=40, out=24, merge_size=2, norm="layernorm", norm_position="pre",
          bias=(True, True, True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    width = C if norm_position == "pre" else merge_size * merge_size * C
    K = merge_size * merge_size * C
    x = randn(B, N, C, dtype=dtype, generator=g) * 1.5 + 0.5  # a mean away from 0: LayerNorm centres
    nw = randn(width, dtype=dtype, generator=g) * 0.5 + 1 if bias[0] else None
    nb = randn(width, dtype=dtype, generator=g) * 0.3 if bias[1] and norm == "layernorm" else None
    w1 = randn(hidden, K, dtype=dtype, scale=K**-0.5, generator=g)
    b1 = randn(hidden, dtype=dtype, generator=g) if bias[2] else None
    w2 = randn(out, hidden, dtype=dtype, scale=hidden**-0.5, generator=g)
    b2 = randn(out, dtype=dtype, generator=g) if bias[3] else None
    dy = randn(B, N // (merge_size * merge_size), out, dtype=dtype, generator=g)
    return [x, nw, nb, w1, b1, w2, b2], dy


def _check(params, dy, dtype, requires=None, tighten=False, eager_factor=2.0, tokens=guarded_strided, eager_bound=True, **kw):
    """Fused op on guard-banded inputs (vectors at stride 4) with NaN-poisoned outputs vs float64 eager; ``requires``:
    the names of the inputs that require grad (default all present); ``tighten``, ``eager_factor``:
    as in ``assert_close``; ``tokens``: how x is laid out (``harness.head_strided``: channels not unit-stride);
    ``eager_bound=False``: the dtype's bound alone, where ``eager_merge_mlp``'s own error in ``dtype`` is no
    measure (its RMSNorm squares in the tokens' dtype)."""
    requires = set(NAMES) if requires is None else requires
    leaves = [None if p is None else leaf((tokens if n == "x" else guarded_strided)(p)).requires_grad_(n in requires)
              for n, p in zip(NAMES, params)]
    with poisoned_empty():
        y = deco_ops.merge_mlp(*leaves, **kw)
        if any(t is not None and t.requires_grad for t in leaves):
            y.backward(guarded(dy))
    ref = [leaf(p, torch.float64) for p in params]
    y64 = eager_merge_mlp(*ref, **kw)
    y64.backward(dy.double())
    same = [leaf(p) for p in params]
    y_same = eager_merge_mlp(*same, **kw)
    y_same.backward(dy)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, "y", eager=y_same if eager_bound else None, tighten=tighten, eager_factor=eager_factor)
    for name, got, want, base in zip(NAMES, leaves, ref, same):
        if got is None:
            continue
        if name in requires:
            assert_close(got.grad, want.grad, dtype, f"grad {name}", eager=base.grad if eager_bound else None, tighten=tighten,
                         eager_factor=eager_factor)
        else:
            assert got.grad is None, name


MATRIX = [(o, n, p) for o in ("block", "grid") for n in ("layernorm", "rmsnorm") for p in ("pre", "post")]


@pytest.mark.parametrize("order,norm,position", MATRIX)
def test_merge_mlp(backend, order, norm, position):
    params, dy = _case(torch.float32, norm=norm, norm_position=position)
    _check(params, dy, torch.float32, grid=(4, 6) if order == "grid" else None, order=order, norm=norm,
           norm_position=position, eps=1e-5)


@pytest.mark.parametrize("order,position", [("block", "pre"), ("grid", "post")])
def test_constant_groups_standardise_to_zero(backend, order, position):
    """A LayerNorm group whose values are all equal (a blank or padded patch) is exactly 0 after
    centring in PyTorch; a mean one rounding off (``total / width``) would leave an ulp that
    ``1/sqrt(eps)`` magnifies to 1e-4 of the output. Image 0 is one constant, image 1 random;
    judged within 8x eager fp32's own error (such a mean gives 30-40x; 8x leaves room for a GPU's
    other summation order)."""
    params, dy = _case(torch.float32, N=64, C=20, norm_position=position)
    params[0][0] = 0.1 + 0.2 * params[0][0, 0, 0]
    _check(params, dy, torch.float32, tighten=True, eager_factor=8.0, grid=(8, 8) if order == "grid" else None, order=order,
           norm="layernorm", norm_position=position, eps=1e-5)


@pytest.mark.parametrize("order,norm,position", MATRIX)
def test_merge_mlp_float64(order, norm, position):
    """The PyTorch backend (the default on CPU tensors) takes float64 as it is: every gradient to float64's precision (a step
    computed in fp32 would show as 1e-8)."""
    params, dy = _case(torch.float64, norm=norm, norm_position=position)
    with deco_ops.use_backend("torch"):
        _check(params, dy, torch.float64, grid=(4, 6) if order == "grid" else None, order=order, norm=norm,
               norm_position=position, eps=1e-5)


@pytest.mark.parametrize("requires", [
    *(pytest.param(set(s) | {"b1", "w2", "b2"}, id="+".join(sorted(s)) or "only_b1_w2_b2")
      for r in range(5) for s in itertools.combinations(("x", "norm_weight", "norm_bias", "w1"), r)),
    pytest.param({"b1", "b2"}, id="biases_alone"),
])
def test_every_subset_requiring_grad(requires):
    """Each subset of the inputs whose gradients the norm backward kernel serves (its NEED_DX /
    NEED_DWN / NEED_DBN / STORE_N flags), b1, w2 and b2 requiring grad (plain reductions and cuBLAS
    GEMMs); and the biases alone under frozen weights (each bias's gradient by its own flag, not
    its weight's); the frozen ones get no gradient."""
    params, dy = _case(torch.float32, B=1, N=8, C=8, hidden=16, out=8, norm_position="post", merge_size=1)
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, requires=requires, grid=(2, 4), order="grid", norm_position="post", merge_size=1)


@pytest.mark.parametrize("norm,present", [("layernorm", (False, True, True, True)), ("layernorm", (True, False, True, True)),
                                          ("layernorm", (True, True, False, False)), ("rmsnorm", (False, False, True, False)),
                                          ("layernorm", (False, False, False, False))],
                         ids=["no_norm_weight", "no_norm_bias", "no_b1_b2", "rmsnorm_no_weight_no_b2", "none"])
def test_optional_arguments(norm, present):
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8, norm=norm, bias=present)
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, norm=norm)


@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_activations(activation):
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, activation=activation)


@pytest.mark.interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pre", [True, False], ids=["pre", "post"])
def test_norm_statistics_of_tokens_far_from_zero(pre, dtype):
    """Tokens whose mean is large against their spread (1e4 + 0.01 * randn: a shared offset, as
    vision towers' outlier channels have): the stats kernel's mean and 1/sigma per normalised row
    (a token before the merge, a merged block after it) against float64, at fp32's accuracy. The
    rounded mean's error must leave the variance (a corrected two-pass); without that 1/sigma is
    ~4e-3 off, which the end-to-end output cannot show: fp32 tokens this far from zero lose ~1e-2
    of their spread in any fp32 LayerNorm, eager's included. fp16 tokens (100 + randn) get fp32
    statistics too: stored in 16 bits, the mean would be off by up to 1/32, 1/sigma by 5e-4."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 0.01 * randn(1, 16, 64, generator=g) if dtype == torch.float32 else 100 + randn(1, 16, 64, dtype=dtype, generator=g)
    stats = merge_norm.merge_norm_stats(x, 2, "block", (1, 4, 4), None, None, "layernorm", pre, 1e-6)
    rows = x.double().reshape(16 if pre else 4, -1)  # "block" order: a merged row is 4 consecutive tokens
    mean, rstd = rows.mean(1), 1 / torch.sqrt(rows.var(1, unbiased=False) + 1e-6)
    torch.testing.assert_close(stats[..., 0].reshape(-1).double(), mean, rtol=1e-7, atol=0)
    torch.testing.assert_close(stats[..., 1].reshape(-1).double(), rstd, rtol=1e-5, atol=0)


def test_merge_size_3_and_video_grid():
    """3x3 merges of a (T, H, W) grid with H != W (each frame merged on its own) and of consecutive blocks."""
    params, dy = _case(torch.float32, B=1, N=2 * 54, C=8, hidden=16, out=8, merge_size=3)
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, grid=(2, 6, 9), order="grid", merge_size=3)
    params, dy = _case(torch.float32, B=1, N=2 * 36, C=8, hidden=16, out=8, merge_size=3, norm_position="post")
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, merge_size=3, norm_position="post")


@pytest.mark.parametrize("order,norm,position", [("block", "layernorm", "pre"), ("grid", "rmsnorm", "post")])
def test_tokens_with_strided_channels(order, norm, position):
    """Tokens whose channels are not unit-stride (a (B, C, N) feature map viewed as (B, N, C)):
    the kernels read them by their strides, and the norm backward writes dx, a fresh contiguous
    tensor, by dx's own strides, not x's."""
    params, dy = _case(torch.float32, B=2, N=16, C=8, hidden=16, out=8, norm=norm, norm_position=position)
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, tokens=head_strided, grid=(4, 4) if order == "grid" else None, order=order,
               norm=norm, norm_position=position)


def test_more_merged_rows_than_one_program():
    """72 merged rows: more than one program of the norm kernels under the interpreter (64 rows
    each; 16 on a GPU), so each program's rows and its partial sums of the norm's parameter
    gradients must sit at the program's own offset."""
    params, dy = _case(torch.float32, B=2, N=144, C=4, hidden=8, out=4, norm_position="post")
    with deco_ops.use_backend("triton"):
        _check(params, dy, torch.float32, grid=(12, 12), order="grid", norm_position="post")


def test_norm_parameter_grads_add_the_programs_partial_sums_in_fp32():
    """The norm's dweight and dbias add the programs' partial sums (64 merged rows each under the
    interpreter, 16 on a GPU) in fp32: fp16 tokens whose second 64 merged rows repeat the first,
    with dn negated there and 0.3 added to one row, leave partial sums of +-16 to +-150 that cancel
    to ~0.3 * xhat (dweight) and ~0.3 (dbias); partials rounded to 16 bits (ulp 1/64 at 16, 1/8 at
    150) would be off by several percent."""
    g = torch.Generator().manual_seed(9)
    first = randn(1, 256, 4, dtype=torch.float16, generator=g)  # 64 merged rows of 2 x 2 tokens ("block" order)
    x = torch.cat([first, first], 1)
    dn_first = randn(64, 16, dtype=torch.float16, generator=g).abs() + 1.5
    dn = torch.cat([dn_first, -dn_first])
    dn[64] += 0.3
    with deco_ops.use_backend("triton"), poisoned_empty():
        stats = merge_norm.merge_norm_stats(x, 2, "block", (1, 1, 1), None, None, "layernorm", False, 1e-6)
        _, _, dwn, dbn = merge_norm.merge_norm_backward(x, stats, None, None, dn, 2, "block", (1, 1, 1), None, None,
                                                        "layernorm", False, False, None, True, True)
    rows = x.double().reshape(128, 16)
    xhat = (rows - rows.mean(1, keepdim=True)) / torch.sqrt(rows.var(1, unbiased=False, keepdim=True) + 1e-6)
    eps = torch.finfo(torch.float16).eps
    assert_close(dwn, (dn.double() * xhat).sum(0), torch.float16, "dweight", tol=eps)
    assert_close(dbn, dn.double().sum(0), torch.float16, "dbias", tol=eps)


def test_eps_zero_is_a_norm_without_epsilon():
    """eps = 0 is a valid norm epsilon (``nn.LayerNorm(eps=0)``; merge_mlp takes any finite eps >= 0)."""
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    with deco_ops.use_backend("torch"):
        _check(params, dy, torch.float32, eps=0.0)


def test_two_dimensional_tokens_are_one_sequence():
    """Qwen's merger input: the (N, C) token sequence, merged rows (N/4, out)."""
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    with deco_ops.use_backend("triton"):
        y2 = deco_ops.merge_mlp(params[0][0], *params[1:])
        y3 = deco_ops.merge_mlp(*params)
    assert y2.shape == (4, 8) and torch.equal(y2, y3[0])


def test_packed_defaults_are_qwen2_vl_patch_merger():
    """Called without keywords, merge_mlp_packed is Qwen2-VL's PatchMerger, as merge_mlp is: 2x2 blocks of
    consecutive tokens (``order="block"``), a pre-merge LayerNorm of eps 1e-6, erf GELU. Tokens of spread
    1e-3 (a variance the size of eps, so another default eps shows); one 4x4 image, whose grid order
    would merge other tokens."""
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    params[0] = params[0] * 1e-3
    with poisoned_empty():
        y, cu = deco_ops.merge_mlp_packed(params[0][0], torch.tensor([[4, 4]]), *params[1:])
    kw = dict(merge_size=2, order="block", norm="layernorm", norm_position="pre", eps=1e-6, activation="gelu")
    y64 = eager_merge_mlp(*(None if p is None else p.double() for p in params), **kw)[0]
    assert cu.tolist() == [0, 4]
    assert_close(y, y64, torch.float32, "y", eager=eager_merge_mlp(*params, **kw)[0])


@pytest.mark.parametrize("position", ["pre", "post"])
def test_rmsnorm_squares_16_bit_tokens_in_float32(backend, position):
    """Qwen2.5-VL's RMSNorm squares the tokens in float32: fp16 tokens of a few hundred (squares past
    65504) are normalised, not zeroed by an inf mean square, forward and backward (whose statistics
    are recomputed from the tokens), on the kernels and the PyTorch path."""
    params, dy = _case(torch.float16, B=1, N=16, C=8, hidden=16, out=8, norm="rmsnorm", norm_position=position)
    params[0] = params[0] * 200
    # the dtype's bound alone: this file's eager sequence squares in the tokens' dtype, so its own error is ~1
    _check(params, dy, torch.float16, eager_bound=False, norm="rmsnorm", norm_position=position)


@given(
    dtype=dtypes, batch=st.integers(0, 3), merge_size=st.integers(1, 3), blocks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    frames=st.integers(1, 2), C=st.integers(1, 40), hidden=st.integers(1, 48), out=st.integers(1, 40),
    order=st.sampled_from(["block", "grid"]), norm=st.sampled_from(["layernorm", "rmsnorm"]),
    position=st.sampled_from(["pre", "post"]),
)
@examples(5)
def test_fuzzed(dtype, batch, merge_size, blocks, frames, C, hidden, out, order, norm, position):
    grid = (frames, blocks[0] * merge_size, blocks[1] * merge_size)
    params, dy = _case(dtype, B=batch, N=math.prod(grid), C=C, hidden=hidden, out=out, merge_size=merge_size,
                       norm=norm, norm_position=position, seed=C)
    if batch == 0:
        with deco_ops.use_backend("triton"):
            y = deco_ops.merge_mlp(*params, grid=grid if order == "grid" else None, merge_size=merge_size, order=order,
                                   norm=norm, norm_position=position)
        assert y.shape == (0, math.prod(grid) // merge_size**2, out)
        return
    with deco_ops.use_backend("triton"):
        _check(params, dy, dtype, grid=grid if order == "grid" else None, merge_size=merge_size, order=order, norm=norm,
               norm_position=position)


@pytest.mark.parametrize("order,norm,position", MATRIX)
def test_no_tokens_forward_and_backward(backend, order, norm, position):
    """A batch of no images (B = 0, and Qwen's flat (0, C) tokens): no output rows, and a backward
    that gives an empty token gradient and zero parameter gradients (a sum over no rows), as eager
    PyTorch's Qwen mergers do (the PyTorch path's norm backward viewed its rows with a -1 that
    0 elements cannot give; InternVL's own pixel_shuffle has the same trouble at B = 0)."""
    params, _ = _case(torch.float32, B=0, norm=norm, norm_position=position)
    C, out = params[0].shape[-1], params[5].shape[0]
    kw = dict(grid=(4, 6), order=order) if order == "grid" else {}
    flat = [params[0].reshape(0, C)] if order == "block" else []
    for x in [params[0], *flat]:
        leaves = [leaf(p) for p in (x, *params[1:])]
        y = deco_ops.merge_mlp(*leaves, norm=norm, norm_position=position, eps=1e-5, **kw)
        assert y.shape == ((0, 6, out) if x.dim() == 3 else (0, out))
        y.sum().backward()
        for name, t in zip(NAMES, leaves):
            if t is not None:
                assert t.grad.shape == t.shape and not t.grad.any(), name


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("order,norm,position", MATRIX)
def test_no_channels_forward_and_backward(backend, order, norm, position, packed):
    """C = 0 tokens: the first layer has no inputs, so every row is W2 gelu(b1) + b2, and only b1,
    W2 and b2 get nonzero gradients (the PyTorch path's merged rows were shaped with a -1 that
    0 elements cannot give, dense and packed)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(1)
    params = [randn(2, 24, 0, dtype=dtype, generator=g), randn(0, dtype=dtype, generator=g),
              randn(0, dtype=dtype, generator=g) if norm == "layernorm" else None, randn(40, 0, dtype=dtype, generator=g),
              randn(40, dtype=dtype, generator=g), randn(24, 40, dtype=dtype, generator=g) * 0.2,
              randn(24, dtype=dtype, generator=g)]
    dy = randn(2, 6, 24, dtype=dtype, generator=g)
    leaves = [leaf(p) for p in params]
    x, nw, nb, w1, b1, w2, b2 = leaves
    if packed:
        grids = torch.tensor([[1, 4, 6]] * x.shape[0])
        y = deco_ops.merge_mlp_packed(x.reshape(48, 0), grids, *leaves[1:], norm=norm, norm_position=position,
                                      order=order)[0]
    else:
        kw = dict(grid=(4, 6), order=order) if order == "grid" else {}
        y = deco_ops.merge_mlp(*leaves, norm=norm, norm_position=position, **kw)
    row = torch.nn.functional.linear(torch.nn.functional.gelu(b1.detach()), w2.detach(), b2.detach())
    torch.testing.assert_close(y.reshape(-1, row.shape[0]), row.expand(y.numel() // row.shape[0], -1))
    y.backward(dy.reshape(y.shape))
    rows = dy.reshape(-1, dy.shape[-1])
    d_hidden = rows.sum(0) @ w2.detach() * torch.func.grad(lambda t: torch.nn.functional.gelu(t).sum())(b1.detach())
    torch.testing.assert_close(b1.grad, d_hidden)
    torch.testing.assert_close(b2.grad, rows.sum(0))
    assert x.grad.shape == x.shape and w1.grad.shape == w1.shape
    assert all(not t.grad.any() for t in (nw, nb) if t is not None)


# ----------------------------------------------------------------------------------------------
# plain eager calls that autograd does not record: the composed twin's ATen ops, planned


def _planned_and_full(params, dy, requires, grad_mode=True, **kw):
    """(y, grads) of a planned call (``merge_reference.forward_of`` where autograd records nothing)
    and of the full path (``torch.ops.deco.merge_mlp``, the path the plan replaced) on the PyTorch
    backend, from guard-banded (strided) inputs."""
    runs = []
    for full in (False, True):
        leaves = [None if p is None else guarded(p).requires_grad_(n in requires) for n, p in zip(NAMES, params)]
        with deco_ops.use_backend("torch"), torch.set_grad_enabled(grad_mode), (
                _plan.unplanned() if full else contextlib.nullcontext()):
            y = deco_ops.merge_mlp(*leaves, **kw)
        if y.requires_grad:
            y.backward(dy.view_as(y))
        runs.append((y.detach(), [None if t is None else t.grad for t in leaves]))
    return runs


REQUIRES = [set(), set(NAMES), {"x"}, {"norm_weight", "norm_bias", "w1"}, {"w2", "b2"}, {"x", "b1"}]


@pytest.mark.parametrize("order,norm,position,affine", [(*m, a) for m in MATRIX for a in (True, False)])
def test_planned_calls_give_the_full_paths_bits(order, norm, position, affine):
    """On the PyTorch backend, inference (nothing requires grad, or grad mode off) runs
    ``forward_of``'s function, a call autograd records the op's Function: both give the bits of
    the path they replaced, forward and every gradient asked for, and the norm's composed backward
    (ATen's for LayerNorm) is right for each subset of gradients."""
    params, dy = _case(torch.float32, B=2, N=16, C=8, hidden=16, out=8, norm=norm, norm_position=position,
                       bias=(affine, affine, True, affine), seed=len(order + norm + position) + affine)
    kw = dict(grid=(4, 4) if order == "grid" else None, order=order, norm=norm, norm_position=position, eps=1e-5)
    for requires, grad_mode in [(r, True) for r in REQUIRES] + [(set(NAMES), False)]:
        (y, grads), (y_full, grads_full) = _planned_and_full(params, dy, requires, grad_mode, **kw)
        assert torch.equal(y, y_full), (requires, grad_mode)
        for name, got, want in zip(NAMES, grads, grads_full):
            assert (got is None) == (want is None), name
            assert got is None or torch.equal(got, want), f"grad {name} ({sorted(requires)})"
        with deco_ops.use_backend("torch"):  # and right: each subset of gradients against float64
            _check(params, dy, torch.float32, requires if grad_mode else set(), **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("order,norm,position", [("block", "rmsnorm", "pre"), ("grid", "layernorm", "pre"), ("grid", "rmsnorm", "post")])
def test_planned_inference_keeps_the_forward_bits(dtype, order, norm, position):
    """16-bit tokens, 2D (N, C), transposed and empty batches, and the composed strategy on the
    Triton backend: the planned inference equals the full path bit for bit."""
    params, dy = _case(dtype, B=1, N=16, C=8, hidden=16, out=8, norm=norm, norm_position=position)
    kw = dict(grid=(4, 4) if order == "grid" else None, order=order, norm=norm, norm_position=position)
    (y, _), (y_full, _) = _planned_and_full(params, dy, set(), **kw)
    assert torch.equal(y, y_full)
    x = params[0][0]
    for backend, name in (("torch", "auto"), ("triton", "composed")):
        with deco_ops.use_backend(backend), deco_ops.use_strategy(name):
            for tokens in (x, x.t().contiguous().t(), params[0][:0]):
                got = deco_ops.merge_mlp(tokens, *params[1:], **kw)
                with _plan.unplanned():
                    want = deco_ops.merge_mlp(tokens, *params[1:], **kw)
                assert got.shape == want.shape and torch.equal(got, want)
                assert tokens.shape[0] == 0 or torch.equal(got, y[0])


# ----------------------------------------------------------------------------------------------
# packed batches


GRIDS = torch.tensor([[4, 6], [2, 2], [6, 4], [8, 2]])


def test_packed_video_grids():
    grids = torch.tensor([[2, 4, 6], [1, 2, 6]])  # frames with H != W: a frame's offset is H * W rows
    params, _ = _case(torch.float32, B=1, N=60, C=8, hidden=16, out=8)
    with deco_ops.use_backend("triton"):
        y, cu = deco_ops.merge_mlp_packed(params[0][0], grids, *params[1:], order="grid")
        first = deco_ops.merge_mlp(params[0][:, :48], *params[1:], grid=(2, 4, 6), order="grid")[0]
    assert cu.tolist() == [0, 12, 15]
    with deco_ops.use_backend("torch"):
        want = deco_ops.merge_mlp(params[0][:, :48], *params[1:], grid=(2, 4, 6), order="grid")[0]
    assert_close(first, want, torch.float32)
    assert_close(y[:12], first, torch.float32)


VIDEO_GRIDS = torch.tensor([[2, 4, 6], [1, 2, 2], [1, 6, 4]])  # a video (T = 2, H != W) before two images


def _check_packed(params, dy, grids, requires=frozenset(NAMES), order="grid", **kw):
    """``merge_mlp_packed`` on guard-banded inputs with NaN-poisoned outputs vs float64 eager run per
    image (``eager_merge_mlp``); ``params[0]``: the (total, C) packed tokens, ``dy``: (total / S²,
    out); only the inputs named in ``requires`` require grad."""
    leaves = [None if p is None else leaf(guarded_strided(p)).requires_grad_(n in requires) for n, p in zip(NAMES, params)]
    with poisoned_empty():
        y, cu = deco_ops.merge_mlp_packed(leaves[0], grids, *leaves[1:], order=order, **kw)
        y.backward(guarded(dy))
    sizes = grids.prod(1).tolist()
    runs = []
    for dtype in (torch.float64, None):
        ref = [leaf(p, dtype) for p in params]
        parts = [eager_merge_mlp(xi[None], *ref[1:], grid=tuple(g), order=order, **kw)[0]
                 for g, xi in zip(grids.tolist(), torch.split(ref[0], sizes))]
        out = torch.cat(parts)
        out.backward(dy.to(out.dtype))
        runs.append((out, ref))
    (y64, ref), (y_same, same) = runs
    assert cu.tolist() == [0, *itertools.accumulate(s // 4 for s in sizes)]
    assert_close(y, y64, torch.float32, "y", eager=y_same)
    for name, got, want, base in zip(NAMES, leaves, ref, same):
        if got is not None and name in requires:
            assert_close(got.grad, want.grad, torch.float32, f"grad {name}", eager=base.grad)
        elif got is not None:
            assert got.grad is None, name


@pytest.mark.parametrize("order,position", [("block", "pre"), ("grid", "post")])
def test_packed_equals_a_loop_over_images(backend, order, position):
    """One launch per stage for images of different grids (Qwen2-VL's grid_thw batches in block
    order; row-major grids) == float64 eager run per image, forward and every gradient, on the
    kernels and on the composed path (each image's tokens and gradients at its own offset)."""
    params, dy = _case(torch.float32, B=1, N=int(GRIDS.prod(1).sum()), C=8, hidden=16, out=8, norm_position=position)
    _check_packed([params[0][0], *params[1:]], dy[0], GRIDS, order=order, norm_position=position)


@pytest.mark.parametrize("norm,position", [("layernorm", "pre"), ("rmsnorm", "pre"), ("rmsnorm", "post")])
def test_packed_video_and_images_match_float64(backend, norm, position):
    """A packed grid-order batch of a video (two frames, H != W) and two images, under a pre-merge
    LayerNorm or RMSNorm and a post-merge RMSNorm: output and every gradient against float64 eager
    run per image, on the kernels and on the composed path, whose per-image merge and un-merge
    (of the tokens, the norm's statistics, its output for dW1 and dx) walk the geometry table, each
    image's T frames included."""
    N = int(VIDEO_GRIDS.prod(1).sum())
    params, dy = _case(torch.float32, B=1, N=N, C=8, hidden=16, out=8, norm=norm, norm_position=position, seed=3)
    _check_packed([params[0][0], *params[1:]], dy[0], VIDEO_GRIDS, norm=norm, norm_position=position, eps=1e-5)


def test_packed_tokens_alone_require_grad():
    """Trainable tokens under a frozen norm and MLP (a tower trained through a frozen projector):
    the packed op still keeps what its backward needs, and dx is right."""
    grids = torch.tensor([[4, 4], [2, 4]])
    params, dy = _case(torch.float32, B=1, N=24, C=8, hidden=16, out=8)
    with deco_ops.use_backend("triton"):
        _check_packed([params[0][0], *params[1:]], dy[0], grids, requires={"x"})


def test_packed_plans_are_keyed_on_the_grids_values():
    """Two packed layouts of the same grids shape and token count take their own plans: each
    call's output and cu_seqlens are those of the full (unplanned) path for its own grids."""
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    x = params[0][0]
    for grids in ([[2, 4], [4, 2]], [[4, 2], [2, 4]], [[2, 4], [4, 2]]):
        with _plan.unplanned():
            want, want_cu = deco_ops.merge_mlp_packed(x, torch.tensor(grids), *params[1:], order="grid")
        for _ in range(2):  # the first call builds the plan, the second runs it
            y, cu = deco_ops.merge_mlp_packed(x, torch.tensor(grids), *params[1:], order="grid")
            assert torch.equal(y, want) and cu.tolist() == want_cu.tolist() == [0, 2, 4]


# ----------------------------------------------------------------------------------------------
# launches, residuals, registration


def _spy(kernels):
    spies = [mock.patch.object(k, "run", wraps=k.run) for k in kernels]
    return spies, [s.start() for s in spies]


@pytest.mark.parametrize("frozen", [False, True])
def test_kernel_launches(frozen):
    """Forward: the statistics pre-pass and the fused GEMM; backward: gemm_act_grad, the
    statistics pre-pass again (they are recomputed, not saved) and the norm backward. A frozen
    tower, norm and first Linear: no statistics and no norm backward in backward."""
    params, dy = _case(torch.float16, B=1, N=16, C=8, hidden=16, out=8)
    leaves = [leaf(p) for p in params]
    if frozen:
        for t in leaves[:4]:
            t.requires_grad_(False)
    with deco_ops.use_backend("triton"), mock.patch.multiple(
            "deco_ops.merge_reference", composed_forward=mock.DEFAULT, rms_norm_stats=mock.DEFAULT, rms_norm_backward=mock.DEFAULT,
            layer_norm_backward=mock.DEFAULT):
        spies, mocks = _spy(KERNELS)
        try:
            deco_ops.merge_mlp(*leaves).backward(dy)
        finally:
            for s in spies:
                s.stop()
    assert [m.call_count for m in mocks] == [1 if frozen else 2, 1, 1, 0 if frozen else 1]
    assert leaves[5].grad is not None


@pytest.mark.parametrize("packed", [False, True])
def test_composed_strategy_runs_the_hf_sequence(packed):
    """``use_strategy("composed")`` on the Triton backend, and the PyTorch backend whatever the
    strategy: no kernel launches, the same outputs and gradients as the fused kernels (either
    backward follows either forward)."""
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8, norm_position="post")
    results = []
    for name, backend in (("fused", "triton"), ("composed", "triton"), ("fused", "torch")):
        leaves = [leaf(p) for p in params]
        with deco_ops.use_backend(backend), deco_ops.use_strategy(name):
            spies, mocks = _spy(KERNELS[:2] + KERNELS[3:])
            try:
                if packed:
                    y = deco_ops.merge_mlp_packed(leaves[0][0], torch.tensor([[4, 4]]), *leaves[1:], order="grid", norm_position="post")[0]
                else:
                    y = deco_ops.merge_mlp(*leaves, grid=(4, 4), order="grid", norm_position="post")
                y.backward(dy.view_as(y))
            finally:
                for s in spies:
                    s.stop()
        assert [m.call_count for m in mocks] == ([2, 1, 1] if backend == "triton" and name == "fused" else [0, 0, 0])
        results.append([y, *(t.grad for t in leaves)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_close(a, b, torch.float32)


def test_frozen_tokens_and_first_layer_save_no_tokens():
    """x is kept for backward only when a gradient needs it (x, the norm's parameters, w1)."""
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    x = params[0]
    saved = []
    leaves = [leaf(p) for p in params]
    for t in leaves[:4]:
        t.requires_grad_(False)
    with deco_ops.use_backend("triton"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        deco_ops.merge_mlp(x, *leaves[1:])
    assert saved and not any(t.data_ptr() == x.data_ptr() for t in saved)


@pytest.mark.parametrize("strategy", ["fused", "composed"])
def test_gradient_of_the_pre_activation_output_joins_db1(strategy):
    """deco::merge_mlp's residual output, the pre-activation, is differentiable too (anyone calling
    ``torch.ops.deco`` directly may put a loss on it): its gradient joins dz after the activation
    backward, so db1 is summed from the total, not taken from the pass, and every gradient below
    the activation sees it; against float64 eager."""
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    dpre = randn(4, 16, generator=torch.Generator().manual_seed(9))
    leaves = [leaf(p) for p in params]
    with deco_ops.use_backend("triton"), deco_ops.use_strategy(strategy), poisoned_empty():
        y, pre = torch.ops.deco.merge_mlp(*leaves, None, [], 2, "block", "layernorm", True, 1e-6, "gelu", True)
        ((y * dy).sum() + (pre * dpre).sum()).backward()
    ref = [leaf(p, torch.float64) for p in params]
    y64, pre64 = eager_merge_mlp(*ref, with_pre=True)
    ((y64 * dy.double()).sum() + (pre64[0] * dpre.double()).sum()).backward()
    for name, got, want in zip(NAMES, leaves, ref):
        assert_close(got.grad, want.grad, torch.float32, f"grad {name}")


def test_inference_keeps_no_residuals():
    params, _ = _case(torch.float32)
    with torch.no_grad(), deco_ops.use_backend("triton"):
        y, pre = torch.ops.deco.merge_mlp(*params, None, [], 2, "block", "layernorm", True, 1e-6, "gelu", False)
    assert pre.numel() == 0 and y.shape == (2, 6, 24)



def _one_expression_eager(x, nw, nb, w1, b1, w2, b2, grid, order):
    """The eager code a merger replaces, as a user writes it (temporaries in one expression):
    Qwen2-VL's (LayerNorm per token, ``view(-1, 4C)``) or InternVL's (pixel_shuffle, LayerNorm
    over 4C), then Linear, GELU, Linear."""
    B, N, C = x.shape
    if order == "block":
        return F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), nw, nb, 1e-6).view(-1, 4 * C), w1, b1)), w2, b2)
    H, W = grid
    shuffled = x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(2, 3)
    return F.linear(F.gelu(F.linear(F.layer_norm(shuffled.reshape(-1, 4 * C), (4 * C,), nw, nb, 1e-6), w1, b1)), w2, b2)


@pytest.mark.parametrize("op", ["merge_mlp", "merge_mlp_grid", "merge_mlp_packed"])
def test_inference_peak_memory_is_no_more_than_eagers(auto_backend, op, capsys):
    """Inference (no grad) holds no more memory at its peak than the eager code the op replaces:
    each intermediate is freed once the next step has read it. Before 2026-12-07 the planned call
    (``merge_reference.forward_of``) held the norm's rows in a local through the activation and
    the second Linear (one (M, S*S*C) buffer more: 1.25x eager's peak here, 1.5x at Qwen2-VL-7B's
    widths, 1024 tokens fp32: 15 MiB against 10); ``merge_mlp_packed``'s composed twin
    (``merge_reference.composed_forward``) held the rows and the pre-activation to the end (1.5x
    here, 1.85x at Qwen2-VL-7B's widths: 18.5 MiB against 10)."""
    g = torch.Generator().manual_seed(12)
    C, hidden, out, grid = 64, 512, 256, (32, 32)
    order = "grid" if op == "merge_mlp_grid" else "block"
    x = randn(1, math.prod(grid), C, generator=g) * 1.5 + 0.5
    width = C if order == "block" else 4 * C
    nw, nb = randn(width, generator=g) * 0.5 + 1, randn(width, generator=g) * 0.3
    w1, b1 = randn(hidden, 4 * C, scale=(4 * C) ** -0.5, generator=g), randn(hidden, generator=g)
    w2, b2 = randn(out, hidden, scale=hidden ** -0.5, generator=g), randn(out, generator=g)
    kw = {} if order == "block" else {"grid": grid, "order": "grid", "norm_position": "post", "eps": 1e-6}

    def ours():
        if op == "merge_mlp_packed":  # one image's tokens, packed as Qwen2-VL packs them
            return deco_ops.merge_mlp_packed(x[0], torch.tensor([[1, *grid]]), nw, nb, w1, b1, w2, b2)[0]
        return deco_ops.merge_mlp(x, nw, nb, w1, b1, w2, b2, **kw)

    def eager():
        return _one_expression_eager(x, nw, nb, w1, b1, w2, b2, grid, order)

    with torch.no_grad():
        torch.testing.assert_close(ours().reshape(-1, out), eager(), rtol=1e-4, atol=1e-4)
        ours_peak, eager_peak = peak_bytes(ours), peak_bytes(eager)
    with capsys.disabled():
        print(f"\n{op} inference peak: ours {ours_peak / 2**10:.0f} KiB, eager {eager_peak / 2**10:.0f} KiB")
    rows_buffer = math.prod(grid) // 4 * 4 * C * 4
    assert ours_peak <= eager_peak + rows_buffer // 8, (ours_peak, eager_peak)


@pytest.mark.parametrize("tokens_require_grad", [False, True])
def test_training_peak_memory_is_no_more_than_eagers(auto_backend, tokens_require_grad, capsys):
    """Forward and backward of Qwen2-VL's merger on its (N, C) tokens, gradients unset before: no
    more at the peak than eager's. The backward frees the activation once dW2 has read it and
    ``dz @ W1`` once the norm's backward has, and a 2-D call returns its one batch row through
    ``squeeze(0)`` (``y[0]``'s backward filled a zero buffer of the output's size and held it).
    Before 2026-12-07, at these widths: 1.40x eager's peak (3588 KiB against 2569). With tokens
    requiring grad one hidden-sized buffer more is allowed: the pre-activation, saved by the op's
    one autograd node until its backward returns (eager frees it after GELU's backward)."""
    g = torch.Generator().manual_seed(14)
    C, hidden, out, tokens = 64, 512, 256, 1024
    x = (randn(tokens, C, generator=g) * 1.5 + 0.5).requires_grad_(tokens_require_grad)
    params = [randn(C, generator=g) * 0.5 + 1, randn(C, generator=g) * 0.3,
              randn(hidden, 4 * C, scale=(4 * C) ** -0.5, generator=g), randn(hidden, generator=g),
              randn(out, hidden, scale=hidden ** -0.5, generator=g), randn(out, generator=g)]
    params = [p.requires_grad_() for p in params]
    dy = randn(tokens // 4, out, generator=g)

    ours = training_step(lambda: deco_ops.merge_mlp(x, *params), dy, (x, *params))
    eager = training_step(lambda: _one_expression_eager(x[None], *params, None, "block"), dy, (x, *params))
    ours_peak, eager_peak = peak_bytes(ours), peak_bytes(eager)
    with capsys.disabled():
        print(f"\nmerge_mlp forward+backward peak (tokens require grad: {tokens_require_grad}): "
              f"ours {ours_peak / 2**10:.0f} KiB, eager {eager_peak / 2**10:.0f} KiB")
    hidden_buffer = tokens // 4 * hidden * 4
    allowance = hidden_buffer if tokens_require_grad else hidden_buffer // 8
    assert ours_peak <= eager_peak + allowance, (ours_peak / hidden_buffer, eager_peak / hidden_buffer)


def test_backward_without_the_residual_is_refused():
    """The raw op run without its residual (``keep_residuals=False``: merge_mlp passes it only where
    autograd records nothing) and then differentiated: refused by name, not a shape error inside
    the activation backward."""
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    leaves = [leaf(p) for p in params]
    y, pre = torch.ops.deco.merge_mlp(*leaves, None, [], 2, "block", "layernorm", True, 1e-6, "gelu", False)
    assert pre.numel() == 0
    with pytest.raises(RuntimeError, match="deco::merge_mlp ran with keep_residuals=False; call deco_ops.merge_mlp"):
        y.sum().backward()


def test_opcheck():
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    leaves = [leaf(p) for p in params]
    with deco_ops.use_backend("triton"):
        torch.library.opcheck(torch.ops.deco.merge_mlp, (*leaves, None, [1, 4, 4], 2, "grid", "layernorm", True, 1e-5, "gelu", True))


def test_offsets_past_2_31_elements():
    """Token rows 2**27+1 elements apart: token index x stride passes 2**31 within 32 tokens; the
    stats pre-pass, the fused GEMM and the norm backward all read the tokens by their strides."""
    C, stride = 8, 2**27 + 1
    x = torch.empty(31 * stride + C, dtype=torch.float16).as_strided((1, 32, C), (32 * stride, stride, 1))
    x.copy_(randn(1, 32, C, dtype=torch.float16))
    params, _ = _case(torch.float16, B=1, N=32, C=C, hidden=16, out=8)
    results = []
    with deco_ops.use_backend("triton"):
        for tokens in (x, x.contiguous()):
            leaves = [tokens.detach().requires_grad_(True), *(leaf(p) for p in params[1:])]
            y = deco_ops.merge_mlp(*leaves, grid=(4, 8), order="grid")
            results.append([y, *torch.autograd.grad(y, leaves[:4], torch.ones_like(y))])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ----------------------------------------------------------------------------------------------
# errors


def _good():
    params, _ = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    return dict(zip(NAMES, params))


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"x": torch.randn(16)}, ValueError, "x must have 2 .* or 3"),
        ({"x": torch.randn(1, 18, 8)}, ValueError, "not a multiple of merge_size"),
        ({"merge_size": 0}, ValueError, "merge_size must be a positive int"),
        ({"order": "pixel_shuffle"}, ValueError, "order must be one of"),
        ({"order": "grid"}, ValueError, "order='grid' needs grid"),
        ({"grid": (4, 4)}, ValueError, "grid is only used with order='grid'"),
        ({"order": "grid", "grid": (4, 5)}, ValueError, "x has 16 tokens but grid"),
        ({"order": "grid", "grid": (1, 16)}, ValueError, "multiples of merge_size"),
        ({"order": "grid", "grid": (16, 1)}, ValueError, r"grid \(16, 1\): H and W must be multiples of merge_size"),
        ({"norm": "batchnorm"}, ValueError, "norm must be one of"),
        ({"norm_position": "middle"}, ValueError, "norm_position must be one of"),
        ({"norm_weight": torch.randn(32)}, ValueError, "norm_weight has shape .* pre-merge norm spans x.shape"),
        ({"norm_position": "post"}, ValueError, "norm_weight has shape .* post-merge norm spans merge_size"),
        ({"norm": "rmsnorm"}, ValueError, "norm_bias must be None for norm='rmsnorm'"),
        ({"eps": -1.0}, ValueError, "eps must be a finite float >= 0"),
        ({"w1": torch.randn(16, 8)}, ValueError, r"w1 has shape \(16, 8\): its in_features 8 must equal merge_size\*\*2"),
        ({"b2": torch.randn(9)}, ValueError, "b2 has shape"),
        ({"w2": torch.randn(8, 12)}, ValueError, r"w2 has shape \(8, 12\): its in_features 12 must equal w1.shape\[0\]"),
        ({"norm_bias": torch.randn(8, dtype=torch.float16)}, TypeError, "norm_bias has dtype"),
        ({"norm_weight": torch.randn(8, dtype=torch.float16)}, TypeError, "norm_weight has dtype torch.float16 but x has"),
        ({"b1": torch.randn(16, dtype=torch.float16)}, TypeError, "b1 has dtype torch.float16 but w1 has torch.float32"),
        ({"b2": torch.randn(8, dtype=torch.float16)}, TypeError, "b2 has dtype torch.float16 but w1 has torch.float32"),
        ({"x": torch.randn(1, 16, 8, dtype=torch.float16), "norm_weight": torch.randn(8, dtype=torch.float16),
          "norm_bias": torch.randn(8, dtype=torch.float16)}, TypeError,
         "w1 has dtype torch.float32 but x has torch.float16; merge_mlp takes one dtype, or float32 tokens and norm with a"),
        ({"x": torch.randn(1, 16, 8, dtype=torch.float16), "norm_weight": torch.randn(8, dtype=torch.float16),
          "norm_bias": torch.randn(8, dtype=torch.float16), "w1": torch.randn(16, 32, dtype=torch.bfloat16),
          "b1": torch.randn(16, dtype=torch.bfloat16), "w2": torch.randn(8, 16, dtype=torch.bfloat16),
          "b2": torch.randn(8, dtype=torch.bfloat16)}, TypeError,
         "w1 has dtype torch.bfloat16 but x has torch.float16"),  # 16-bit tokens take an MLP of their own dtype only
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"norm_weight": [1.0] * 8}, TypeError, "norm_weight must be a torch.Tensor"),
        ({"w1": torch.randn(16, 32, device="meta")}, ValueError, "w1 is on meta"),
    ],
)
def test_bad_input(change, error, match):
    args = _good() | change
    tensors = [args.pop(n) for n in NAMES]
    with deco_ops.use_backend("triton"), mock.patch.object(merge_gemm.merge_gemm_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.merge_mlp(*tensors, **args)
    launch.assert_not_called()


@pytest.mark.parametrize(
    "grids,kw,error,match",
    [
        (torch.tensor([[4, 4], [2, 3]]), {}, ValueError, r"grids\[1\] = \(2, 3\): H and W must be multiples"),
        (torch.tensor([[3, 4], [2, 4]]), {}, ValueError, r"grids\[0\] = \(3, 4\): H and W must be multiples"),
        (torch.tensor([[4, 4]]), {}, ValueError, "x has 20 tokens but grids need"),
        (torch.tensor([[4, 4], [2, 4]]), {}, ValueError, r"x has 20 tokens but grids need sum\(prod\(grids\)\) = 24"),
        (torch.tensor([[4, 4]]), {"x": torch.randn(16, 1, 8)}, ValueError, r"x must have 2 dimensions, got shape \(16, 1, 8\)"),
        (torch.tensor([[4.0, 5.0]]), {}, TypeError, "grids must be an integer tensor"),
        (torch.tensor([[4, 4], [2, 2]]), {"order": "rows"}, ValueError, "order must be one of"),
    ],
)
def test_bad_packed_input(grids, kw, error, match):
    p = _good()
    kw = dict(kw)
    x = kw.pop("x", torch.randn(20, 8))
    with deco_ops.use_backend("triton"), mock.patch.object(merge_gemm.merge_gemm_kernel, "run") as launch:
        with pytest.raises(error, match=match):
            deco_ops.merge_mlp_packed(x, grids, *(p[n] for n in NAMES[1:]), **kw)
    launch.assert_not_called()


@pytest.mark.parametrize("order,norm,position", MATRIX)
def test_autocast_norm_runs_in_float32_as_eager(backend, order, norm, position):
    """Inside ``torch.autocast`` the norm runs in float32 from the float32 tokens, as autocast runs
    ``F.layer_norm`` (and Qwen2.5-VL's RMSNorm upcasts), and only the Linears in the autocast dtype:
    tokens with a ViT-like mean of 50 keep their low bits. Output and every gradient within eager's
    own error under the same autocast (tightened: a norm of fp16-cast tokens is 10-60x that)."""
    params, dy = _case(torch.float32, B=2, N=16, C=16, hidden=32, out=16, norm=norm, norm_position=position)
    params[0] = params[0] + 50.0
    kw = dict(grid=(4, 4), order=order, norm=norm, norm_position=position, eps=1e-5) if order == "grid" else dict(
        norm=norm, norm_position=position, eps=1e-5)
    leaves, eager = ([leaf(p) for p in params] for _ in range(2))
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = deco_ops.merge_mlp(*(guarded(t) if t is not None else None for t in leaves), **kw)
        y_eager = eager_merge_mlp(*eager, **kw)
    ref = [leaf(p, torch.float64) for p in params]
    y64 = eager_merge_mlp(*ref, **kw)
    assert y.dtype == y_eager.dtype == torch.float16
    assert_close(y, y64, torch.float16, "y", eager=y_eager, tighten=True)
    for out, grads in ((y, leaves), (y_eager, eager), (y64, ref)):
        out.backward(dy.to(out.dtype))
    for name, got, want, base in zip(NAMES, leaves, ref, eager):
        if got is not None:
            assert got.grad.dtype == torch.float32, name
            assert_close(got.grad, want.grad, torch.float16, f"grad {name}", eager=base.grad, tighten=True)


@pytest.mark.parametrize("tokens", [torch.float32, torch.float16])
def test_autocast_norm_from_16_bit_tokens_and_through_the_dispatcher(backend, tokens):
    """Under autocast the norm runs in float32 with float32 weights from float32 tokens or tokens
    already in the region's dtype (a vision tower run under it), also where the call is not plain
    (a dispatch mode around it: the op's autocast kernel casts the norm's weight and bias with the
    tokens): within eager's error of float64, and the two paths give the same output."""
    from torch.utils.flop_counter import FlopCounterMode

    params, _ = _case(torch.float32, B=2, N=16, C=16, hidden=32, out=16)
    params[0] = (params[0] + 50.0).to(tokens)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = deco_ops.merge_mlp(*params, eps=1e-5)
        with FlopCounterMode(display=False):
            y_mode = deco_ops.merge_mlp(*params, eps=1e-5)
        y_eager = eager_merge_mlp(*params, eps=1e-5)
    y64 = eager_merge_mlp(*(None if p is None else p.double() for p in params), eps=1e-5)
    assert y.dtype == y_mode.dtype == torch.float16
    assert_close(y, y64, torch.float16, "y", eager=y_eager, tighten=True)
    assert torch.equal(y_mode, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_norm_before_a_16_bit_mlp(backend, dtype):
    """What autocast runs, called directly: float32 tokens and norm, 16-bit Linears; the norm's
    rows are rounded to the MLP's dtype once, the output is in it, each gradient in its input's
    dtype. Against float64 within eager's error (the same sequence with the rows cast)."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bf16 tl.dot: the interpreter's bf16 dots are not the GPU's")
    params, dy = _case(torch.float32, B=2, N=16, C=16, hidden=32, out=16)
    params = [p if i < 3 else p.to(dtype) for i, p in enumerate(params)]
    _check(params, dy.to(dtype), dtype, eps=1e-5)
    with torch.no_grad():  # inference: a planned call (the composed twin's ATen ops) casts the rows too
        planned = deco_ops.merge_mlp(*params, eps=1e-5)
        with _plan.unplanned():
            full = deco_ops.merge_mlp(*params, eps=1e-5)
    assert planned.dtype == dtype and torch.equal(planned, full)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_tokens_through_a_norm_kept_in_float32(backend, dtype, norm):
    """16-bit tokens and Linears with the norm's parameters kept in float32 (Hugging Face's
    ``keep_in_fp32_modules``, a mixed-precision recipe), outside autocast: ``F.layer_norm`` and
    ``F.rms_norm`` take that mix (in float32, output in the tokens' dtype), so the eager merger runs;
    so do ``merge_mlp``, ``merge_mlp_packed`` and ``PatchMergerProjector`` (they refused it, naming
    ``norm_weight``): output in the tokens' dtype, each gradient in its input's dtype, within eager's
    error against float64. float32 Linears after it stay refused, as eager's Linear refuses them."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        pytest.skip("bf16 tl.dot: the interpreter's bf16 dots are not the GPU's")
    params, dy = _case(torch.float32, B=2, N=16, C=16, hidden=32, out=16, norm=norm)
    params = [p if i in (1, 2) or p is None else p.to(dtype) for i, p in enumerate(params)]
    # eager's RMSNorm twin squares in the tokens' dtype: no measure of the error
    _check(params, dy.to(dtype), dtype, eps=1e-5, norm=norm, eager_bound=norm == "layernorm")
    x, nw, nb, *mlp = params
    with torch.no_grad():
        dense = deco_ops.merge_mlp(*params, eps=1e-5, norm=norm)
        packed, _ = deco_ops.merge_mlp_packed(x.flatten(0, 1), torch.tensor([[4, 4], [4, 4]]), nw, nb, *mlp, eps=1e-5, norm=norm)
    assert packed.dtype == dtype
    torch.testing.assert_close(packed, dense.flatten(0, 1))
    module = deco_ops.PatchMergerProjector(16, 16, hidden_features=32, norm=norm, eps=1e-5).to(dtype)
    module.norm_layer.float()
    y = module(x)
    y.float().sum().backward()
    assert y.dtype == dtype and module.norm_layer.weight.grad.dtype == torch.float32 and module.fc1.weight.grad.dtype == dtype
    with pytest.raises(TypeError, match="norm_weight has dtype torch.float32 but x has"):
        deco_ops.merge_mlp(x, nw, nb, *(p.float() for p in mlp), norm=norm)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_backward_writes_the_norm_output_in_the_mlp_dtype(backend, norm):
    """A float32 norm before a 16-bit MLP: ``merge_norm_backward`` writes dW1's operand, the norm's
    rows, in the MLP's dtype (the float32 rows rounded once, as the forward rounds them), not in
    float32 for a cast afterwards; the same through a plan (``deco``) and the dispatcher."""
    params, _ = _case(torch.float32, B=2, N=16, C=16, norm=norm)
    x, nw, nb = params[:3]
    dn = randn(8, 64, dtype=torch.bfloat16)
    args = (guarded(x), nw, nb, guarded(dn), None, [], 2, "block", norm, True, 1e-6, True, torch.bfloat16, True, nb is not None)
    with poisoned_empty():
        planned = deco.merge_norm_backward(*args)
        dispatched = torch.ops.deco.merge_norm_backward(*args)
    x64 = x.double()
    if norm == "layernorm":
        rows = F.layer_norm(x64, (16,), nw.double(), nb.double(), 1e-6)
    else:
        rows = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    for dx, n, *_ in (planned, dispatched):
        assert n.dtype == torch.bfloat16 and dx.dtype == torch.float32
        torch.testing.assert_close(n.double(), rows.reshape(8, 64), rtol=2**-7, atol=1e-6)  # one bf16 rounding
    for a, b in zip(planned, dispatched):
        assert torch.equal(a, b)


def test_autocast_runs_in_the_autocast_dtype():
    """Inside ``torch.autocast`` fp32 weights meet bf16 tokens: the norm runs in fp32 (the tokens
    upcast, as autocast runs ``F.layer_norm``), the Linears and the output in bf16, and the fp32
    parameters get fp32 gradients, the bf16 tokens a bf16 one."""
    params, dy = _case(torch.float32, B=1, N=16, C=8, hidden=16, out=8)
    leaves = [leaf(p) for p in params]
    x = leaves[0].detach().bfloat16().requires_grad_(True)
    with deco_ops.use_backend("triton"), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = deco_ops.merge_mlp(x, *leaves[1:])
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert all(t.grad.dtype == torch.float32 for t in leaves[1:]) and x.grad.dtype == torch.bfloat16
    ref = eager_merge_mlp(*(leaf(p, torch.float64) for p in [x.detach(), *params[1:]]))
    assert_close(y, ref, torch.bfloat16)
