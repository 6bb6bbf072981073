"""Packed ragged batches: many images, each with its own (H, W) or (T, H, W) grid, back to back.

``x`` is ``(total_tokens, C)`` (LLaVA-NeXT AnyRes tiles, MiniCPM-V slices, native-resolution
encoders, videos), ``grids`` an int tensor ``(num_images, 2 | 3)``. Each image is resampled to its
own ``out_grids[i]`` (or ``ceil(grid / stride)``) and the outputs are packed back to back, with
``cu_seqlens`` (int32, ``num_images + 1``, FlashAttention's convention) marking where each begins.
Every stage is one kernel launch for the whole batch, with no padding.

Two resampling modes: ``"average"`` (adaptive average pooling, ``F.adaptive_avg_pool2d/3d``) and
``"bilinear"`` (``F.interpolate(mode="bilinear"`` for 2D grids, ``"trilinear"`` for 3D,
``align_corners=False, antialias=False)``, LLaVA-OneVision's down-sampling).

Host sync: output sizes depend on the grid values, so the public functions read ``grids`` (and
``out_grids``) to the host once per call (``Tensor.tolist()``: a device-to-host copy and a stream
sync when they live on the GPU; pass them as CPU tensors to avoid it). The per-image geometry table
then goes back to the device through pinned memory without blocking. The custom ops themselves take
the geometry as a tensor plus the output size as an int, so they never sync.

``pool_mlp_packed`` has a composed twin (the packed pooling kernel, then ``F.linear``), chosen by
``deco_ops.strategy`` as for the dense projectors.

Registered ops (each one's autograd formula is the other, or the fused MLP backward):
``deco::pool_tokens_packed``, ``deco::unpool_tokens_packed``, ``deco::pool_mlp_packed``.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch._C import _nn

from . import _autocast, _backend, _plan, _validate, composed, reference, strategy
from ._direct import Op, custom_op, deco, register_autograd
from ._transfer import refuse_capture, to_device
from .kernels import packed_pool, pool_gemm
from .kernels._traceable import tracing
from ._plan import needs_residuals
from .projector import ACTIVATIONS, add_grads, mlp_backward

MODES = ("average", "bilinear")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# validation and geometry


def check_mode(value) -> str:
    if not isinstance(value, str) or value not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {value!r}")
    return value


def _grid_table(name: str, value, ndim: int | None = None) -> list[tuple[int, ...]]:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int torch.Tensor of shape (num_images, 2) or (num_images, 3), got {type(value).__name__}")
    if value.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.dim() != 2 or value.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (num_images, 2) or (num_images, 3), got {tuple(value.shape)}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, got shape {tuple(value.shape)}")
    if ndim is not None and value.shape[1] != ndim:
        raise ValueError(f"{name} has {value.shape[1]} columns but grids has {ndim}; they must match")
    if value.device.type == "meta":
        raise ValueError(f"{name} must hold its values (a CPU or GPU tensor), got a tensor on the meta device")
    _validate.not_traced(name)  # a traced call is not plain (``_plan``): it has no plan and comes here
    rows = [tuple(int(v) for v in r) for r in value.tolist()]  # the one host read (sync if on GPU)
    for i, r in enumerate(rows):
        if min(r) < 1:
            raise ValueError(f"{name}[{i}] = {r}: entries must be >= 1")
    return rows


def _stride(value, ndim: int) -> tuple[int, ...]:
    """``stride``: an int or one per grid axis (numpy's ints too), as a tuple of Python ints."""
    entries = (value,) * ndim if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(entries, torch.Tensor) or not isinstance(entries, (tuple, list)) or len(entries) != ndim:
        raise ValueError(f"stride must be an int or a tuple of {ndim} ints (one per grid axis), got {value!r}")
    for v in entries:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"stride entries must be ints, got {value!r}")
        if v < 1:
            raise ValueError(f"stride entries must be >= 1, got {value!r}")
    return tuple(int(v) for v in entries)


def as_3d(g) -> tuple[int, int, int]:
    return tuple(g) if len(g) == 3 else (1, *g)


