"""The norm of a patch-merge projector outside its GEMM: the statistics pre-pass (forward, and
again in backward) and the norm's backward, both reading the tokens through the merge gather of ``merge_rows.py``.

``merge_norm_stats``: per norm group (a token, or a merged row) the mean and ``1/sqrt(var + eps)``
in fp32, two passes over the group (mean first, then the centred squares: no cancellation when
the mean is large against the spread, as ViT activations often are), the second pass also
correcting the mean's rounding (so a constant group standardises to exactly 0, as in PyTorch).
The fused GEMM (``merge_gemm.py``) applies them while it loads its A tiles; backward runs the pre-pass again
rather than keeping them, so neither they nor the normalised tensor outlive the forward.

``merge_norm_backward``: given ``dn`` (the gradient of the norm's output in merged layout,
``dz @ W1`` on cuBLAS), recomputes x-hat from the tokens and the statistics and, each only on
request,

* ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` with ``dxhat = dn * weight``
  (RMSNorm: without the ``mean(dxhat)`` term), written straight to each token's place (the merge
  is a permutation, so every input gradient is written exactly once: deterministic, no atomics);
* the norm's output ``xhat * weight + bias`` in merged layout, the A operand of ``dW1`` (cuBLAS);
* per-program partial sums of ``dn * xhat`` and ``dn`` per merged channel (``dweight``,
  ``dbias``), reduced over programs by the caller in a fixed order.

Counts (M merged rows of K = S*S*C channels): stats read the tokens twice and write 8 bytes per
group; backward reads tokens and ``dn`` once or twice and writes ``dx`` and the norm output:
bytes ~ (2 + 2 + 1 + 1) * M * K * elem at most.
"""

import functools

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._traceable import launcher
from ._tuning import INTERPRET
from .merge_rows import (
    NORMS, ORDERS, affine, group_stats, groups, load_token_tile, merged_rows, norm_channels, scale,
    standardized_tile,
)
from .scalars import fp32_scalar

BLOCK_R_INTERPRET = 64  # few, wide programs: the interpreter's cost is per program and per op


def cuda_configs() -> list[triton.Config]:
    """Rows x channels per program on a GPU (one config: these kernels are bandwidth-bound)."""
    return [triton.Config({"BLOCK_R": 16, "BLOCK_C": 128}, num_warps=4)]


@triton.jit
def merge_norm_stats_kernel(
    x_ptr, stats_ptr, image_ptr, geometry_ptr,
    M, C, P, H, W, sxb, sxn, sxc, eps,
    ORDER: tl.constexpr, PACKED: tl.constexpr, MERGE: tl.constexpr, NORM: tl.constexpr, PRE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    eps = fp32_scalar(eps)
    GROUPS: tl.constexpr = MERGE * MERGE if PRE else 1
    TOKENS: tl.constexpr = MERGE * MERGE // GROUPS  # tokens per group
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < M
    base, step_h = merged_rows(rows, row_mask, P, H, W, sxb, sxn, image_ptr, geometry_ptr, ORDER, PACKED, MERGE)
    cs = tl.arange(0, BLOCK_C)
    width = C * TOKENS * 1.0
    for g in range(GROUPS):
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)
        if NORM == 0:
            total = tl.zeros([BLOCK_R], dtype=tl.float32)
            for t in range(TOKENS):
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + cs
                    mask = row_mask[:, None] & (c < C)[None, :]
                    total += tl.sum(load_token_tile(x_ptr, base, step_h, sxn, sxc, g * TOKENS + t, c, mask, MERGE), axis=1)
            mean = total / width
        squares = tl.zeros([BLOCK_R], dtype=tl.float32)
        residual = tl.zeros([BLOCK_R], dtype=tl.float32)
        for t in range(TOKENS):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cs
                mask = row_mask[:, None] & (c < C)[None, :]
                x = load_token_tile(x_ptr, base, step_h, sxn, sxc, g * TOKENS + t, c, mask, MERGE)
                d = tl.where(mask, x - mean[:, None], 0.0)
                squares += tl.sum(d * d, axis=1)
                if NORM == 0:  # RMSNorm has no mean to correct
                    residual += tl.sum(d, axis=1)
        variance = squares / width
        if NORM == 0:
            # Corrected two-pass: `total / width` is off by rounding, which on a constant group
            # leaves every x - mean an ulp from 0 and 1/sigma near 1/sqrt(eps) magnifies it. The
            # centred values' own mean is that error: move the mean by it and take its square
            # out of the variance (which is then exactly 0 for a constant group).
            shift = residual / width
            mean += shift
            variance = tl.maximum(variance - shift * shift, 0.0)
        rstd = 1.0 / tl.sqrt(variance + eps)
        out = stats_ptr + (rows * GROUPS + g) * 2
        tl.store(out, mean, mask=row_mask)
        tl.store(out + 1, rstd, mask=row_mask)


