"""The eager path (``deco_ops._direct``): plain eager calls run each op's implementation and
autograd formula without the dispatcher, every other call goes through ``torch.ops.deco``; both
give the same bits, forward and backward."""

import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import deco_ops
from deco_ops import _plan, reference
from harness import DEVICE, randn


class CountingMode(TorchDispatchMode):
    """Records the deco ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deco":
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _pool_mlp_case():
    g = torch.Generator().manual_seed(0)
    x = randn(2, 36, 16, generator=g)
    params = [randn(24, 16, generator=g) / 4, randn(24, generator=g), randn(8, 24, generator=g) / 5, randn(8, generator=g)]
    return lambda x, *p: deco_ops.pool_mlp(x, *p, grid=(6, 6), out_grid=(3, 3)), [x, *params]


def _attention_case():
    g = torch.Generator().manual_seed(1)
    q, k, v = randn(1, 5, 2, 16, generator=g), randn(3, 11, 2, 16, generator=g), randn(3, 11, 2, 16, generator=g)
    lens = torch.tensor([11, 4, 7], device=DEVICE)
    return lambda q, k, v: deco_ops.cross_attention(q, k, v, kv_lens=lens), [q, k, v]


def _outputs_and_grads(fn, inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    out.backward(dy)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("case", [_pool_mlp_case, _attention_case], ids=["pool_mlp", "cross_attention"])
def test_direct_and_dispatched_paths_agree_bitwise(case, backend, monkeypatch):
    fn, inputs = case()
    direct = _outputs_and_grads(fn, inputs)
    with CountingMode() as mode:  # a dispatch mode: every op goes through torch.ops.deco
        dispatched = _outputs_and_grads(fn, inputs)
    assert mode.ops, "the dispatch mode saw no deco op: the call did not take the dispatched path"
    for a, b in zip(direct, dispatched):
        assert a is not None and torch.equal(a, b)


def test_plain_eager_calls_skip_the_dispatcher(backend):
    """The autograd node of a plain eager call is the direct path's Function, not the op's."""
    fn, inputs = _pool_mlp_case()
    out = fn(*[t.clone().requires_grad_(True) for t in inputs])
    assert type(out.grad_fn).__name__ == "deco_pool_mlpBackward"
    with CountingMode():
        dispatched = fn(*[t.clone().requires_grad_(True) for t in inputs])
    assert type(dispatched.grad_fn).__name__ != "deco_pool_mlpBackward"


def test_what_counts_as_plain_eager():
    x = randn(2, 3)
    w = torch.nn.Parameter(randn(3, 3))
    assert _plan.plain((x, w, None, [1, 2], "gelu", True))
    assert _plan.plain(([4, 4], "mode"))  # no tensor at all
    with CountingMode():
        assert not _plan.plain((x,))
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(x)
    assert not _plan.plain((fake,))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert not _plan.plain((x,))
    assert _plan.plain((x,))


def test_double_backward_through_the_direct_path():
    """Pooling's formula is the un-pooling op and vice versa: second derivatives flow on the
    direct path too (the backward runs with grad mode on under create_graph)."""
    x = randn(1, 12, 2, dtype=torch.float64).requires_grad_(True)
    with deco_ops.use_backend("torch"):
        y = deco_ops.adaptive_avg_pool_tokens(x, (3, 4), (2, 3))
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.sum(), x)
    # y = P x, so d/dx sum(2 P^T P x) = 2 P^T P 1: compare with the dense pooling matrix
    eye = torch.eye(12, dtype=torch.float64, device=x.device)
    P = torch.stack([reference.adaptive_avg_pool_tokens(e.view(1, 12, 1), (3, 4), (2, 3)).flatten() for e in eye], 1)
    want = (2 * P.t() @ P @ torch.ones(12, dtype=torch.float64, device=x.device)).view(1, 12, 1).expand(1, 12, 2)
    assert torch.allclose(gg, want, atol=1e-12)


def _func_cases():
    g = torch.Generator().manual_seed(11)
    w1, w2 = torch.randn(12, 8, generator=g), torch.randn(6, 12, generator=g)
    x_w2 = torch.randn(2, 16, 8, generator=g)
    k, v = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    return [
        ("pool", lambda x: deco_ops.adaptive_avg_pool_tokens(x, (4, 4), (2, 2)), torch.randn(2, 16, 8, generator=g)),
        ("pool_mlp", lambda x: deco_ops.pool_mlp(x, w1, None, w2, None, grid=(4, 4), out_grid=(2, 2)), torch.randn(2, 16, 8, generator=g)),
        # the differentiated input after a None (b1): every tensor argument is looked at, not those before the first non-tensor
        ("pool_mlp_w2", lambda w: deco_ops.pool_mlp(x_w2, w1, None, w, None, grid=(4, 4), out_grid=(2, 2)), w2.clone()),
        ("cross_attention", lambda q: deco_ops.cross_attention(q, k, v), torch.randn(2, 3, 2, 8, generator=g)),
    ]


@pytest.mark.parametrize("case", ["pool", "pool_mlp", "pool_mlp_w2", "cross_attention"])
def test_torch_func_autodiff_is_refused_and_vmap_works(case):
    """torch.func's grad and jvp transforms of a deco op's input are refused with an error that names
    them (PyTorch would hand back zero tangents under jvp, silently); vmap runs the op per sample,
    and a grad transform that does not differentiate the op's inputs runs it as before."""
    _, f, x = next(c for c in _func_cases() if c[0] == case)
    transforms = {
        "jvp": lambda: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
        "jacfwd": lambda: torch.func.jacfwd(f)(x),
        "grad": lambda: torch.func.grad(lambda t: f(t).sum())(x),
        "jacrev": lambda: torch.func.jacrev(f)(x),
        "vmap(grad)": lambda: torch.vmap(torch.func.grad(lambda t: f(t).sum()))(x[None]),
        "grad(vmap)": lambda: torch.func.grad(lambda t: torch.vmap(f)(t[None]).sum())(x),  # grad below vmap's wrapper
    }
    for name, run in transforms.items():
        with pytest.raises(NotImplementedError, match="torch.func's grad and jvp transforms"):
            run()
    batched = torch.stack([x, 2 * x + 1])
    torch.testing.assert_close(torch.vmap(f)(batched), torch.stack([f(t) for t in batched]))
    # an input the transform does not differentiate (a frozen feature map, the head's weights differentiated)
    w = torch.randn(f(x).shape, dtype=x.dtype)
    frozen = torch.func.grad(lambda w: (f(x) * w.sin()).sum())(w)
    torch.testing.assert_close(frozen, f(x) * w.cos())