class Packing:
    """Parsed host-side description of a packed batch (grids as tuples, sizes, geometry table)."""

    def __init__(self, grids: list[tuple[int, ...]], out_grids: list[tuple[int, ...]]):
        self.grids, self.out_grids = grids, out_grids
        self.tokens = [math.prod(g) for g in grids]
        self.outs = [math.prod(o) for o in out_grids]
        self.num_tokens, self.num_out = sum(self.tokens), sum(self.outs)
        if max(self.num_tokens, self.num_out) >= 2**31:
            raise ValueError(f"packed batches are limited to 2**31 - 1 tokens and outputs: grids give {self.num_tokens} "
                             f"tokens, out_grids {self.num_out} outputs")
        rows, tok0, row0 = [], 0, 0
        for g, o, n, p in zip(grids, out_grids, self.tokens, self.outs):
            rows.append([*as_3d(g), *as_3d(o), tok0, row0])
            tok0, row0 = tok0 + n, row0 + p
        # on the host whatever a ``torch.device`` context makes the default (a plan keeps them)
        self.geometry = torch.tensor(rows, dtype=torch.int32, device="cpu").reshape(-1, packed_pool.GEOMETRY_FIELDS)
        self.cu_seqlens = torch.tensor([0, *itertools.accumulate(self.outs)], dtype=torch.int32, device="cpu")


