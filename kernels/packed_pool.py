"""Pooling of packed ragged batches: many images (or videos), each with its own grid, back to back.

Layout. Tokens are ``(total_tokens, C)``; image ``i`` holds ``T_i*H_i*W_i`` tokens in row-major
(t, h, w) order starting at token ``tok0_i``, and is resampled to ``OT_i*OH_i*OW_i`` output rows
starting at row ``row0_i``. One int32 ``geometry`` table ``(num_images, 8)`` holds, per image,
``[T, H, W, OT, OH, OW, tok0, row0]`` (a 2D grid is ``T = OT = 1``), and an int32 ``image`` table
maps every output row (forward) or every token (backward) to its image. Every program loads its
rows' geometry from these tables, so a whole batch of mixed grids is one launch with no padding.

Two resampling modes, both separable over the (t, h, w) axes:

* ``MODE = AVERAGE`` (0): adaptive average pooling, ``F.adaptive_avg_pool2d/3d``. Output ``o`` of
  an axis averages inputs ``floor(o*L/O) .. ceil((o+1)*L/O) - 1``.
* ``MODE = BILINEAR`` (1): ``F.interpolate(mode="bilinear"/"trilinear", align_corners=False,
  antialias=False)``: ``src = max((o + 0.5) * L/O - 0.5, 0)``, taps ``floor(src)`` and the next input
  (the same one on the last input and on an axis that is not resampled, ``L == O``), weights
  ``1 - frac(src)`` and ``frac(src)``, in fp32 as PyTorch. A tap is read even where its weight is 0
  (``src`` a whole number), as PyTorch's kernels read it: a NaN there reaches the output (0 * NaN).

Forward (``pooled_tile``) sums ``weight * token`` over each output row's taps. The loop bounds are
the largest tap count of the rows in the tile (runtime values), so a tile pays only for its own
windows, and one compiled kernel serves every mix of grids. Backward (``unpooled_tile``) is the
adjoint as a deterministic *gather*: every input token walks the outputs that read it (for
bilinear a small superset, skipped where the output does not read it) in a fixed order and
accumulates ``weight * grad``, also from outputs that read it with weight 0 (a NaN gradient
reaches it, as PyTorch's scatter); every input gradient is written exactly once, no atomics.

The tile helpers are shared with the fused GEMMs (``pool_gemm`` forms its A operand with
``pooled_tile``; ``mlp_pool`` gathers its epilogue's gradient with ``unpooled_tile``).

Counts: pooling reads every token once (more where windows overlap) and writes every output row:
bytes = (total_tokens + total_out) * C * elem; flops ~ taps * total_out * C.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakTensorKeyDictionary

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._traceable import launcher, tracing
from ._tuning import INTERPRET
from .adaptive_window import window, windows_containing

AVERAGE, BILINEAR = 0, 1
# The weight of a bilinear tap that is none (no second input on an axis; an output that does not
# read the token): the product over the axes is then inf or NaN (inf * 0), never finite, where 0
# would be taken for a tap of weight exactly 0, which PyTorch reads (a NaN there reaches the
# output, or the token's gradient). Average taps weigh 1/n, so 0 marks none there.
NOT_A_TAP = tl.constexpr(float("inf"))
MODES = {"average": AVERAGE, "bilinear": BILINEAR}
GEOMETRY_FIELDS = 8  # T, H, W, OT, OH, OW, tok0, row0


# ----------------------------------------------------------------------------------------------
# geometry


@triton.jit
def packed_geometry(idx, mask, image_ptr, geometry_ptr):
    """Per-row (T, H, W, OT, OH, OW, tok0, row0) of the images that rows ``idx`` belong to."""
    img = tl.load(image_ptr + idx, mask=mask, other=0).to(tl.int64)
    g = geometry_ptr + img * 8
    T = tl.load(g + 0, mask=mask, other=1)
    H = tl.load(g + 1, mask=mask, other=1)
    W = tl.load(g + 2, mask=mask, other=1)
    OT = tl.load(g + 3, mask=mask, other=1)
    OH = tl.load(g + 4, mask=mask, other=1)
    OW = tl.load(g + 5, mask=mask, other=1)
    tok0 = tl.load(g + 6, mask=mask, other=0).to(tl.int64)
    row0 = tl.load(g + 7, mask=mask, other=0).to(tl.int64)
    return T, H, W, OT, OH, OW, tok0, row0


@triton.jit
def bilinear_taps(o, L, O):
    """Inputs (i0, i1) and fp32 weights (w0, w1) of output ``o``, both read even where w1 = 0 (as
    PyTorch's kernels do: a NaN there reaches the output). On the last input and where the axis is
    not resampled (``L == O``, a copy in PyTorch's CPU kernel) i1 = i0 with w1 = 0: no neighbour is read."""
    src = tl.maximum((L.to(tl.float32) / O.to(tl.float32)) * (o.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), L - 1)
    frac = src - i0.to(tl.float32)
    single = (i0 >= L - 1) | (L == O)
    w0 = tl.where(single, 1.0, 1.0 - frac)
    w1 = tl.where(single, 0.0, frac)
    return i0, tl.where(single, i0, i0 + 1), w0, w1


@triton.jit
def source_count(o, L, O, MODE: tl.constexpr):
    """How many inputs output ``o`` reads along an axis."""
    if MODE == 0:
        s, e = window(o, L, O)
        n = e - s
    else:
        i0, i1, _, _ = bilinear_taps(o, L, O)
        n = 1 + (i1 != i0).to(tl.int32)
    return n


@triton.jit
def source_tap(o, d, L, O, MODE: tl.constexpr):
    """(input index, weight) of tap ``d`` of output ``o`` along an axis; past its taps the weight
    is 0 (average) or ``NOT_A_TAP`` (bilinear, whose taps may weigh 0)."""
    if MODE == 0:
        s, e = window(o, L, O)
        i = s + d
        wgt = tl.where(i < e, 1.0 / (e - s).to(tl.float32), 0.0)
    else:
        i0, i1, w0, w1 = bilinear_taps(o, L, O)
        i = tl.where(d == 0, i0, i1)
        wgt = tl.where(d == 0, w0, tl.where((d == 1) & (i1 != i0), w1, NOT_A_TAP))
    return i, wgt


@triton.jit
def target_span(j, L, O, MODE: tl.constexpr):
    """(first, count) of the outputs along an axis that may read input ``j`` (exact for average, a
    superset for bilinear: outputs whose source lies in [j - 1, j + 1), one spare on each side, and
    for input 1 every output from 0: up-sampling by r clamps the source of the first (r - 1) / 2
    outputs to 0, and they read input 1 with weight 0, which a NaN or inf gradient must still reach)."""
    if MODE == 0:
        f, e = windows_containing(j, L, O)
    else:
        r = O.to(tl.float32) / L.to(tl.float32)
        f = tl.maximum(tl.floor((j.to(tl.float32) - 0.5) * r - 0.5).to(tl.int32) - 1, 0)
        f = tl.where(j == 1, 0, f)
        e = tl.minimum(tl.ceil((j.to(tl.float32) + 1.5) * r - 0.5).to(tl.int32) + 1, O)
        e = tl.maximum(e, f)
    return f, e - f


@triton.jit
def target_tap(o, j, L, O, in_span, MODE: tl.constexpr):
    """Weight with which output ``o`` (``in_span``: within the token's ``target_span``) reads input
    ``j`` along an axis; where it does not, 0 (average) or ``NOT_A_TAP`` (bilinear, whose reads may
    weigh 0)."""
    if MODE == 0:
        s, e = window(o, L, O)
        wgt = tl.where(in_span & (s <= j) & (j < e) & (o < O), 1.0 / (e - s).to(tl.float32), 0.0)
    else:
        i0, i1, w0, w1 = bilinear_taps(o, L, O)
        reads = in_span & (o < O) & ((i0 == j) | (i1 == j))
        wgt = tl.where(reads, tl.where(i0 == j, w0, 0.0) + tl.where(i1 == j, w1, 0.0), NOT_A_TAP)
    return wgt


@triton.jit
def tap_use(wgt, rmask, MODE: tl.constexpr):
    """(whether to read, weight to apply) of a tap whose per-axis weights multiply to ``wgt``."""
    if MODE == 0:
        use = rmask & (wgt != 0.0)
    else:
        use = rmask & (wgt < NOT_A_TAP)  # false for inf and NaN
        wgt = tl.where(use, wgt, 0.0)
    return use, wgt


# ----------------------------------------------------------------------------------------------
# tiles shared with the fused GEMMs


@triton.jit
def pooled_tile(x_ptr, sxn, sxc, cell, T, H, W, OT, OH, OW, tok0, rmask, k, kmask, MODE: tl.constexpr):
    """fp32 [rows, k] tile of resampled rows: row r is output ``cell[r]`` of its image."""
    ot = cell // (OH * OW)
    oh = (cell // OW) % OH
    ow = cell % OW
    nt = tl.max(tl.where(rmask, source_count(ot, T, OT, MODE), 0))
    nh = tl.max(tl.where(rmask, source_count(oh, H, OH, MODE), 0))
    nw = tl.max(tl.where(rmask, source_count(ow, W, OW, MODE), 0))
    acc = tl.zeros([cell.shape[0], k.shape[0]], dtype=tl.float32)
    x_k = x_ptr + k[None, :] * sxc
    for dt in range(0, nt):
        t, wt = source_tap(ot, dt, T, OT, MODE)
        for dh in range(0, nh):
            h, wh = source_tap(oh, dh, H, OH, MODE)
            for dw in range(0, nw):
                w, ww = source_tap(ow, dw, W, OW, MODE)
                use, wgt = tap_use(wt * wh * ww, rmask, MODE)
                token = (tok0 + (t * H + h) * W + w).to(tl.int64)
                v = tl.load(x_k + token[:, None] * sxn, mask=use[:, None] & kmask[None, :], other=0.0)
                acc += wgt[:, None] * v.to(tl.float32)
    return acc


@triton.jit
def unpooled_tile(g_ptr, sgn, sgc, j, T, H, W, OT, OH, OW, row0, rmask, c, cmask, MODE: tl.constexpr):
    """fp32 [rows, c] tile of the adjoint: row r is input token ``j[r]`` of its image, gathering
    ``weight * grad`` from every output that reads it, in a fixed order (deterministic)."""
    t = j // (H * W)
    h = (j // W) % H
    w = j % W
    ft, ct = target_span(t, T, OT, MODE)
    fh, ch = target_span(h, H, OH, MODE)
    fw, cw = target_span(w, W, OW, MODE)
    nt = tl.max(tl.where(rmask, ct, 0))
    nh = tl.max(tl.where(rmask, ch, 0))
    nw = tl.max(tl.where(rmask, cw, 0))
    acc = tl.zeros([j.shape[0], c.shape[0]], dtype=tl.float32)
    g_c = g_ptr + c[None, :] * sgc
    for dt in range(0, nt):
        ot = ft + dt
        wt = target_tap(ot, t, T, OT, dt < ct, MODE)
        for dh in range(0, nh):
            oh = fh + dh
            wh = target_tap(oh, h, H, OH, dh < ch, MODE)
            for dw in range(0, nw):
                ow = fw + dw
                ww = target_tap(ow, w, W, OW, dw < cw, MODE)
                use, wgt = tap_use(wt * wh * ww, rmask, MODE)
                row = (row0 + (ot * OH + oh) * OW + ow).to(tl.int64)
                v = tl.load(g_c + row[:, None] * sgn, mask=use[:, None] & cmask[None, :], other=0.0)
                acc += wgt[:, None] * v.to(tl.float32)
    return acc


# ----------------------------------------------------------------------------------------------
# standalone kernels


def cuda_configs() -> list[triton.Config]:
    """The configs of both kernels on a GPU, one per input width (``fits``); BLOCK_C shrinks to
    next_power_of_2(C) below 64. 128 channels spill the fp32 un-pooling gather."""
    return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 64}, num_warps=w) for w in (4, 8)]


def fits(config: triton.Config, elem_bytes: int) -> bool:
    """Whether ``config`` is the one launched for ``elem_bytes``-wide inputs, measured spill-free
    with ``python -m deco_ops.aot`` on sm_80 and sm_90: 4 warps for 16-bit inputs, 8 for fp32
    (on 4 warps the fp32 bilinear pooling spills on sm_90; on 8 the bf16 one does)."""
    return config.num_warps == (8 if elem_bytes == 4 else 4)


BLOCK_R_INTERPRET = 64  # few, wide programs: the interpreter's cost is per program and per op


@triton.jit
def pool_packed_kernel(
    x_ptr, out_ptr, image_ptr, geometry_ptr,
    M, C, sxn, sxc, son, soc,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = c < C
    T, H, W, OT, OH, OW, tok0, row0 = packed_geometry(rows, rmask, image_ptr, geometry_ptr)
    acc = pooled_tile(x_ptr, sxn, sxc, rows - row0, T, H, W, OT, OH, OW, tok0, rmask, c, cmask, MODE)
    ptrs = out_ptr + rows[:, None] * son + c[None, :] * soc
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def unpool_packed_kernel(
    g_ptr, dx_ptr, image_ptr, geometry_ptr,
    N, C, sgn, sgc, sdn, sdc,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = tokens < N
    cmask = c < C
    T, H, W, OT, OH, OW, tok0, row0 = packed_geometry(tokens, rmask, image_ptr, geometry_ptr)
    acc = unpooled_tile(g_ptr, sgn, sgc, tokens - tok0, T, H, W, OT, OH, OW, row0, rmask, c, cmask, MODE)
    ptrs = dx_ptr + tokens[:, None] * sdn + c[None, :] * sdc
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def out_rows_per_image(geometry: torch.Tensor) -> torch.Tensor:
    return geometry[:, 3] * geometry[:, 4] * geometry[:, 5]


def tokens_per_image(geometry: torch.Tensor) -> torch.Tensor:
    return geometry[:, 0] * geometry[:, 1] * geometry[:, 2]


@functools.lru_cache(maxsize=256)
def dense_geometry(grid: tuple[int, int, int], out_grid: tuple[int, int, int], batch: int, device: torch.device) -> torch.Tensor:
    """The geometry of a dense (B, T*H*W, C) batch seen as B packed images of one grid: built and
    copied to ``device`` once per (grid, out_grid, batch, device), never per call. Never an
    inference tensor, whatever mode the first call ran in: a later training call saves it for
    backward."""
    tokens, out_rows = math.prod(grid), math.prod(out_grid)
    rows = [[*grid, *out_grid, i * tokens, i * out_rows] for i in range(batch)]
    with torch.inference_mode(False):
        return torch.tensor(rows, dtype=torch.int32, device=device).reshape(batch, GEOMETRY_FIELDS)


ROWS_PER_IMAGE = {"out_rows": out_rows_per_image, "tokens": tokens_per_image}

# Index tables built once per geometry tensor (and per kind): a dense batch passes the same cached
# geometry on every call (``deco_ops.packed.dense_geometry``), so its calls build nothing; a packed
# call's table serves its forward and backward. Entries die with their geometry tensor.
_image_tables = WeakTensorKeyDictionary()


def image_index(geometry: torch.Tensor, kind: str, total: int) -> torch.Tensor:
    """int32 (total,): the image of every output row (``kind="out_rows"``) or every input token
    (``"tokens"``), built on the device without a host sync the first time a geometry asks (every
    time while a trace builds it: the graph holds the ops, the cache only real tensors)."""
    if tracing((geometry,)) or geometry.is_inference():  # an inference tensor has no version to check a cache by
        return _index(geometry, kind, total)
    version, tables = _image_tables.get(geometry, (None, None))
    if version != geometry._version:  # new geometry, or written in place since: rebuild
        version, tables = geometry._version, {}
        _image_tables[geometry] = (version, tables)
    if (kind, total) not in tables:
        tables[kind, total] = _index(geometry, kind, total)
    return tables[kind, total]


def _index(geometry: torch.Tensor, kind: str, total: int) -> torch.Tensor:
    ids = torch.arange(geometry.shape[0], device=geometry.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, ROWS_PER_IMAGE[kind](geometry), output_size=total)


@functools.lru_cache(maxsize=None)
def _launch_config(C: int, elem_bytes: int) -> dict:
    """BLOCK_R, BLOCK_C and num_warps of a launch over C channels of ``elem_bytes``-wide inputs."""
    config = next(c for c in cuda_configs() if fits(c, elem_bytes))
    block_r = BLOCK_R_INTERPRET if INTERPRET else config.kwargs["BLOCK_R"]
    block_c = min(config.kwargs["BLOCK_C"], next_power_of_2(max(C, 1)))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=config.num_warps)


def _resample(kernel, src: torch.Tensor, geometry: torch.Tensor, rows: int, kind: str, mode: str) -> torch.Tensor:
    """Launch ``kernel`` (pooling or its adjoint) from ``src`` into ``rows`` new rows, image i's
    ``ROWS_PER_IMAGE[kind]`` rows back to back."""
    C = src.shape[1]
    dst = torch.empty((rows, C), device=src.device, dtype=src.dtype)
    if dst.numel() == 0:
        return dst
    image = image_index(geometry, kind, rows)
    launch = _launch_config(int(C), src.element_size())  # int: a traced C (SymInt) specialises the graph's config
    launcher(kernel, src)[(cdiv(rows, launch["BLOCK_R"]), cdiv(C, launch["BLOCK_C"]))](
        src, dst, image, geometry, rows, C, *src.stride(), *dst.stride(), MODE=MODES[mode], **launch,
    )
    return dst


@on_input_device
def pool_packed(x: torch.Tensor, geometry: torch.Tensor, num_out: int, mode: str) -> torch.Tensor:
    """(total_tokens, C) -> (num_out, C): every image resampled to its own output grid."""
    return _resample(pool_packed_kernel, x, geometry, num_out, "out_rows", mode)


@on_input_device
def unpool_packed(grad: torch.Tensor, geometry: torch.Tensor, num_tokens: int, mode: str) -> torch.Tensor:
    """Adjoint of ``pool_packed``: (num_out, C) gradient -> (total_tokens, C)."""
    return _resample(unpool_packed_kernel, grad, geometry, num_tokens, "tokens", mode)
