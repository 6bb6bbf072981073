"""cross_attention's composed candidates (deco_ops.composed_attention): which SDPA kernel applies to
which call, their determinism, and the plumbing of every kernel's ATen ops, here without a GPU:

* the real ATen schemas and meta kernels check arity, argument order and output layouts;
* stand-ins for the CUDA ops, built on SDPA's CPU kernel and laying out their log-sum-exp as each
  CUDA kernel does, check the numbers: every forward against float64 and every backward after
  every forward (the residual contract: LSE normalised to ``(B, H, M)`` whoever wrote it);

and on a GPU, every candidate that applies against float64, forced through the op."""

import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import deco_ops
from deco_ops import attention, strategy
from deco_ops import composed_attention as ca
from harness import assert_close, guarded, peak_bytes, randn
from test_cross_attention import _case, _check, _reference, _run

CUDA = torch.device("cuda", 0)
ALL_CUDA = ("composed_efficient", "composed_flash", "composed_cudnn")


def _fake_q(D=64, dtype=torch.bfloat16, device=CUDA):
    """What ``kernels`` reads of the query: no CUDA tensor needed."""
    return SimpleNamespace(device=device, dtype=dtype, shape=(2, 32, 8, D))


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(ca, "_sm80_or_newer", lambda device: True)


def test_which_kernels_apply(hopper, monkeypatch):
    assert ca.kernels(_fake_q(), False, 0.0) == ALL_CUDA
    assert ca.kernels(_fake_q(dtype=torch.float16), False, 0.0) == ALL_CUDA
    assert ca.kernels(_fake_q(dtype=torch.float32), False, 0.0) == ("composed_efficient",)  # flash / cuDNN: 16-bit only
    assert ca.kernels(_fake_q(dtype=torch.float64), False, 0.0) == ()
    assert ca.kernels(_fake_q(D=72), False, 0.0) == ALL_CUDA
    assert ca.kernels(_fake_q(D=160), False, 0.0) == ("composed_efficient", "composed_flash")  # cuDNN backward: D <= 128
    assert ca.kernels(_fake_q(D=264), False, 0.0) == ("composed_efficient",)  # flash: D <= 256
    assert ca.kernels(_fake_q(D=128), False, 0.0) == ALL_CUDA  # each limit itself is in
    assert ca.kernels(_fake_q(D=256), False, 0.0) == ("composed_efficient", "composed_flash")
    assert ca.kernels(_fake_q(D=36), False, 0.0) == ()  # not a multiple of 8: the fused kernel
    assert ca.kernels(_fake_q(), True, 0.0) == ("composed_efficient",)  # padded keys need the additive mask
    assert ca.kernels(_fake_q(), False, 0.1) == ()  # dropout: our Philox mask, fused only
    assert ca.kernels(_fake_q(dtype=torch.float32, device=torch.device("cpu")), True, 0.0) == ("composed",)
    assert ca.kernels(_fake_q(device=torch.device("cpu")), False, 0.2) == ()
    # the op's candidates: kv_lens, packed keys and an attn_mask each mask keys (flash and cuDNN would ignore them)
    mask = object()  # only compared with None
    runs = dict.fromkeys(ca.KERNELS)
    assert tuple(attention._composed_candidates(_fake_q(), None, None, None, 0.0, runs)) == ALL_CUDA
    for masks in ((mask, None, None), (None, mask, None), (None, None, mask)):
        assert tuple(attention._composed_candidates(_fake_q(), *masks, 0.0, runs)) == ("composed_efficient",), masks
    monkeypatch.setattr(ca, "_HALF_KERNELS", {**ca._HALF_KERNELS, "composed_cudnn": ("_no_such_attention_op", 128)})
    assert ca.kernels(_fake_q(), False, 0.0) == ("composed_efficient", "composed_flash")  # an older torch without the op
    monkeypatch.setattr(ca, "_sm80_or_newer", lambda device: False)
    assert ca.kernels(_fake_q(), False, 0.0) == ("composed_efficient",)
    assert set(ALL_CUDA) | {"composed"} <= set(strategy.CANDIDATES) and ca.CUDA_KERNELS == ALL_CUDA