def parse(x, grids, out_grids, stride) -> Packing:
    """Validates a packed call (x already checked to be 2D); reads grids to the host once."""
    g = _grid_table("grids", grids)
    ndim = len(g[0])
    if (out_grids is None) == (stride is None):
        raise ValueError("pass exactly one of out_grids (per-image output grids) or stride (out = ceil(grid / stride))")
    if out_grids is not None:
        o = _grid_table("out_grids", out_grids, ndim)
        if len(o) != len(g):
            raise ValueError(f"out_grids has {len(o)} rows but grids has {len(g)} images")
    else:
        s = _stride(stride, ndim)
        o = [tuple(-(-a // b) for a, b in zip(r, s)) for r in g]
    packing = Packing(g, o)
    if x.shape[0] != packing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but grids need sum(prod(grids)) = {packing.num_tokens}")
    return packing


# ----------------------------------------------------------------------------------------------
# plans of packed calls: keyed on the grid tables' values too


def _tables_key(tables: tuple) -> tuple | None:
    """The values of a call's grid tables (``grids``, ``out_grids``) as part of a plan's key: rows
    of ints, read to the host once (a sync where a table lives on the GPU, as the full path's read;
    a planned call reads them nowhere else); False for no table (``out_grids`` where a stride is
    given). None where a table is no plain integer tensor of rows: the call takes the full path,
    which reads them on every call and says what is wrong. One frame for the tables, and no call
    but the reads' (every op call on a packed batch pays this)."""
    keys = ()
    for value in tables:
        if value is None:
            keys += (False,)
            continue
        if value.__class__ is not torch.Tensor or value.dtype not in _INT_DTYPES:
            return None
        if value.is_cuda:  # reading grids on the GPU syncs: never inside a capture (PyTorch's own error says less)
            refuse_capture()
        try:
            keys += (tuple(map(tuple, value.tolist())),)
        except (TypeError, RuntimeError, NotImplementedError):  # no rows (a 1D table), a meta tensor
            return None
    return keys


class PackedPlans:
    """``_plan.Plans`` for an op over a packed batch, ``get(tables, *args)``: keyed on the call's
    signature (``args``) and on the values of its grid ``tables`` (they size the launch: they give
    the geometry table, the output rows and ``cu_seqlens``). A plan holds those host tables (CPU
    tensors built from the values, none of the call's inputs; ``cu_seqlens`` last in the plan's
    tuple); a planned call skips the checks, the parsing and the building of the tables, and still
    copies them to the device as the full path does (``device_tables``). Every batch layout is a
    signature: a workload whose layouts never repeat builds a plan per call (the full path's work,
    plus a dictionary entry)."""

    def __init__(self, build: Callable[..., tuple]):
        self.plans = _plan.Plans(lambda tables, *args: build(*args))

    def get(self, tables: tuple, *args) -> tuple | None:
        """The plan, with a copy of its ``cu_seqlens`` (the caller returns it to the user, who may
        write to it); None for a call that takes the full path."""
        if torch.compiler.is_compiling():  # no plan (``_plan.signature``), and the full path reads the tables
            return None
        keys = _tables_key(tables)
        if keys is None:  # values that cannot key a plan (an integer Parameter, a 1D table): the full path reads
            return None  # them on every call
        plan = self.plans.get(keys, *args)
        return None if plan is None else (*plan[:-1], plan[-1].clone())


def device_tables(geometry: torch.Tensor | None, cu_seqlens: torch.Tensor,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A packed call's host tables (CPU tensors: the geometry table, if any, and cu_seqlens) on
    ``device`` (``to_device``: pinned, non-blocking). On a GPU a new copy of the geometry per call
    (so its image index is built per call, as before plans): a plan holding a device copy would let
    a CUDA graph capture the call, and a replay after the plan is dropped read freed memory."""
    if device.type == "cpu":
        return geometry, cu_seqlens
    return device_geometry(geometry, device), to_device(cu_seqlens, device)


def device_geometry(geometry: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The host geometry table (or None) on ``device``: also what a plan's strategy measurement
    runs the candidates with (the kernels read it; a CPU table on a GPU is an invalid pointer). For
    ``device`` meta the host table itself: only the PyTorch path runs meta tensors, and it reads the
    table's values on the host (a meta copy has none), as a dense meta batch's table is built there
    (``_geometry_by_tensor_ops``)."""
    return geometry if geometry is None or device.type in ("cpu", "meta") else to_device(geometry, device)


# Images per cached dense geometry table: 128 KiB of int32 per (grid, out_grid, device).
DENSE_GEOMETRY_CAPACITY = 4096


def _capacity(grid: tuple[int, ...], out_grid: tuple[int, ...]) -> int:
    """Images the cached table holds: its int32 token/row offsets must not overflow."""
    return min(DENSE_GEOMETRY_CAPACITY, (2**31 - 1) // max(math.prod(grid), math.prod(out_grid)))


@functools.lru_cache(maxsize=256)
def _dense_geometry_view(grid: tuple[int, ...], out_grid: tuple[int, ...], batch: int, device: torch.device) -> torch.Tensor:
    view = packed_pool.dense_geometry(as_3d(grid), as_3d(out_grid), _capacity(grid, out_grid), device)[:batch]
    # What the PyTorch path would read back from it by a host copy and a comparison of every row
    # (``_images``), known here: kept on the view, which no one writes to.
    if batch:  # no image: the loop over images makes the empty result
        view.dense_images = (batch, list(as_3d(grid)), list(as_3d(out_grid)))
    return view


def _geometry_by_tensor_ops(grid: tuple[int, ...], out_grid: tuple[int, ...], batch, device: torch.device) -> torch.Tensor:
    """``dense_geometry``'s table built by tensor ops in the call's own mode, cached nowhere: under
    ``torch.compile`` / ``torch.export`` a graph of a symbolic batch and grid (slicing a constant
    table pinned the batch size; a constant-result lookup could not take a symbolic grid), under
    FakeTensorMode a fake table (a cached one served later real calls). On the meta device the
    table is built on the CPU, where the PyTorch path reads its values."""
    g, o = as_3d(grid), as_3d(out_grid)
    device = torch.device("cpu") if device.type == "meta" else device
    image = torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    steps = torch.tensor([math.prod(g), math.prod(o)], dtype=torch.int32, device=device)
    return torch.cat([torch.tensor([*g, *o], dtype=torch.int32, device=device).expand(batch, 6), image * steps], 1)


def dense_geometry(grid, out_grid, x: torch.Tensor) -> torch.Tensor:
    """The geometry of the dense (B, N, C) batch ``x`` seen as B packed images of one grid. An
    eager call gets the first B rows of a table built once per (grid, out_grid, device) (the same
    tensor for the same batch, so its index tables are cached too; larger batches than the table
    build their own); a traced call (``torch.compile`` / ``torch.export``, ``x`` a FakeTensor or
    another subclass the kernels' launches call traced, ``tracing``; a profiler's or a kernel
    counter's dispatch mode runs plain tensors; ``torch.jit.trace``, whose graph must record the
    table as ops of the batch size: a cached table is a constant, sliced at its capacity on replay,
    and one built by the first call is not the constant its check's replay finds) or a meta ``x``
    gets one built by tensor ops (``_geometry_by_tensor_ops``)."""
    grid, out_grid = tuple(grid), tuple(out_grid)
    batch, device = x.shape[0], x.device
    if (torch.compiler.is_compiling() or device.type == "meta" or tracing((x,))
            or _validate.tracing_state() is not None):  # torch.jit.trace: recorded, never a cached constant
        return _geometry_by_tensor_ops(grid, out_grid, batch, device)
    if batch > _capacity(grid, out_grid):
        return packed_pool.dense_geometry(as_3d(grid), as_3d(out_grid), batch, device)
    return _dense_geometry_view(grid, out_grid, batch, device)


# ----------------------------------------------------------------------------------------------
# PyTorch reference path (default CPU backend): a loop over images


# ``F.interpolate(img, size=out_grid, mode="bilinear"`` (a 2D grid) or ``"trilinear"`` (3D),
# ``align_corners=False)``, by the ATen functions it calls (with a size and no scale factor its
# Python wrapper only checks arguments), and their backward. A 2D grid through trilinear's kernel
# would read its one frame twice, once with weight 0 (an inf becomes NaN), and round 16-bit
# outputs differently.
def _bilinear(img: torch.Tensor, out_grid) -> torch.Tensor:
    return _nn.upsample_bilinear2d(img, out_grid, False, None)


def _trilinear(img: torch.Tensor, out_grid) -> torch.Tensor:
    return _nn.upsample_trilinear3d(img, out_grid, False, None)


_BILINEAR_BACKWARD = torch.ops.aten.upsample_bilinear2d_backward.default
_TRILINEAR_BACKWARD = torch.ops.aten.upsample_trilinear3d_backward.default


def _images(geometry: torch.Tensor) -> tuple[tuple | None, list]:
    """((batch, grid, out_grid) if a geometry table holds a dense batch: images of one grid and
    out-grid back to back, as ``dense_geometry`` builds them; else None) and the table's rows as
    lists ([] where a ``_dense_geometry_view`` knew the answer: no host copy, no comparison)."""
    known = geometry.__dict__  # read without a call: the packed path pays nothing for the check
    if "dense_images" in known and not geometry._version:
        return known["dense_images"], []
    table = geometry.tolist()
    if not table:  # no image: the loop over images makes the empty result
        return None, table
    first = table[0][:6]
    if table[-1][:6] != first:  # most mixed batches, at once
        return None, table
    n, p = math.prod(first[:3]), math.prod(first[3:])
    dense = table == [[*first, i * n, i * p] for i in range(len(table))]
    return ((len(table), first[:3], first[3:]) if dense else None), table


def _pool_images(x: torch.Tensor, batch: int, grid, out_grid, mode: str) -> torch.Tensor:
    """PyTorch's pooling of ``batch`` images of one grid whose rows lie back to back in ``x``: one
    call on the rows viewed as a channels-last image (no copy). Average pooling is
    ``F.adaptive_avg_pool3d``'s ATen function (its Python wrapper only checks arguments), bilinear
    ``_trilinear``; a 2D grid (T = OT = 1) takes the 2D functions, as the user's code would (2D
    average pooling keeps channels-last: the pooled rows are a view too); 16-bit 3D average pooling
    on the CPU sums in fp32 (``reference.adaptive_avg_pool3d``)."""
    if grid[0] == out_grid[0] == 1:
        grid, out_grid = grid[1:], out_grid[1:]
        resample = _bilinear if mode == "bilinear" else _nn.adaptive_avg_pool2d
    else:
        resample = _trilinear if mode == "bilinear" else reference.adaptive_avg_pool3d
    C = x.shape[1]
    if C == 0:  # an empty hidden layer: ATen's pooling and resampling reject images of no channel
        return x.new_zeros((batch * math.prod(out_grid), 0))
    return resample(x.reshape(batch, *grid, C).movedim(-1, 1), out_grid).movedim(1, -1).reshape(-1, C)


def reference_pool(x: torch.Tensor, geometry: torch.Tensor, num_out: int, mode: str) -> torch.Tensor:
    """PyTorch's pooling of each image; a dense batch's images in one call (each output element
    still reads its own image's window)."""
    dense, table = _images(geometry)
    if dense:
        return _pool_images(x, *dense, mode)
    out = x.new_empty((num_out, x.shape[1]))
    for T, H, W, OT, OH, OW, tok0, row0 in table:
        out[row0: row0 + OT * OH * OW] = _pool_images(x[tok0: tok0 + T * H * W], 1, (T, H, W), (OT, OH, OW), mode)
    return out


def _unpool_images(grad: torch.Tensor, batch: int, grid, out_grid, mode: str) -> torch.Tensor:
    """The gradient of ``_pool_images`` w.r.t. its rows, by PyTorch's own backward: one call on
    the gradient rows viewed as a channels-last image, as the forward pools; average un-pooling is
    ``reference.unpool_tokens`` (2D for a 2D grid, whose gradient comes back as rows without a
    copy)."""
    C = grad.shape[1]
    if C == 0:  # an empty hidden layer (``_pool_images``)
        return grad.new_zeros((batch * math.prod(grid), 0))
    flat = grid[0] == out_grid[0] == 1
    if flat:
        grid, out_grid = grid[1:], out_grid[1:]
    if mode == "bilinear":
        image = grad.reshape(batch, *out_grid, C).movedim(-1, 1)
        backward = _BILINEAR_BACKWARD if flat else _TRILINEAR_BACKWARD
        return backward(image, list(out_grid), [batch, C, *grid], False).movedim(1, -1).reshape(-1, C)
    return reference.unpool_tokens(grad.reshape(batch, -1, C), grid, out_grid).reshape(-1, C)


def reference_unpool(grad: torch.Tensor, geometry: torch.Tensor, num_tokens: int, mode: str) -> torch.Tensor:
    """PyTorch's un-pooling of each image (``reference_pool``'s gradient); a dense batch's images
    in one call."""
    dense, table = _images(geometry)
    if dense:
        return _unpool_images(grad, *dense, mode).contiguous()
    dx = grad.new_empty((num_tokens, grad.shape[1]))
    for T, H, W, OT, OH, OW, tok0, row0 in table:
        dx[tok0: tok0 + T * H * W] = _unpool_images(grad[row0: row0 + OT * OH * OW], 1, (T, H, W), (OT, OH, OW), mode)
    return dx


# ----------------------------------------------------------------------------------------------
# pooling ops


def pool_implementation(x, geometry, num_out, mode) -> Callable:
    """The function that runs ``deco::pool_tokens_packed`` on these arguments (the backend's)."""
    return packed_pool.pool_packed if _backend.use_triton(x.device) else reference_pool


@custom_op("pool_tokens_packed")
def _pool(x: torch.Tensor, geometry: torch.Tensor, num_out: int, mode: str) -> torch.Tensor:
    return pool_implementation(x, geometry, num_out, mode)(x, geometry, num_out, mode)


@_pool.register_fake
def _(x, geometry, num_out, mode):
    return x.new_empty((num_out, x.shape[1]))


def unpool_implementation(grad, geometry, num_tokens, mode) -> Callable:
    """The function that runs ``deco::unpool_tokens_packed`` on these arguments (the backend's)."""
    return packed_pool.unpool_packed if _backend.use_triton(grad.device) else reference_unpool


@custom_op("unpool_tokens_packed", plan=unpool_implementation)
def _unpool(grad: torch.Tensor, geometry: torch.Tensor, num_tokens: int, mode: str) -> torch.Tensor:
    return unpool_implementation(grad, geometry, num_tokens, mode)(grad, geometry, num_tokens, mode)


@_unpool.register_fake
def _(grad, geometry, num_tokens, mode):
    return grad.new_empty((num_tokens, grad.shape[1]))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.size, ctx.mode = inputs[0].shape[0], inputs[3]
    ctx.set_materialize_grads(False)


def _pool_backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    (geometry,) = ctx.saved_tensors
    return deco.unpool_tokens_packed(grad, geometry, ctx.size, ctx.mode), None, None, None


def _unpool_backward(ctx, grad):
    if grad is None:
        return None, None, None, None
    (geometry,) = ctx.saved_tensors
    return deco.pool_tokens_packed(grad, geometry, ctx.size, ctx.mode), None, None, None


register_autograd(_pool, _pool_backward, _setup)
register_autograd(_unpool, _unpool_backward, _setup)


def check_tokens(x) -> None:
    _validate.tensor("x", x, 2)
    _validate.floating("x", x, _backend.use_triton(x.device))


def _resample_checked(x, grids, out_grids, stride) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Every check of the packed pooling ops: the batch's host tables (``Packing``)."""
    check_tokens(x)
    packing = parse(x, grids, out_grids, stride)
    return packing.geometry, packing.num_out, packing.cu_seqlens


def _resample_plan(x, grids, out_grids, stride, resample_mode) -> tuple:
    """A plain eager call's plan: (what runs it, the geometry table, output rows, cu_seqlens)."""
    tables = _resample_checked(x, grids, out_grids, stride)
    records = torch.is_grad_enabled() and x.requires_grad
    args = (x, tables[0], tables[1], resample_mode)  # the backend's choice: nothing runs on the table
    return _plan.runner(deco.pool_tokens_packed, pool_implementation, args, records), *tables


_resample_plans = PackedPlans(_resample_plan)


def _resample_packed(x, grids, out_grids, stride, resample_mode):
    plan = _resample_plans.get((grids, out_grids), x, grids, out_grids, stride, resample_mode)
    if plan is None:
        out = _autocast.plain_call(_resample_packed, "pool_tokens_packed", (x, grids, out_grids, stride, resample_mode))
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.pool_tokens_packed, *_resample_checked(x, grids, out_grids, stride))
    run, geometry, num_out, cu_seqlens = plan
    geometry, cu_seqlens = device_tables(geometry, cu_seqlens, x.device)
    return run(x, geometry, num_out, resample_mode), cu_seqlens


def adaptive_avg_pool_tokens_packed(x: torch.Tensor, grids: torch.Tensor, *, out_grids: torch.Tensor | None = None, stride=None):
    """Adaptive average pooling of a packed ragged batch, one launch for all images.

    Args:
        x: ``(total_tokens, C)``, the images' tokens back to back, each in row-major grid order.
        grids: int tensor ``(num_images, 2)`` ``(H, W)`` or ``(num_images, 3)`` ``(T, H, W)``.
        out_grids: int tensor shaped like ``grids``, or None with ``stride``.
        stride: int or per-axis tuple: ``out_grids = ceil(grids / stride)``.

    Returns:
        ``(y, cu_seqlens)``: ``y`` ``(sum(prod(out_grids)), C)`` equal to a loop of
        ``adaptive_avg_pool_tokens`` over the images, concatenated; ``cu_seqlens`` int32
        ``(num_images + 1,)`` offsets of each image's rows in ``y``.
    """
    return _resample_packed(x, grids, out_grids, stride, "average")


def bilinear_pool_tokens_packed(x: torch.Tensor, grids: torch.Tensor, *, out_grids: torch.Tensor | None = None, stride=None):
    """As ``adaptive_avg_pool_tokens_packed`` with bilinear (trilinear for 3D grids) resampling,
    ``F.interpolate(..., align_corners=False, antialias=False)`` per image."""
    return _resample_packed(x, grids, out_grids, stride, "bilinear")


def bilinear_pool_tokens(x: torch.Tensor, grid, out_grid) -> torch.Tensor:
    """``F.interpolate(mode="bilinear"`` (2D grid) or ``"trilinear"`` (3D), ``align_corners=False)``
    on a dense ``(B, prod(grid), C)`` token grid -> ``(B, prod(out_grid), C)``, with its backward."""
    plan = _bilinear_plans.get(x, grid, out_grid)
    if plan is None:
        out = _autocast.plain_call(bilinear_pool_tokens, "pool_tokens_packed", (x, grid, out_grid))
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.pool_tokens_packed, *_bilinear_checked(x, grid, out_grid))
    run, geometry, P = plan
    B, N, C = x.shape
    return run(x.reshape(B * N, C), geometry, B * P, "bilinear").view(B, P, C)


def _bilinear_checked(x, grid, out_grid) -> tuple[torch.Tensor, int]:
    """Every check of ``bilinear_pool_tokens``: (the batch's geometry table, pooled rows per image)."""
    _validate.tensor("x", x, 3)
    _validate.floating("x", x, _backend.use_triton(x.device))
    g, o = _validate.grids(grid, out_grid)
    _validate.tokens(x, g)
    return dense_geometry(g, o, x), math.prod(o)


def _bilinear_plan(x, grid, out_grid) -> tuple:
    """A plain eager call's plan: (what runs it, the geometry table, pooled rows per image)."""
    geometry, P = _bilinear_checked(x, grid, out_grid)
    B, N, C = x.shape
    records = torch.is_grad_enabled() and x.requires_grad
    args = (x.reshape(B * N, C), geometry, B * P, "bilinear")
    return _plan.runner(deco.pool_tokens_packed, pool_implementation, args, records), geometry, P


_bilinear_plans = _plan.Plans(_bilinear_plan)


# ----------------------------------------------------------------------------------------------
# pool -> Linear -> activation -> Linear over a packed batch


def packed_key(op: str, x: torch.Tensor, num_out: int, keep_residuals: bool, **dims) -> str:
    """The strategy key of a packed projector: token and output row counts bucketed."""
    return strategy.make_key(op, x.device, x.dtype, keep_residuals, tokens=strategy.bucket(x.shape[0]),
                             rows=strategy.bucket(num_out), C=x.shape[1], **dims)


def _pool_mlp_fused(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    act, pre, pooled = pool_gemm.pool_gemm_packed(
        x, geometry, num_out, mode, w1.contiguous(), None if b1 is None else b1.contiguous(),
        activation, store_pre=keep_residuals, store_pooled=keep_residuals,
    )
    return F.linear(act, w2, b2), pooled, pre


def _pool_mlp_composed(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    """The composed twin on the Triton backend: our packed pooling kernel, then the torch ops."""
    return composed.pool_mlp(packed_pool.pool_packed(x, geometry, num_out, mode), w1, b1, w2, b2, activation, keep_residuals)


def _pool_mlp_reference(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    """The PyTorch backend's: PyTorch's pooling, then the torch ops."""
    return composed.pool_mlp(reference_pool(x, geometry, num_out, mode), w1, b1, w2, b2, activation, keep_residuals)


def packed_mlp_implementation(op: str, args: tuple, fused: Callable, composed_kernel: Callable, reference: Callable) -> Callable:
    """The function that runs the packed projector ``deco::<op>`` on ``args`` (x, w1, b1, w2, b2,
    geometry, num_out, activation, mode, keep_residuals): the strategy's choice between ``fused``
    and the composed twin (``composed_kernel`` on the Triton backend, ``reference`` on PyTorch's)."""
    x, w1, _, w2, _, _, num_out, activation, mode, keep_residuals = args
    on_triton = _backend.use_triton(x.device)
    return strategy.implementation(
        args, on_triton=on_triton,
        key=lambda: packed_key(op, x, num_out, keep_residuals, hidden=w1.shape[0], out=w2.shape[0], act=activation, mode=mode),
        fused=fused if on_triton else None, composed=composed_kernel if on_triton else reference,
    )


def _pool_mlp_implementation(*args) -> Callable:
    """What runs ``deco::pool_mlp_packed`` on ``args``. It returns (y, pooled, pre) where the
    residuals are kept, else y and anything: the custom op's body puts the empty tensors of its
    schema in their place (``projector._pool_mlp_implementation``)."""
    return packed_mlp_implementation("pool_mlp_packed", args, _pool_mlp_fused, _pool_mlp_composed, _pool_mlp_reference)


@custom_op("pool_mlp_packed")
def _pool_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    geometry: torch.Tensor,
    num_out: int,
    activation: str,
    mode: str,
    keep_residuals: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals)
    y, pooled, pre = _pool_mlp_implementation(*args)(*args)
    return (y, pooled, pre) if keep_residuals else (y, x.new_empty((0,)), x.new_empty((0,)))


@_pool_mlp.register_fake
def _(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep_residuals):
    y = x.new_empty((num_out, w2.shape[0]))
    if not keep_residuals:
        return y, x.new_empty((0,)), x.new_empty((0,))
    return y, x.new_empty((num_out, x.shape[1])), x.new_empty((num_out, w1.shape[0]))


def _pool_mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, geometry, num_out, activation, mode_, keep = inputs
    ctx.save_for_backward(w1, w2, output[1] if ctx.needs_input_grad[1] else None, output[2], geometry)  # pooled: for dW1 alone
    ctx.num_tokens, ctx.activation, ctx.mode, ctx.keep = x.shape[0], activation, mode_, keep
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.set_materialize_grads(False)


def _pool_mlp_backward(ctx, dy, dpooled_extra, dpre_extra):
    w1, w2, pooled, pre, geometry = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::pool_mlp_packed ran with keep_residuals=False; call deco_ops.pool_mlp_packed to differentiate it")
    dpooled, *param_grads = mlp_backward(ctx, dy, dpre_extra, w1, w2, pooled, pre)
    dpooled = add_grads(dpooled, dpooled_extra)
    dx = None
    if ctx.needs_input_grad[0] and dpooled is not None:
        dx = deco.unpool_tokens_packed(dpooled, geometry, ctx.num_tokens, ctx.mode)
    return dx, *param_grads, None, None, None, None, None


register_autograd(_pool_mlp, _pool_mlp_backward, _pool_mlp_setup)


def check_mlp(x, w1, b1, w2, b2, activation, resample_mode, activations) -> None:
    """Checks of the MLP operands shared by the packed and project-then-pool ops (x checked already)."""
    _validate.linear("w1", w1, "b1", b1, x.shape[-1], "x.shape[-1]")
    _validate.linear("w2", w2, "b2", b2, w1.shape[0], "w1.shape[0] (hidden features)")
    _validate.activation(activation, activations)
    check_mode(resample_mode)
    use_triton = _backend.use_triton(x.device)
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, value in params.items():
        if value is not None:
            _validate.floating(name, value, use_triton)
    _validate.same_dtype("x", x, **params)
    _validate.same_device("x", x, **params)


def pool_mlp_packed(
    x: torch.Tensor,
    grids: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    out_grids: torch.Tensor | None = None,
    stride=None,
    activation: str = "gelu",
    mode: str = "average",
):
    """The DeCo projector ``Linear2(act(Linear1(pool(x_i))))`` for every image of a packed batch.

    Args:
        x: ``(total_tokens, C)``; grids, out_grids, stride: as ``adaptive_avg_pool_tokens_packed``.
        w1, b1, w2, b2, activation: as ``pool_mlp``.
        mode: ``"average"`` (adaptive average pooling) or ``"bilinear"``.
    Returns:
        ``(y, cu_seqlens)``: ``y`` ``(sum(prod(out_grids)), out)``, cu_seqlens int32 ``(num_images+1,)``.
        One fused pool+GEMM launch for the whole batch (cuBLAS for the second Linear).
    """
    return packed_mlp(deco.pool_mlp_packed, _pool_mlp_packed_plans, x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode)


def pool_mlp_resampled(x, w1, b1, w2, b2, *, grid, out_grid, activation="gelu", mode="average"):
    """Dense ``(B, prod(grid), C)`` ``pool_mlp`` with either resampling mode (the packed kernel on
    B images of one grid); what ``DeCoProjector(mode="bilinear")`` runs."""
    return dense_mlp(deco.pool_mlp_packed, _pool_mlp_resampled_plans, x, w1, b1, w2, b2, grid, out_grid, activation, mode)


# ----------------------------------------------------------------------------------------------
# the projectors over packed batches (pool_mlp_packed, mlp_pool_packed) and over dense batches
# run as B packed images of one grid (pool_mlp_resampled, mlp_pool): checks and plans


def _packed_mlp_checked(x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode) -> tuple:
    """Every check of a packed projector: (the geometry table, output rows, whether autograd needs
    the residuals, cu_seqlens)."""
    check_tokens(x)
    check_mlp(x, w1, b1, w2, b2, activation, mode, ACTIVATIONS)
    packing = parse(x, grids, out_grids, stride)
    return packing.geometry, packing.num_out, needs_residuals(x, w1, b1, w2, b2), packing.cu_seqlens


def packed_mlp_plans(op: Op, implementation: Callable) -> PackedPlans:
    """The plans of the packed projector ``op`` (a ``deco.<name>``) whose strategy's choice is ``implementation``."""

    def build(x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode) -> tuple:
        checked = _packed_mlp_checked(x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode)
        geometry, num_out, keep, _ = checked
        args = (x, w1, b1, w2, b2, device_geometry(geometry, x.device), num_out, activation, mode, keep)
        return _plan.runner(op, implementation, args, keep), *checked

    return PackedPlans(build)


def packed_mlp(op: Op, plans: PackedPlans, x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode):
    """``(y, cu_seqlens)`` of the packed projector ``op`` (``plans``: its ``packed_mlp_plans``)."""
    args = (x, grids, w1, b1, w2, b2, out_grids, stride, activation, mode)
    plan = plans.get((grids, out_grids), *args)
    if plan is None:
        out = _autocast.plain_call(packed_mlp, op.name, (op, plans, *args))
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (op, *_packed_mlp_checked(*args))
    run, geometry, num_out, keep, cu_seqlens = plan
    geometry, cu_seqlens = device_tables(geometry, cu_seqlens, x.device)
    return run(x, w1, b1, w2, b2, geometry, num_out, activation, mode, keep)[0], cu_seqlens


def _dense_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation, mode) -> tuple[torch.Tensor, int, bool]:
    """Every check of a dense projector: (the batch's geometry table, pooled rows per image,
    whether autograd needs the residuals)."""
    _validate.tensor("x", x, 3)
    _validate.floating("x", x, _backend.use_triton(x.device))
    check_mlp(x, w1, b1, w2, b2, activation, mode, ACTIVATIONS)
    g, o = _validate.grids(grid, out_grid)
    _validate.tokens(x, g)
    return dense_geometry(g, o, x), math.prod(o), needs_residuals(x, w1, b1, w2, b2)


def dense_mlp_plans(op: Op, implementation: Callable) -> _plan.Plans:
    """The plans of a dense projector run by the packed op ``op`` (a ``deco.<name>``). A plan holds the geometry
    table (``dense_geometry``'s, cached per grid, out_grid, batch and device anyway), no input."""

    def build(x, w1, b1, w2, b2, grid, out_grid, activation, mode) -> tuple:
        geometry, P, keep = _dense_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation, mode)
        B, N, C = x.shape
        args = (x.reshape(B * N, C), w1, b1, w2, b2, geometry, B * P, activation, mode, keep)
        return _plan.runner(op, implementation, args, keep), geometry, P, keep

    return _plan.Plans(build)


def dense_mlp(op: Op, plans: _plan.Plans, x, w1, b1, w2, b2, grid, out_grid, activation, mode) -> torch.Tensor:
    """``(B, P, out)``: the dense projector run by ``op`` (``plans``: its ``dense_mlp_plans``)."""
    plan = plans.get(x, w1, b1, w2, b2, grid, out_grid, activation, mode)
    if plan is None:
        out = _autocast.plain_call(dense_mlp, op.name, (op, plans, x, w1, b1, w2, b2, grid, out_grid, activation, mode))
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (op, *_dense_mlp_checked(x, w1, b1, w2, b2, grid, out_grid, activation, mode))
    run, geometry, P, keep = plan
    B, N, C = x.shape
    return run(x.reshape(B * N, C), w1, b1, w2, b2, geometry, B * P, activation, mode, keep)[0].view(B, P, w2.shape[0])


_pool_mlp_packed_plans = packed_mlp_plans(deco.pool_mlp_packed, _pool_mlp_implementation)
_pool_mlp_resampled_plans = dense_mlp_plans(deco.pool_mlp_packed, _pool_mlp_implementation)
