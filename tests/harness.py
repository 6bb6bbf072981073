"""Shared test harness: float64 references, per-dtype tolerances, NaN-poisoned outputs and
NaN guard bands around inputs.

* ``guarded(t)`` returns a copy of ``t`` living inside a larger NaN-filled buffer (with padding
  before, after and between rows), so any read out of bounds turns the result into NaN.
* ``poisoned_empty`` patches ``torch.empty``/``torch.empty_like`` inside a ``with`` block to
  hand out NaN-filled memory, so an output element a kernel forgets to write stays NaN.
* ``assert_close(out, ref, dtype)`` compares ``||out - ref|| / ||ref||`` against ``TOL[dtype]``,
  bounds every element's error as well (``ELEMENT_FACTOR``), and fails on any NaN/Inf that the
  reference does not have.
* ``DEVICE`` is the one switch for where the suite runs: CUDA when a GPU is present (compiled
  kernels), else the CPU (Triton's interpreter). ``conftest.py`` makes it the default device, so
  every tensor a test creates follows it; draws from the (CPU) generators the tests seed are made
  on the CPU, then moved (``randn``, ``randint``, and ``SeededDrawsFollowDevice`` for direct
  ``torch.randn(..., generator=g)`` calls), so a seed gives the same data on either device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._device import _device_constructors

TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Per element: |out - ref| <= ELEMENT_FACTOR * limit * (|ref| + rms(ref)), with ``limit`` the norm
# bound. A norm bound alone lets one wrong element through: among 2,700 elements a bf16 result may
# hold one element off by its whole size and still pass 2e-2. Rounding spreads over the elements,
# so an element's error stays within a few times the norm error of a whole tensor (the max of
# thousands of draws, ~4-5 sigma) plus its own rounding; 8x leaves that room, and still catches an
# element off by 20% of the tensor's rms in bf16 (4% in fp16).
ELEMENT_FACTOR = 8.0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def suite_env(device: torch.device) -> dict[str, str]:
    """Environment defaults of a test run on ``device``. On CUDA: one fixed config per kernel,
    never timed (hundreds of test shapes must not each autotune); the fused kernels, as under the
    interpreter (``auto`` would time both strategies at every new shape, so launch counts and the
    path tested would depend on the GPU's timings; the strategy tests choose their own); and the
    value checks that are off there by default (``deco_ops._checks``) on, so the bad-input tests
    hold on both devices."""
    if device.type != "cuda":
        return {}
    return {"DECO_OPS_AUTOTUNE": "0", "DECO_OPS_STRATEGY": "fused", "DECO_OPS_CHECKS": "1"}


def skip_reason(device: torch.device, backend: str | None, interpreter_only: bool) -> str | None:
    """Why a test case does not run on ``device``, or None."""
    if device.type != "cuda":
        return None
    if interpreter_only:
        return "checks the Triton interpreter path (e.g. float64 kernels), which CUDA does not have"
    if backend == "auto":
        return "on CUDA tensors the default backend is the Triton one: covered by [triton]"
    return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    what: str = "output",
    tol: float | None = None,
    eager: torch.Tensor | None = None,
    eager_factor: float = 2.0,
    tighten: bool = False,
) -> None:
    """``||out - ref|| / ||ref|| <= TOL[dtype]`` (or ``tol``), and with ``eager`` (the same
    computation by eager PyTorch in ``dtype``) a bound of ``eager_factor`` times eager's own error:

    * ``tighten=False``: the bound is widened to it (``max``): tiny, ill-conditioned fuzzed cases
      (one element near a root of GELU') are judged against what PyTorch itself achieves in that
      dtype, never looser than the dtype tolerance otherwise.
    * ``tighten=True``: both bounds hold (``min``): at real reduction lengths (K >= 1024) a fixed
      dtype bound hides a per-step rounding bug that eager's own error exposes.

    Every element is held to ``ELEMENT_FACTOR`` times the same bound, relative to its own size plus
    the reference's rms, or to eager's worst element where that is larger
    (``_assert_each_element_close``)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    bad_out = ~torch.isfinite(out.double())
    bad_ref = ~torch.isfinite(ref.double())
    assert torch.equal(bad_out, bad_ref), f"{what}: {int((bad_out & ~bad_ref).sum())} non-finite values where the reference is finite"
    finite = ~bad_ref
    err = rel_err(out.double()[finite], ref.double()[finite])
    limit = TOL[dtype] if tol is None else tol
    if eager is not None:
        eager_err = rel_err(eager.double()[finite], ref.double()[finite])
        limit = (min if tighten else max)(limit, eager_factor * eager_err)
        assert err <= limit, (f"{what}: relative error {err:.3e} > {limit:.1e} ({dtype}; eager PyTorch's own "
                              f"{eager_err:.3e}, {err / max(eager_err, 1e-300):.2f}x)")
    assert err <= limit, f"{what}: relative error {err:.3e} > {limit:.1e} ({dtype})"
    _assert_each_element_close(out.double()[finite], ref.double()[finite], limit,
                               None if eager is None else eager.double()[finite], what, dtype)


def assert_rounded_once(out: torch.Tensor, ref: torch.Tensor, what: str, share: float = 0.02) -> None:
    """All but ``share`` of the 16-bit ``out`` equal the float64 ``ref`` rounded to ``out``'s dtype: a
    result computed in fp32 and rounded once differs only at a near tie, one rounded twice (an
    intermediate rounded to 16 bits first) in a quarter or more of its elements by an ulp, which no
    relative tolerance sees."""
    off = (out != ref.to(out.dtype)).float().mean().item()
    assert off <= share, f"{what}: {off:.1%} of the outputs are not the float64 value rounded once"


def _assert_each_element_close(out: torch.Tensor, ref: torch.Tensor, limit: float, eager: torch.Tensor | None,
                               what: str, dtype: torch.dtype) -> None:
    """``|out - ref| <= ELEMENT_FACTOR * max(limit * (|ref| + rms(ref)), eager_worst)`` for every
    element (the rms as 1 where the reference is all zeros, as ``rel_err`` then compares absolute
    errors; ``eager_worst``: eager PyTorch's largest error on one element, so an ill-conditioned
    element is judged against what PyTorch achieves on its worst one)."""
    if ref.numel() == 0:
        return
    eager_worst = 0.0 if eager is None else (eager - ref).abs().max().item()
    rms = ref.norm().item() / ref.numel() ** 0.5
    scale = rms if rms > 0 else 1.0
    excess = (out - ref).abs() / (ELEMENT_FACTOR * torch.clamp(limit * (ref.abs() + scale), min=eager_worst))
    worst = int(excess.argmax())
    assert excess[worst] <= 1, (
        f"{what}: element {worst} is {out[worst].item():.6g} where the reference is {ref[worst].item():.6g} "
        f"(error {abs(out[worst] - ref[worst]).item():.3e}, {excess[worst].item():.1f}x the per-element bound "
        f"{ELEMENT_FACTOR:g} * max({limit:.1e} * (|ref| + rms {rms:.3e}), eager's worst {eager_worst:.1e}); {dtype})")


def guarded(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """A copy of ``t`` (same values, same shape) that is a strided view into a NaN-filled buffer:
    ``pad`` NaNs before and after and between consecutive rows of the last dimension."""
    if t.dim() == 0:
        return t.clone()
    *lead, last = t.shape
    rows = 1
    for s in lead:
        rows *= s
    buf = torch.full((pad + rows * (last + pad) + pad,), float("nan"), dtype=t.dtype, device=t.device)
    body = buf[pad: pad + rows * (last + pad)].view(rows, last + pad)[:, :last]
    body.copy_(t.reshape(rows, last))
    return body.view(*lead, last) if lead else body.view(last)



def guarded_strided(t: torch.Tensor) -> torch.Tensor:
    """``guarded(t)``, and a vector (a bias, a norm's weight) at stride 4 in it: NaNs between its
    elements, so a kernel that reads one as contiguous reads NaN."""
    return guarded(t[:, None]).squeeze(1) if t.dim() == 1 else guarded(t)


def head_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (..., H, D) whose last dim is not unit-stride (stride H + 3: a transposed
    (..., D, H) tensor's view), inside a NaN-filled buffer (``guarded``)."""
    return guarded(t.transpose(-1, -2)).transpose(-1, -2)

@contextlib.contextmanager
def poisoned_empty():
    """Inside the block, torch.empty / empty_like / new_empty return NaN-filled floating tensors."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: fill(real_new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_empty_like, real_new_empty


class SeededDrawsFollowDevice(TorchFunctionMode):
    """Under ``torch.set_default_device(DEVICE)``, a factory call given a generator of another
    device (the CPU generators the tests seed) draws on the generator's device, then moves the
    result to the default device, instead of raising: tests written for the CPU run on CUDA as
    they are, with the same data."""

    def __init__(self):
        super().__init__()
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if func in self.constructors and generator is not None and kwargs.get("device") is None:
            return func(*args, **{**kwargs, "device": generator.device}).to(torch.get_default_device())
        return func(*args, **kwargs)


def randn(*shape, dtype=torch.float32, scale: float = 1.0, generator=None) -> torch.Tensor:
    """Normal draws in float64 on ``generator``'s device, scaled, cast, on ``DEVICE``."""
    draws = torch.randn(*shape, dtype=torch.float64, generator=generator,
                        device=generator.device if generator is not None else DEVICE)
    return (draws * scale).to(device=DEVICE, dtype=dtype)


def randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    """Uniform integers on ``generator``'s device, on ``DEVICE``."""
    return torch.randint(low, high, shape, generator=generator, dtype=dtype, device=generator.device).to(DEVICE)


class Calls(torch.nn.Module):
    """A module whose forward is ``fn`` (what ``torch.export`` takes of a plain function)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def leaf(t: torch.Tensor | None, dtype=None) -> torch.Tensor | None:
    """A fresh leaf requiring grad (optionally cast), or None."""
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def saved_bytes(fn, params) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs; tensors sharing storage with a
    parameter (weights and their transposed views) are excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn, device: torch.device = DEVICE) -> int:
    """The most bytes ``device``'s allocator held at once while ``fn()`` ran, above what it held
    when ``fn`` started; ``fn``'s result is dropped inside the measurement, so what it returns
    counts at the peak only. ``fn`` runs once first, unmeasured (its plan, the tile tuning).
    On CUDA, the caching allocator's peak statistic. On the CPU, which keeps none, the profiler's
    raw memory records: every allocation and free with its time, summed in the order they happened
    (its per-op summaries will not do: a free inside a Python-level event, a custom Function's
    backward, is booked at the event's start, before the allocations it follows). The call takes
    its normal path either way (no dispatch mode: a plain eager call stays plain)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        del out
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return peak


def training_step(forward: Callable[[], torch.Tensor], dy: torch.Tensor, leaves) -> Callable[[], None]:
    """A training step for ``peak_bytes``: ``forward().backward(dy)``, then every leaf's gradient
    unset, as ``optimizer.zero_grad()`` leaves them (so each measured step starts without them)."""

    def step():
        forward().backward(dy)
        for t in leaves:
            t.grad = None

    return step


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing (as profilers' and debuggers' modes, a FLOP counter):
    under it a call is not plain eager and goes through ``torch.ops.deco``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