def test_flash_and_cudnn_from_sm80(monkeypatch):
    """FlashAttention-2 and cuDNN's SDPA run from sm_80 (A100) on."""
    for capability, newer in (((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert ca._sm80_or_newer.__wrapped__(CUDA) is newer, capability  # the function under its cache


def test_backward_determinism(monkeypatch):
    def mode(on, warn_only=False):
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: on)
        monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: warn_only)
        return {name: ca.deterministic_backward(name) for name in ("composed", *ALL_CUDA)}

    assert mode(False) == {"composed": True, "composed_efficient": False, "composed_flash": False, "composed_cudnn": False}
    assert mode(True) == {"composed": True, "composed_efficient": False, "composed_flash": True, "composed_cudnn": False}
    assert mode(True, warn_only=True)["composed_flash"] is False  # flash keeps its atomics when determinism only warns


@pytest.mark.parametrize("kernel", ["composed_flash", "composed_cudnn"])
def test_aten_schemas_and_layouts(kernel):
    """Meta tensors run the real ATen schemas and the ops' meta kernels (what torch.compile trusts)."""
    B, M, N, H, D = 3, 5, 9, 2, 64
    q = torch.empty(1, M, H, D, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(B, N, H, D, device="meta", dtype=torch.bfloat16) for _ in range(2))
    out, lse = ca.forward(q, k, v, None, 0.125, kernel=kernel)
    assert out.shape == (B, M, H, D) and out.is_contiguous() and lse.shape == (B, H, M) and lse.dtype == torch.float32
    dq, dk, dv = ca.backward(out, q, k, v, out, lse, None, 0.125, True, True, kernel=kernel)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape  # dq of shared queries summed


def _traced(*tensors):
    """Meta tensors as ``torch.compile`` hands them to a ``triton_op``'s body: FunctionalTensors
    (AOTAutograd's tracing mode), which have no address (``data_ptr`` raises)."""
    from torch._subclasses.functional_tensor import FunctionalTensor

    return [None if t is None else FunctionalTensor.to_functional(t) for t in tensors]


@pytest.mark.parametrize("kernel", ALL_CUDA)
def test_cuda_kernels_trace_under_torch_compile(kernel):
    """On CUDA, ``torch.compile`` traces the op's body (``deco_ops._triton_op``) with the candidate
    held for the key or forced (an eager ``auto`` step that picked an SDPA kernel, then compiling):
    the operand alignment check must not read an address, and every ATen op must have a meta kernel
    that takes the call (``aten._efficient_attention_backward``'s drops its ``out`` argument, so the
    memory-efficient backward calls SDPA's wrapper of it). A view that starts mid-buffer is still
    judged by its storage offset and copied (as Inductor judges its inputs)."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    B, M, N, H, D = 3, 5, 9, 2, 64
    starts = []  # (storage offset in, out) of every operand the alignment check saw

    def spy(t, aligned=ca._aligned):
        starts.append((t.storage_offset(), aligned(t).storage_offset()))
        return aligned(t)

    q = torch.empty(1, M, H, D, device="meta", dtype=torch.bfloat16)
    k = torch.empty(B * N * H * D + 1, device="meta", dtype=torch.bfloat16)[1:].view(B, N, H, D)  # 2 bytes into its buffer
    v = torch.empty(B, N, H, D, device="meta", dtype=torch.bfloat16)
    masks = [(None, None)]
    if kernel == "composed_efficient":  # the one that takes kv_lens and a mask
        masks += [(torch.empty(B, dtype=torch.int32, device="meta"), torch.empty(1, 1, M, N, device="meta").expand(B, H, M, N))]
    for kv_lens, bias in masks:
        with FunctionalTensorMode(), mock.patch.object(ca, "_aligned", spy):
            q_, k_, v_, kv_lens, bias = _traced(q, k, v, kv_lens, bias)
            out, lse = ca.forward(q_, k_, v_, kv_lens, 0.125, kernel=kernel, bias=bias)
            assert out.shape == (B, M, H, D) and lse.shape == (B, H, M) and lse.dtype == torch.float32
            dq, dk, dv = ca.backward(out, q_, k_, v_, out, lse, kv_lens, 0.125, True, True, kernel=kernel, bias=bias)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (1, 0) in starts and all(after == 0 for _, after in starts)  # the misaligned k copied, no other


def test_lse_normalisation():
    lse = torch.randn(2, 3, 5)
    assert torch.equal(ca.normalised_lse(lse, 5), lse)
    assert torch.equal(ca.normalised_lse(lse[..., None], 5), lse)  # cuDNN (B, H, M, 1)
    padded = torch.full((2, 3, 32), float("nan"))
    padded[..., :5] = lse
    assert torch.equal(ca.normalised_lse(padded, 5), lse)  # memory-efficient: ceil(M / 32) * 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_efficient_kernels_mask_keeps_the_lowest_finite_bias_finite(dtype):
    """The memory-efficient kernel takes its additive mask in q's dtype: a bias below that dtype's
    range (Hugging Face's ``finfo(float32).min`` for "masked") is clamped to the dtype's lowest
    finite value, not rounded to -inf, so a query whose every key carries it keeps a uniform average
    (as in PyTorch, and on the fused path) instead of becoming a row without keys (zeros)."""
    g = torch.Generator().manual_seed(5)
    B, M, N, H, D = 2, 3, 7, 2, 16
    q, k, v = (randn(*shape, dtype=dtype, generator=g) for shape in ((B, M, H, D), (B, N, H, D), (B, N, H, D)))
    user = randn(B, 1, M, N, generator=g)
    user[0, :, 1] = torch.finfo(torch.float32).min  # every key of a query
    user[1, :, :, 4:] = torch.finfo(torch.float32).min
    _, _, _, bias, dead = ca._inputs(q, k, v, None, user.expand(B, H, M, N), 16, per_head=True)  # as composed_efficient calls it
    assert not dead.any()
    floor = max(ca.reference_attention.MIN_BIAS, torch.finfo(dtype).min)  # fp16's -65504; bf16 reaches the kernels' -1e30
    assert bias.dtype == dtype and torch.equal(bias, user.clamp(min=floor).to(dtype).expand(B, H, M, N))


# ----------------------------------------------------------------------------------------------
# stand-ins for the CUDA ops on SDPA's CPU kernel, laying out their LSE as each CUDA kernel does


def _cpu(q, k, v, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


def _cpu_backward(dout, q, k, v, out, lse, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False,
                                                                               attn_mask=bias, scale=scale)


def _assert_aligned(*tensors, bias=None):
    """What the memory-efficient kernel requires of its operands ("no kernel found to launch"
    otherwise): a 16-byte aligned start and strides, a unit stride on the last dim; its mask's rows
    16-element aligned (``composed_attention``'s docstring)."""
    for i, t in enumerate((*tensors, bias)):
        if t is not None:
            step = 16 if t is bias else 16 // t.element_size()
            assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % step == 0 for s in t.stride()[:-1]), (i, t.stride())


def _efficient_forward(q, k, v, bias, cu_q, cu_k, max_q, max_k, dropout_p, mask_type, compute_lse, *, scale):
    """(B, L, H, D) inputs, an expanded (B, H, M, N) bias, LSE padded to 32 queries (NaN past M)."""
    assert (cu_q, cu_k, max_q, max_k, dropout_p, mask_type) == (None, None, None, None, 0.0, 0)
    _assert_aligned(q, k, v, bias=bias)
    assert bias is None or bias.shape == (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    o, lse = _cpu(*(t.transpose(1, 2) for t in (q, k, v)), bias, scale)
    M = q.shape[1]
    padded = torch.full((*lse.shape[:2], -(-M // 32) * 32), float("nan"))
    padded[..., :M] = lse
    return o.transpose(1, 2), padded if compute_lse else torch.empty(0), None, None, M, k.shape[1]


def _efficient_backward(dout, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal=False, *, scale):
    """SDPA's wrapper of the memory-efficient backward: (B, H, L, D) views of what the kernel reads."""
    M = q.shape[2]
    assert lse.shape[-1] % 32 == 0 and (dropout_p, tuple(grad_input_mask), is_causal) == (0.0, (True, True, True, False), False)
    _assert_aligned(dout, q, k, v, out, bias=bias)
    return (*_cpu_backward(dout, q, k, v, out, lse[..., :M].contiguous(), bias, scale), None)


def _flash_forward(q, k, v, dropout_p, is_causal, debug_mask, *, scale):
    assert (dropout_p, is_causal, debug_mask) == (0.0, False, False)
    o, lse = _cpu(q, k, v, None, scale)
    return o, lse, None, None, q.shape[2], k.shape[2], None, None, None


def _flash_backward(dout, q, k, v, out, lse, cu_q, cu_k, M, N, dropout_p, is_causal, seed, offset, *, scale):
    assert lse.shape == q.shape[:3] and (cu_q, cu_k, M, N, dropout_p, is_causal) == (None, None, q.shape[2], k.shape[2], 0.0, False)
    return _cpu_backward(dout, q, k, v, out, lse, None, scale)


def _cudnn_forward(q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, debug_mask=False, *, scale=None):  # the schema's defaults
    assert bias is None and (dropout_p, is_causal, debug_mask) == (0.0, False, False)
    o, lse = _cpu(q, k, v, None, scale)
    return o, lse[..., None] if compute_lse else None, None, None, q.shape[2], k.shape[2], None, None, None


def _cudnn_backward(dout, q, k, v, out, lse, seed, offset, bias, cu_q, cu_k, M, N, dropout_p, is_causal, *, scale):
    assert lse.shape == (*q.shape[:3], 1) and bias is None and (cu_q, cu_k, dropout_p, is_causal) == (None, None, 0.0, False)
    assert dout.stride() == out.stride()  # cuDNN reads dout with out's strides
    return _cpu_backward(dout, q, k, v, out, lse[..., 0], None, scale)


STAND_INS = {
    "_efficient_attention_forward": _efficient_forward,
    "_scaled_dot_product_efficient_attention_backward": _efficient_backward,
    "_scaled_dot_product_flash_attention": _flash_forward,
    "_scaled_dot_product_flash_attention_backward": _flash_backward,
    "_scaled_dot_product_cudnn_attention": _cudnn_forward,
    "_scaled_dot_product_cudnn_attention_backward": _cudnn_backward,
}


@pytest.mark.parametrize("name", list(STAND_INS))
def test_stand_ins_take_the_real_ops_arguments(name):
    """Each CPU stand-in takes what its CUDA op's schema takes, at the same positions: as many
    positional parameters (a default only where the schema has one), and keyword-only ones the schema
    names, so the calls the stand-ins accept are calls the real ops accept (their meta kernels
    check them too: ``test_cuda_kernels_trace_under_torch_compile``)."""
    import inspect

    schema = getattr(torch.ops.aten, name).default._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    keyword = {a.name for a in schema.arguments if a.kwarg_only}
    params = inspect.signature(STAND_INS[name]).parameters.values()
    ours = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(ours) == len(positional), (name, [p.name for p in ours], [a.name for a in positional])
    for p, a in zip(ours, positional):
        assert p.default is inspect.Parameter.empty or a.has_default_value(), (name, p.name, a.name)
    assert {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY} <= keyword, name


def _on_the_cpu(tensors):
    """A case's tensors on the CPU, where the stand-ins run (also in the CUDA suite)."""
    return [t if t is None else t.cpu() for t in tensors]


@pytest.fixture
def stand_ins(monkeypatch):
    for name, fn in STAND_INS.items():
        monkeypatch.setattr(torch.ops.aten, name, fn)
    with torch.device("cpu"):  # SDPA's CPU kernel, also where the CUDA suite makes CUDA the default device
        yield


@pytest.mark.parametrize("case", [
    pytest.param((2, 1, 5, 37, 2, 16, None), id="shared-q"),
    pytest.param((2, 2, 33, 20, 1, 32, None), id="per-batch-q-M33"),
    pytest.param((3, 1, 4, 19, 2, 16, [19, 0, 7]), id="kv-lens-with-empty-batch"),
])
def test_every_backward_follows_every_forward(stand_ins, case):
    *shape, lens = case
    q, k, v, dout, kv_lens = _on_the_cpu(_case(*shape, lens, torch.float32))
    k = torch.cat((k.new_zeros(1), k.flatten()))[1:].view(k.shape)  # k one element into its buffer: aligned strides, not its start
    kernels = ("composed", "composed_efficient") if lens else ("composed", *ALL_CUDA)
    want = _reference(q, k, v, dout, kv_lens)
    scale = q.shape[-1] ** -0.5
    for fwd in kernels:
        out, lse = ca.forward(q, k, v, kv_lens, scale, kernel=fwd)
        assert_close(out, want[0], torch.float32, f"{fwd} out")
        assert lse.shape == (k.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
        for bwd in kernels:
            grads = ca.backward(dout, q, k, v, out, lse, kv_lens, scale, True, True, kernel=bwd)
            _check((out, *grads), want, torch.float32, kv_lens, k.shape[1])


@pytest.mark.parametrize("kernel", ALL_CUDA)
def test_the_op_runs_the_forced_kernel(stand_ins, monkeypatch, kernel):
    """``use_strategy(<kernel>)`` reaches that kernel's forward and backward through the op."""
    monkeypatch.setattr(ca, "kernels", lambda q, masked, dropout_p: ALL_CUDA)
    q, k, v, dout, kv_lens = _on_the_cpu(_case(2, 1, 6, 21, 2, 16, None, torch.float32))
    with deco_ops.use_backend("torch"), deco_ops.use_strategy(kernel), \
            mock.patch.object(ca, "forward", wraps=ca.forward) as fwd, mock.patch.object(ca, "backward", wraps=ca.backward) as bwd:
        got = _run(q, k, v, dout, kv_lens)
    assert fwd.call_args.kwargs["kernel"] == kernel and bwd.call_args.kwargs["kernel"] == kernel
    _check(got, _reference(q, k, v, dout, kv_lens), torch.float32, kv_lens, 21)


# ----------------------------------------------------------------------------------------------
# on a GPU: the real kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [
    pytest.param((2, 1, 32, 257, 2, 64, None), id="blip2-shared-D64"),
    pytest.param((2, 2, 17, 577, 2, 128, None), id="per-batch-D128"),
    pytest.param((1, 1, 64, 300, 2, 80, None), id="D80"),
    pytest.param((2, 1, 32, 257, 2, 64, [257, 0]), id="kv-lens-empty-batch"),
])
def test_every_cuda_kernel_against_float64(case, dtype):
    *shape, lens = case
    q, k, v, dout, kv_lens = (t if t is None else t.cuda() for t in _case(*shape, lens, dtype))
    kernels = ca.kernels(q, kv_lens is not None, 0.0)
    assert kernels and kernels[0] == "composed_efficient"
    want = _reference(q, k, v, dout, kv_lens)
    for kernel in kernels:
        with deco_ops.use_strategy(kernel):
            got = _run(q, k, v, dout, kv_lens)
        _check(got, want, dtype, kv_lens, k.shape[1])
    scale = q.shape[-1] ** -0.5
    for fwd in kernels:  # the residual contract on the real kernels
        out, lse = ca.forward(q, k, v, kv_lens, scale, kernel=fwd)
        for bwd in kernels:
            _check((out, *ca.backward(dout, q, k, v, out, lse, kv_lens, scale, True, True, kernel=bwd)), want, dtype, kv_lens,
                   k.shape[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's CUDA kernels")
@pytest.mark.parametrize("lens", [None, [257, 100]], ids=["dense", "kv-lens"])
def test_every_cuda_kernel_under_torch_compile(lens):
    """What ``test_cuda_kernels_trace_under_torch_compile`` traces on meta tensors, compiled and run:
    each SDPA kernel that applies, forced, forward and backward through ``torch.compile(fullgraph=True)``
    (Inductor traces the op's body), against float64. No test compiled a forced composed candidate
    before; its operand alignment check raised on every one."""
    dtype = torch.bfloat16
    q, k, v, dout, kv_lens = (t if t is None else t.cuda() for t in _case(2, 1, 32, 257, 2, 64, lens, dtype))
    want = _reference(q, k, v, dout, kv_lens)
    for kernel in ca.kernels(q, kv_lens is not None, 0.0):
        torch._dynamo.reset()
        compiled = torch.compile(deco_ops.cross_attention, fullgraph=True)
        leaves = [guarded(t, 3).requires_grad_(True) for t in (q, k, v)]
        with deco_ops.use_strategy(kernel), mock.patch.object(ca, "forward", wraps=ca.forward) as fwd:
            out = compiled(*leaves, kv_lens=kv_lens)
            out.backward(dout)
        assert fwd.call_args.kwargs["kernel"] == kernel, kernel
        _check((out.detach(), *(t.grad for t in leaves)), want, dtype, kv_lens, k.shape[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fill", ["random", "huge", "nan", "inf"])
@pytest.mark.parametrize("masking", ["kv_lens", "bool_mask", "both", "query_rows"])
def test_cpu_padding_values_never_change_the_bits(monkeypatch, dtype, fill, masking):
    """The CPU path zeroes the keys and values no query reads only where their values could reach
    the result (``_harmless_keys``/``_harmless_values``; the copies are skipped otherwise): any
    padding gives the bits of zero padding, forward and backward, a row without keys included.
    ``query_rows``: a (B, 1, M, 1) mask, broadcast over the keys, dropping every query of one batch
    entry (none of its keys is read)."""
    monkeypatch.setattr(ca, "_CHECKED_FROM", 0)  # the check at this small size too
    torch.manual_seed(0)
    B, M, N, H, D = 3, 5, 37, 2, 16
    q, k, v = (torch.randn(s, dtype=dtype) for s in ((B, M, H, D), (B, N, H, D), (B, N, H, D)))
    lens = torch.tensor([N, 20, 0])
    keep = torch.arange(N)[None, :] < torch.tensor([30, N, 11])[:, None]
    kv_lens = lens if masking in ("kv_lens", "both") else None
    bias = {"bool_mask": torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(B, H, M, N),
            "query_rows": torch.where(torch.tensor([[True] * M, [False] * M, [True, False] * 2 + [True]]),
                                      0.0, float("-inf"))[:, None, :, None]}.get(masking)
    if masking == "both":
        bias = torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(B, H, M, N)
    read = torch.ones(B, N, dtype=torch.bool)
    if kv_lens is not None:
        read &= torch.arange(N)[None, :] < lens[:, None]
    if bias is not None:
        read &= ~(bias.expand(B, H, M, N) == float("-inf")).all(2).all(1)
    value = {"random": 3.0, "huge": 1e30, "nan": float("nan"), "inf": float("inf")}[fill]
    pad = ~read[:, :, None, None]  # keys: any the masks drop for every query; values: past kv_lens only
    past = torch.zeros_like(pad) if kv_lens is None else (torch.arange(N)[None, :] >= lens[:, None])[:, :, None, None]
    noisy_k = torch.where(pad, torch.randn_like(k) * value, k)
    noisy_v = torch.where(past, torch.randn_like(v) * value, v)
    clean_k, clean_v = torch.where(pad, 0.0, k).to(dtype), torch.where(past, 0.0, v).to(dtype)
    o_ref, lse_ref = ca.forward(q, clean_k, clean_v, kv_lens, None, bias=bias)
    o, lse = ca.forward(q, noisy_k, noisy_v, kv_lens, None, bias=bias)
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    dout = torch.randn_like(o)
    ref = ca.backward(dout, q, clean_k, clean_v, o_ref, lse_ref, kv_lens, None, True, True, bias=bias)
    got = ca.backward(dout, q, noisy_k, noisy_v, o, lse, kv_lens, None, True, True, bias=bias)
    assert torch.equal(got[0], ref[0])
    # gradients of the keys no query reads are zero either way
    for g, r in zip(got[1:], ref[1:]):
        assert torch.equal(g, r)


def _eager_sdpa(q, k, v, mask):
    """The eager code ``cross_attention`` replaces: SDPA on heads-first views, shared queries expanded
    (a view), the mask as given (``kv_lens`` as the equivalent bool mask), the output back in (B, M, H, D)."""
    qt = q.transpose(1, 2).expand(k.shape[0], -1, -1, -1)
    return torch.nn.functional.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def _eager_softmax_attention(q, k, v):
    """The eager code ``need_weights=True`` replaces: softmax attention on heads-first views (as
    ``nn.MultiheadAttention``'s math path computes it), the weights averaged over the heads."""
    s = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * q.shape[-1] ** -0.5
    p = torch.softmax(s, -1)
    return (p @ v.transpose(1, 2)).transpose(1, 2), p.mean(1)


@pytest.mark.parametrize("case", [
    "key_mask",  # before 2026-12-07 rows without keys were zeroed into a second output: 1564 KiB against eager's 768
    "ragged_kv_lens",  # before 2026-12-07 the per-sequence outputs were joined by a cat: 1024 KiB against 520
    "full_float_mask",  # before 2026-12-07 the mask was copied twice (clamp, dead-row fill): 6939 KiB against 768
    "weights",  # before 2026-12-07 V's copy was made before S, S held beside P: 16956 KiB against 13104
])
def test_inference_peak_memory_is_no_more_than_eagers(auto_backend, case, capsys):
    """Inference on the CPU kernel holds no more at its peak than SDPA called eagerly, beyond the
    converted mask (one clamped copy at its own size, docs/masks.md) and, for ragged keys run one
    sequence at a time, that sequence's output. With the weights (eager softmax attention,
    ``cpu_attention_with_weights``) K^T is materialised as ``(B, H, D, N)`` for its GEMM's bits,
    as eager's matmul copies it inside the op: no allowance (the raw allocation records see both)."""
    g = torch.Generator().manual_seed(13)
    if case == "ragged_kv_lens":  # a video resampler: per sequence (composed_attention.per_sequence)
        B, M, N, H, D = 4, 64, 2048, 8, 64
    else:  # BLIP-2: 32 shared queries over a ViT's 257 tokens
        B, M, N, H, D = 8, 32, 257, 12, 64
    q, k, v = randn(1, M, H, D, generator=g), randn(B, N, H, D, generator=g), randn(B, N, H, D, generator=g)
    kv_lens, mask = None, None
    if case == "key_mask":
        mask = torch.rand(B, 1, 1, N, generator=g) > 0.2
    elif case == "full_float_mask":
        mask = torch.randn(B, H, M, N, generator=g)
    elif case == "ragged_kv_lens":
        kv_lens = torch.tensor([N, N - 548, N // 3, N - 148])
        assert ca.per_sequence(k, kv_lens, None, N)
    eager_mask = mask if kv_lens is None else (torch.arange(N) < kv_lens[:, None])[:, None, None, :]
    weights = case == "weights"

    def run_eager():
        return _eager_softmax_attention(q, k, v) if weights else _eager_sdpa(q, k, v, eager_mask)

    def run_ours():
        return deco_ops.cross_attention(q, k, v, kv_lens=kv_lens, attn_mask=mask, need_weights=weights)

    with torch.no_grad():
        torch.testing.assert_close(run_ours(), run_eager())
        ours, eager = peak_bytes(run_ours), peak_bytes(run_eager)
    with capsys.disabled():
        print(f"\ncross_attention {case} inference peak: ours {ours / 2**10:.0f} KiB, eager {eager / 2**10:.0f} KiB")
    out_bytes = B * M * H * D * 4
    allowed = out_bytes // 16 + (mask.numel() * 4 if case == "full_float_mask" else 0) + (out_bytes // B if kv_lens is not None else 0)
    assert ours <= eager + allowed, (ours, eager, allowed)


@pytest.mark.parametrize("need_weights", [False, True])
def test_cpu_padding_check_warns_nothing_on_inputs_that_require_grad(auto_backend, monkeypatch, need_weights):
    """The CPU padding check reads maxima on the host; with need_weights the call runs as plain
    differentiable ops, so it sees q, k and v requiring grad: no "requires_grad=True to a scalar"
    warning (an error under ``-W error``, as test runners and some training scripts set it)."""
    monkeypatch.setattr(ca, "_CHECKED_FROM", 0)  # the check at this small size too
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=g).requires_grad_(True) for s in ((2, 3, 2, 8), (2, 11, 2, 8), (2, 11, 2, 8)))
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # the warning is torch's once-per-process kind: an earlier test may have used it up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = deco_ops.cross_attention(q, k, v, kv_lens=torch.tensor([11, 4]), need_weights=need_weights)
            (out[0] if need_weights else out).sum().backward()
    finally:
        torch.set_warn_always(always)
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