def _stacked_cases():
    """op -> (f(stacked) for one model, stacked tensors (3 models) requiring grad): what a model
    ensemble differentiates after ``vmap(functional_call)``, the shared inputs not requiring grad."""
    g = torch.Generator().manual_seed(12)
    x, tokens = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    w1s, w2 = torch.randn(3, 12, 8, generator=g), torch.randn(6, 12, generator=g)
    q, k, vs = torch.randn(2, 3, 2, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g), torch.randn(3, 2, 5, 2, 8, generator=g)
    grids = torch.tensor([[4, 4], [2, 4]])
    packed = torch.randn(24, 8, generator=g)
    return {
        "pool_mlp": (lambda w1: deco_ops.pool_mlp(x, w1, None, w2, None, grid=(4, 4), out_grid=(2, 2)), w1s),
        "pool_linear": (lambda w1: deco_ops.pool_linear(x, w1, None, grid=(4, 4), out_grid=(2, 2)), w1s),
        "mlp_pool": (lambda w1: deco_ops.mlp_pool(x, w1, None, w2, None, grid=(4, 4), out_grid=(2, 2)), w1s),
        "merge_mlp": (lambda w1: deco_ops.merge_mlp(tokens, None, None, w1, None, w2, None),
                      torch.randn(3, 12, 32, generator=g)),
        "pool_mlp_packed": (lambda w1: deco_ops.pool_mlp_packed(packed, grids, w1, None, w2, None, out_grids=torch.tensor([[2, 2], [1, 2]]))[0],
                            w1s),
        "cross_attention": (lambda v: deco_ops.cross_attention(q, k, v), vs),
    }


@pytest.mark.parametrize("case", ["pool_mlp", "pool_linear", "mlp_pool", "merge_mlp", "pool_mlp_packed", "cross_attention"])
def test_vmap_then_backward_differentiates_the_stacked_tensors(backend, case):
    """``vmap`` over stacked weights (or values), then ``backward`` outside it: the gradients of a
    loop over the models. Inside vmap a tensor reports ``requires_grad=False`` whatever the tensor
    under it does; the ops used to skip their residuals then and refuse the backward ("ran with
    keep_residuals=False")."""
    f, stacked = _stacked_cases()[case]
    leaves = [stacked.clone().requires_grad_(True) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batching rule's fallback warning
        out = torch.vmap(f)(leaves[0])
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    out.backward(dy)
    torch.stack([f(w) for w in leaves[1]]).backward(dy)
    torch.testing.assert_close(out, torch.stack([f(w) for w in stacked]))
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad)


@pytest.mark.parametrize("case", ["pool", "pool_mlp", "cross_attention"])
def test_forward_mode_dual_tensors_are_refused(backend, case):
    """A dual tensor of torch.autograd.forward_ad is refused with an error that says so (the Triton
    kernels dropped its tangent: None, read as zero); a plain tensor inside a dual level runs, the
    second call too (a signature is never planned inside a level)."""
    _, f, x = next(c for c in _func_cases() if c[0] == case)
    want = f(x)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="no forward-mode AD formula"):
            f(dual)
        for _ in range(2):
            torch.testing.assert_close(f(x), want)