@triton.jit
def _merged_offsets(rows, q, c, C, K):
    """Offsets of sub-token ``q``'s channels ``c`` of ``rows`` in the merged ``(M, K)`` layout (``dn``
    and the norm output). No pointer goes in: the stores placed by it stay the kernel's own."""
    return rows[:, None] * K + (q * C + c)[None, :]


@triton.jit
def _grad_tile(x_ptr, dn_ptr, base, step_h, sxn, sxc, row_mask, merged, q, c, C, mean, rstd,
               NORM: tl.constexpr, MERGE: tl.constexpr, READ_DN: tl.constexpr):
    """What both backward passes read of sub-token ``q``'s channels ``c``: ``(xhat, dn, c_mask,
    mask)``, with ``dn`` (at ``merged``, the tile's offsets into the merged ``(M, K)`` layout) in
    fp32, zeros unless ``READ_DN``. ``merged`` comes in rather than out: torch.compile reads which
    tensors a kernel writes from its Triton IR and takes a store's address computed from a helper's
    result as possibly written through every pointer the helper got (x and dn would be cloned, and
    on torch 2.10 and 2.11 a trained merger failed to compile)."""
    xhat, c_mask = standardized_tile(x_ptr, base, step_h, sxn, sxc, q, c, C, row_mask, mean, rstd, NORM, MERGE)
    mask = row_mask[:, None] & c_mask[None, :]
    if READ_DN:
        dn = tl.load(dn_ptr + merged, mask=mask, other=0.0).to(tl.float32)
    else:
        dn = tl.zeros_like(xhat)
    return xhat, dn, c_mask, mask


