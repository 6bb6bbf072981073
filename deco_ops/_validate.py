"""Argument checks shared by every public op. Each raises ValueError/TypeError naming the
argument, before anything is launched."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_ONLY_DTYPES = (torch.float64,)


def positive_int(name: str, value, minimum: int = 1) -> int:
    """A size argument: an integer (numpy's too, as ``nn`` modules take them; not a bool) of at
    least ``minimum``, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


tracing_state = torch._C._get_tracing_state  # None outside ``torch.jit.trace``


def not_traced(name: str) -> None:
    """Refuses a call that reads ``name``'s values on the host (grids, key offsets: they size the
    launch) while a whole-graph recorder runs: under ``torch.jit.trace`` the trace would keep this
    call's values as constants and replay them for any other (a silent wrong answer); under
    ``torch.export`` the values are data-dependent symbols, and PyTorch's own error names a
    comparison inside deco_ops instead of the argument. ``torch.compile`` breaks the graph here,
    before the host read, and runs it eagerly; under ``fullgraph=True`` the break is the error, and
    it says why (the read itself failed on a data-dependent guard inside deco_ops)."""
    if tracing_state() is not None:
        raise RuntimeError(
            f"torch.jit.trace cannot record {name}: deco_ops reads its values on the host (they size the launch), "
            f"so a trace would replay this call's {name} for every other. Call this op outside the traced code, "
            "or use torch.compile (the host read is a graph break there)")
    if _exporting():
        raise RuntimeError(
            f"torch.export cannot record {name}: deco_ops reads its values on the host (they size the launch), "
            "and an exported graph has no host reads. Export the model around this op (call it outside the "
            "exported module), or use torch.compile without fullgraph (the host read is a graph break there)")
    if torch.compiler.is_compiling():
        why = (f"deco_ops reads the values of {name} on the host (they size the launch), so torch.compile(fullgraph=True) "
               "cannot trace this call: compile without fullgraph (the graph breaks here) or call this op outside the "
               "compiled code")
        torch._dynamo.graph_break(msg=why)


def _exporting_flag() -> bool:
    return torch.compiler._is_exporting_flag


# ``torch.compiler.is_exporting()``, also while dynamo traces. Before torch 2.13 dynamo folded that call to
# True while tracing anything, ``torch.compile`` included (pytorch/pytorch#176347, fixed by #176499), so a
# packed call under ``torch.compile(fullgraph=True)`` was refused as ``torch.export``'s (found on torch 2.10
# and 2.11, the GPU machines' version). There read the flag it returns in eager: ``torch.export`` sets it,
# strict and non-strict, and dynamo reads a module attribute at trace time. Bound once: no extra call.
_exporting = (_exporting_flag if torch.__version__ < "2.13" and hasattr(torch.compiler, "_is_exporting_flag")
              else torch.compiler.is_exporting)


def tensor(name: str, value, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided or value.is_nested:  # the kernels and the plans index strided memory
        kind = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def floating(name: str, value: torch.Tensor, use_triton: bool) -> None:
    allowed = FLOAT_DTYPES if use_triton else FLOAT_DTYPES + REFERENCE_ONLY_DTYPES
    if value.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} has dtype {value.dtype}; supported here: {names}")


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def dtype_under_autocast(t: torch.Tensor) -> torch.dtype:
    """The dtype an op that runs in the autocast dtype (``deco_ops._autocast.LOWER_PRECISION``)
    computes ``t`` in: inside ``torch.autocast`` for ``t``'s device, floating tensors other than
    float64 are cast to the autocast dtype (as for ``nn.Linear``); elsewhere ``t.dtype``."""
    dtype = t.dtype
    if dtype is torch.float64 or not t.is_floating_point():
        return dtype
    device_type = "cuda" if t.is_cuda else "cpu" if t.is_cpu else None  # AUTOCAST_DEVICE_TYPES, without a device object
    if device_type is not None and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def norm_dtype_under_autocast(t: torch.Tensor) -> torch.dtype:
    """The dtype a norm in front of a GEMM (``merge_mlp``'s tokens and the norm's parameters)
    computes ``t`` in: float32 inside ``torch.autocast`` for ``t``'s device (whatever the region's
    dtype, and for a tensor already in it), as autocast runs ``F.layer_norm``; elsewhere, and for
    float64, ``t.dtype``. Not on any per-call path but ``merge_mlp``'s inside a region."""
    if dtype_under_autocast(t) is not t.dtype:
        return torch.float32
    # t may be in the region's dtype already (no cast, the same answer): the region itself then
    in_region = t.dtype is not torch.float64 and t.is_floating_point() and (
        t.is_cuda and torch.is_autocast_enabled("cuda") or t.is_cpu and torch.is_autocast_enabled("cpu"))
    return torch.float32 if in_region else t.dtype


def same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """The tensors of one GEMM/attention op agree in dtype once autocast has cast them: inside
    ``torch.autocast`` fp32 weights may meet bf16 tokens; outside, dtypes must be equal."""
    want = dtype_under_autocast(reference)
    for name, value in others.items():
        if value is not None and dtype_under_autocast(value) != want:
            if value.device != reference.device:  # autocast casts per device: it is the devices that differ
                same_device(reference_name, reference, **{name: value})
            raise TypeError(f"{name} has dtype {value.dtype} but {reference_name} has {reference.dtype}; cast them to one dtype")


def same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def grid(name: str, value) -> tuple[int, ...]:
    """A 2D (H, W) or 3D (T, H, W) grid of positive ints (numpy's too, as ``positive_int`` takes them), as Python ints."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a tuple of 2 or 3 ints, got {value!r}")
    if len(value) not in (2, 3):
        raise ValueError(f"{name} must have 2 (H, W) or 3 (T, H, W) entries, got {tuple(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} entries must be ints, got {tuple(value)}")
        if v < 1:
            raise ValueError(f"{name} entries must be >= 1, got {tuple(value)}")
        out.append(int(v))
    positions = math.prod(out)
    if positions >= 2**31:  # as the packed ops' tables: the kernels' and ATen's per-image indices
        raise ValueError(f"{name} {tuple(out)} has {positions} positions; at most 2**31 - 1 per image")
    return tuple(out)


def grids(grid_value, out_grid_value) -> tuple[tuple[int, ...], tuple[int, ...]]:
    g = grid("grid", grid_value)
    o = grid("out_grid", out_grid_value)
    if len(g) != len(o):
        raise ValueError(f"out_grid {o} must have as many entries as grid {g}")
    return g, o


def tokens(x: torch.Tensor, g: tuple[int, ...]) -> None:
    expected = math.prod(g)
    if x.shape[1] != expected:
        raise ValueError(
            f"x has {x.shape[1]} tokens but grid {g} needs {expected}; if x carries prefix (CLS) tokens, "
            f"drop them first (x[:, k:]) or use DeCoProjector(num_prefix_tokens=k)"
        )


def linear(w_name: str, w, b_name: str, b, in_features: int, in_name: str) -> None:
    tensor(w_name, w, 2)
    if w.shape[1] != in_features:
        raise ValueError(f"{w_name} has shape {tuple(w.shape)}: its in_features {w.shape[1]} must equal {in_name} = {in_features}")
    if b is not None:
        tensor(b_name, b, 1)
        if b.shape[0] != w.shape[0]:
            raise ValueError(f"{b_name} has shape {tuple(b.shape)} but {w_name} has {w.shape[0]} output features")


def activation(value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"activation must be one of {tuple(choices)}, got {value!r}")
    return value