@triton.jit
def merge_norm_backward_kernel(
    x_ptr, stats_ptr, wn_ptr, bn_ptr, dn_ptr, dx_ptr, n_ptr, dwn_ptr, dbn_ptr, image_ptr, geometry_ptr,
    M, C, P, H, W, sxb, sxn, sxc, sdb, sdn, sdc,
    ORDER: tl.constexpr, PACKED: tl.constexpr, MERGE: tl.constexpr, NORM: tl.constexpr, PRE: tl.constexpr,
    HAS_WN: tl.constexpr, HAS_BN: tl.constexpr,
    NEED_DX: tl.constexpr, STORE_N: tl.constexpr, NEED_DWN: tl.constexpr, NEED_DBN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    GROUPS: tl.constexpr = MERGE * MERGE if PRE else 1
    TOKENS: tl.constexpr = MERGE * MERGE // GROUPS
    READ_DN: tl.constexpr = NEED_DX or NEED_DWN or NEED_DBN
    pid = tl.program_id(0)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_mask = rows < M
    base, step_h = merged_rows(rows, row_mask, P, H, W, sxb, sxn, image_ptr, geometry_ptr, ORDER, PACKED, MERGE)
    dbase, dstep_h = merged_rows(rows, row_mask, P, H, W, sdb, sdn, image_ptr, geometry_ptr, ORDER, PACKED, MERGE)
    K = MERGE * MERGE * C
    cs = tl.arange(0, BLOCK_C)
    width = C * TOKENS * 1.0
    for g in range(GROUPS):
        mean, rstd = group_stats(stats_ptr, rows, row_mask, g, GROUPS)
        if NEED_DX:
            # Row reductions of the chain rule: mean(dxhat) and mean(dxhat * xhat) over the group.
            sum_d = tl.zeros([BLOCK_R], dtype=tl.float32)
            sum_dx = tl.zeros([BLOCK_R], dtype=tl.float32)
            for t in range(TOKENS):
                q = g * TOKENS + t
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + cs
                    merged = _merged_offsets(rows, q, c, C, K)
                    xhat, dn, c_mask, _ = _grad_tile(x_ptr, dn_ptr, base, step_h, sxn, sxc, row_mask, merged, q, c, C,
                                                     mean, rstd, NORM, MERGE, True)
                    dxhat = scale(dn, wn_ptr, norm_channels(q, c, C, PRE), c_mask, HAS_WN)
                    sum_d += tl.sum(dxhat, axis=1)
                    sum_dx += tl.sum(dxhat * xhat, axis=1)
            mean_d = sum_d / width
            mean_dx = sum_dx / width
        for t in range(TOKENS):
            q = g * TOKENS + t
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cs
                merged = _merged_offsets(rows, q, c, C, K)
                xhat, dn, c_mask, mask = _grad_tile(x_ptr, dn_ptr, base, step_h, sxn, sxc, row_mask, merged, q, c, C,
                                                    mean, rstd, NORM, MERGE, READ_DN)
                channel = norm_channels(q, c, C, PRE)
                if NEED_DX:
                    dxhat = scale(dn, wn_ptr, channel, c_mask, HAS_WN)
                    if NORM == 0:
                        dxhat -= mean_d[:, None]
                    dx = (dxhat - xhat * mean_dx[:, None]) * rstd[:, None]
                    offsets = dbase + (q // MERGE) * dstep_h + (q % MERGE) * sdn
                    tl.store(dx_ptr + offsets[:, None] + c[None, :] * sdc, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                if STORE_N:
                    n = affine(xhat, wn_ptr, bn_ptr, channel, c_mask, HAS_WN, HAS_BN)
                    tl.store(n_ptr + merged, n.to(n_ptr.dtype.element_ty), mask=mask)
                if NEED_DWN:
                    tl.store(dwn_ptr + pid * K + q * C + c, tl.sum(dn * xhat, axis=0), mask=c_mask)
                if NEED_DBN:
                    tl.store(dbn_ptr + pid * K + q * C + c, tl.sum(dn, axis=0), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=None)
def _launch_config(C: int) -> dict:
    config = cuda_configs()[0]
    block_r = BLOCK_R_INTERPRET if INTERPRET else config.kwargs["BLOCK_R"]
    block_c = min(config.kwargs["BLOCK_C"], next_power_of_2(max(C, 1)))
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=config.num_warps)


def _layout(x: torch.Tensor, merge: int, grid: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(M merged rows, P rows per batch element, H, W) of (B, N, C) tokens."""
    B, N, _ = x.shape
    P = N // (merge * merge)
    return B * P, P, grid[1], grid[2]


@on_input_device
def merge_norm_stats(x, merge, order, grid, geometry, image, norm, pre, eps) -> torch.Tensor:
    """fp32 (M, groups, 2) mean and rstd of every norm group of x (B, N, C) merged ``merge`` x
    ``merge`` in ``order`` ("block" or "grid" with ``grid`` (T, H, W), or packed grids from the
    int32 ``geometry``/``image`` tables)."""
    M, P, H, W = _layout(x, merge, grid)
    C = x.shape[2]
    stats = torch.empty((M, groups(merge, pre), 2), device=x.device, dtype=torch.float32)
    if M == 0:
        return stats
    launch = _launch_config(int(C))  # int: a traced C (SymInt) specialises the graph's config
    packed = geometry is not None
    launcher(merge_norm_stats_kernel, x)[(cdiv(M, launch["BLOCK_R"]),)](
        x, stats, image if packed else stats, geometry if packed else stats,
        M, C, P, H, W, *x.stride(), eps,
        ORDER=ORDERS[order], PACKED=packed, MERGE=merge, NORM=NORMS[norm], PRE=pre, **launch,
    )
    return stats


@on_input_device
def merge_norm_backward(x, stats, wn, bn, dn, merge, order, grid, geometry, image, norm, pre,
                        need_dx: bool, n_dtype: torch.dtype | None, need_dwn: bool, need_dbn: bool):
    """(dx like x, norm output (M, K) in ``n_dtype`` (None: not stored), dweight, dbias), each None
    unless requested. ``dn`` (M, K)
    is read only when a gradient is requested; dweight/dbias are fp32 sums over rows per norm
    channel. The kernel indexes ``wn``, ``bn`` and ``dn`` as contiguous: a strided view (a
    caller's weight) is copied first."""
    wn, bn, dn = (None if t is None else t.contiguous() for t in (wn, bn, dn))
    M, P, H, W = _layout(x, merge, grid)
    C = x.shape[2]
    K = merge * merge * C
    launch = _launch_config(int(C))  # int: a traced C (SymInt) specialises the graph's config
    programs = cdiv(M, launch["BLOCK_R"])
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if need_dx else None
    n = torch.empty((M, K), device=x.device, dtype=n_dtype) if n_dtype is not None else None
    dwn = torch.empty((programs, K), device=x.device, dtype=torch.float32) if need_dwn else None
    dbn = torch.empty((programs, K), device=x.device, dtype=torch.float32) if need_dbn else None
    if M > 0:
        packed = geometry is not None
        dummy = stats
        launcher(merge_norm_backward_kernel, x)[(programs,)](
            x, stats, dummy if wn is None else wn, dummy if bn is None else bn, dummy if dn is None else dn,
            dummy if dx is None else dx, dummy if n is None else n, dummy if dwn is None else dwn,
            dummy if dbn is None else dbn, image if packed else dummy, geometry if packed else dummy,
            M, C, P, H, W, *x.stride(), *(dx.stride() if need_dx else x.stride()),
            ORDER=ORDERS[order], PACKED=packed, MERGE=merge, NORM=NORMS[norm], PRE=pre,
            HAS_WN=wn is not None, HAS_BN=bn is not None,
            NEED_DX=need_dx, STORE_N=n is not None, NEED_DWN=need_dwn, NEED_DBN=need_dbn, **launch,
        )

    def reduce(partial):
        if partial is None:
            return None
        total = partial.sum(0)
        return total.view(merge * merge, C).sum(0) if pre else total

    return dx, n, reduce(dwn), reduce(dbn)
