"""The patch-merge projector composed of PyTorch ops, the way the Hugging Face modules run it:
the norm (``torch.layer_norm``, what ``F.layer_norm`` calls, or Qwen2.5-VL's RMSNorm sequence),
the merge as a ``view`` (Qwen's block order) or ``view``/``permute`` (InternVL's
``pixel_shuffle``), and two cuBLAS Linears. It is the default CPU backend and the composed twin of
the fused kernels, and it returns the same residual (the pre-activation), so both paths share one
autograd formula; the norm's backward is ATen's for LayerNorm (``layer_norm_backward``) and the
twin of ``kernels/merge_norm.py``'s for RMSNorm (``rms_norm_stats``, ``rms_norm_backward``). A plain eager call that autograd does not record runs ``forward_of``'s function
instead: the same ATen ops, its shapes worked out once per signature.

Layouts: tokens ``x`` are ``(B, N, C)``; ``grid`` ``(T, H, W)`` for the dense ``"grid"`` order, or
the int32 ``geometry`` table of a packed batch (``packed_pool`` layout; read on the host here).
Merged rows are ``(M, K)``, ``K = S*S*C``, channel ``(dh*S + dw)*C + c``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import reference

_native_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default  # the overload: no packet lookup per call


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norm statistics are fp32 (float64 for float64 tokens on the reference backend)."""
    return torch.promote_types(dtype, torch.float32)


def _images(geometry: torch.Tensor):
    for T, H, W, _, _, _, tok0, _ in geometry.tolist():
        yield T, H, W, tok0


def _shuffled(t: torch.Tensor, split: tuple[int, ...], rows: tuple[int, ...]) -> torch.Tensor:
    """Row-major grid tokens -> merged rows (InternVL's pixel_shuffle channel order): ``t`` split
    as (..., T, H/S, S, W/S, S, C), the two middle axes swapped, then shaped as ``rows``."""
    return t.reshape(*split).transpose(-4, -3).reshape(*rows)  # unpacked: a tuple argument parses slower


def _grid_split(lead: tuple[int, ...], grid, S: int, C: int) -> tuple[int, ...]:
    """``_shuffled``'s split of (*lead, T*H*W, C) row-major tokens of a (T, H, W) ``grid``."""
    T, H, W = grid
    return (*lead, T, H // S, S, W // S, S, C)


def _blocks(t: torch.Tensor, T: int, H: int, W: int, S: int) -> torch.Tensor:
    """(B, T*H*W, C) row-major grid -> (B, T*(H/S)*(W/S), S*S*C) merged rows. Swapping axes 3 and
    4 is its own inverse."""
    B, _, C = t.shape
    return _shuffled(t, _grid_split((B,), (T, H, W), S, C), (B, T * (H // S) * (W // S), S * S * C))


def _unblocks(m: torch.Tensor, T: int, H: int, W: int, S: int) -> torch.Tensor:
    B, _, K = m.shape
    C = K // (S * S)
    return m.reshape(B, T, H // S, W // S, S, S, C).transpose(3, 4).reshape(B, T * H * W, C)


def merge_tokens(x: torch.Tensor, merge: int, order: str, grid, geometry) -> torch.Tensor:
    """(B, N, C) tokens -> (B*N/S², S²·C) merged rows (their count given: with C = 0 a -1 is ambiguous)."""
    B, N, C = x.shape
    rows, K = B * N // (merge * merge), merge * merge * C
    if order == "block":
        return x.reshape(rows, K)
    if geometry is None:
        return _shuffled(x, _grid_split((B,), grid, merge, C), (rows, K))
    return torch.cat([_blocks(x[:, tok0: tok0 + T * H * W], T, H, W, merge) for T, H, W, tok0 in _images(geometry)], 1).reshape(rows, K)


def unmerge_tokens(m: torch.Tensor, shape, merge: int, order: str, grid, geometry) -> torch.Tensor:
    """Inverse of ``merge_tokens``: (M, S²·C) rows -> tokens of ``shape`` (B, N, C)."""
    B, N, C = shape
    if order == "block":
        return m.reshape(shape)
    m = m.reshape(B, N // (merge * merge), m.shape[-1])  # not -1: B may be 0
    if geometry is None:
        return _unblocks(m, *grid, merge)
    parts, row0 = [], 0
    for T, H, W, _ in _images(geometry):
        rows = T * H * W // (merge * merge)
        parts.append(_unblocks(m[:, row0: row0 + rows], T, H, W, merge))
        row0 += rows
    return torch.cat(parts, 1)


def _rms_rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2.5-VL's RMSNorm scale ``rsqrt(mean(x²) + eps)`` of fp32 rows, keepdim."""
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _norm_source(x, merge, order, grid, geometry, pre) -> torch.Tensor:
    """The rows the norm spans: tokens (pre-merge) or merged rows (post-merge)."""
    return x if pre else merge_tokens(x, merge, order, grid, geometry)


def _rms_normalized(t, nw, eps) -> torch.Tensor:
    """Qwen2.5-VL's RMSNorm over ``t``'s last axis: ``t.float() * rsqrt(mean(t²) + eps)``, rounded
    to t's dtype, times the weight."""
    xf = t.to(stats_dtype(t.dtype))
    out = (xf * _rms_rstd(xf, eps)).to(t.dtype)
    return out * nw if nw is not None else out


def norm_forward(x, nw, nb, merge, order, grid, geometry, norm, pre, eps):
    """Merged norm output (M, K) in x's dtype (``merge_tokens``' rows), as the HF modules compute the norm: ``layer_norm``
    or Qwen2.5-VL's RMSNorm (``_rms_normalized``)."""
    src = _norm_source(x, merge, order, grid, geometry, pre)
    out = torch.layer_norm(src, [src.shape[-1]], nw, nb, eps) if norm == "layernorm" else _rms_normalized(src, nw, eps)
    return merge_tokens(out, merge, order, grid, geometry) if pre else out


def rms_norm_stats(x, merge, order, grid, geometry, pre, eps) -> torch.Tensor:
    """(M, groups, 2) per-group mean (0) and rstd of an RMSNorm in at least fp32, recomputed from the
    tokens for backward: the PyTorch twin of ``kernels/merge_norm.merge_norm_stats``."""
    xf = _norm_source(x, merge, order, grid, geometry, pre).to(stats_dtype(x.dtype))
    rstd = _rms_rstd(xf, eps)[..., 0]
    stats = torch.stack((torch.zeros_like(rstd), rstd), -1)
    if pre:
        stats = merge_tokens(stats.reshape(*x.shape[:2], 2), merge, order, grid, geometry)
    return stats.reshape(-1, merge * merge if pre else 1, 2)


def composed_forward(x, nw, nb, w1, b1, w2, b2, merge, order, grid, geometry, norm, pre, eps, activation, keep_residuals):
    """(y (M, out), pre-activation (M, hidden), None where not ``keep_residuals``): the HF
    sequence, cuBLAS for both Linears; a float32 norm's rows rounded to a 16-bit MLP's dtype, as
    autocast's Linear casts them. Each intermediate is freed once the next step has read it (the
    norm's rows after the first Linear; not kept, the pre-activation after the activation): the
    peak of the eager sequence, written as one expression."""
    h = norm_forward(x, nw, nb, merge, order, grid, geometry, norm, pre, eps)
    h = F.linear(h if h.dtype is w1.dtype else h.to(w1.dtype), w1, b1)
    if keep_residuals:
        return F.linear(reference.ACTIVATIONS[activation](h), w2, b2), h
    h = reference.ACTIVATIONS[activation](h)
    return F.linear(h, w2, b2), None


def forward_of(shape, merge, order, grid, norm, pre, eps, activation, out_features,
               rows_dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """``composed_forward`` for one dense signature: tokens of ``shape`` ((B, N, C) or (N, C)),
    merged in ``order`` (``grid``: (T, H, W)), as a function ``(x, nw, nb, w1, b1, w2, b2) -> y``
    of the op's output shape, ``(..., N / S², out_features)``. The same ATen ops on the same
    operands (the same bits), its shapes worked out here once; no residual (for calls that
    autograd does not record). ``rows_dtype``: the MLP's dtype where it differs from the norm's
    (a float32 norm, a 16-bit MLP), the norm's rows cast to it."""
    *lead, N, C = shape
    M, K = math.prod(lead) * N // (merge * merge), merge * merge * C
    out_shape = (*lead, N // (merge * merge), out_features)
    act = reference.ACTIVATIONS[activation]
    if order == "block":
        def merged(t):
            return t.reshape(M, K)
    else:
        split = _grid_split(lead, grid, merge, C)

        def merged(t):
            return _shuffled(t, split, (M, K))

    if norm == "layernorm":
        span = [C if pre else K]

        def normalized(t, nw, nb):
            return torch.layer_norm(t, span, nw, nb, eps)
    else:
        def normalized(t, nw, nb):
            return _rms_normalized(t, nw, eps)

    cast = rows_dtype is not None
    # h is each step's output in turn: the norm's rows are freed once the first Linear has read
    # them, the pre-activation once the activation has (the eager expression's peak; a local
    # holding the rows kept them through the activation and the second Linear)
    if pre:
        def forward(x, nw, nb, w1, b1, w2, b2):
            h = merged(normalized(x, nw, nb))
            h = F.linear(h.to(rows_dtype) if cast else h, w1, b1)
            h = act(h)
            return F.linear(h, w2, b2).view(*out_shape)
    else:
        def forward(x, nw, nb, w1, b1, w2, b2):
            h = normalized(merged(x), nw, nb)
            h = F.linear(h.to(rows_dtype) if cast else h, w1, b1)
            h = act(h)
            return F.linear(h, w2, b2).view(*out_shape)
    return forward


def rms_norm_backward(x, stats, nw, dn, merge, order, grid, geometry, pre, need_dx, n_dtype, need_dwn):
    """(dx, norm output (M, K) in ``n_dtype``, dweight), each None unless requested, of an RMSNorm: the PyTorch
    twin of ``kernels/merge_norm.merge_norm_backward``, in at least fp32 (ATen has no RMSNorm
    backward). Rows are viewed as (M, groups, width), the norm's span last, so the norm's weight
    (width,) broadcasts over a pre-merge row's S² tokens without being tiled."""
    acc = stats.dtype
    M, groups = stats.shape[:2]
    rstd = stats[..., 1:]
    C = x.shape[-1]
    K = merge * merge * C  # sizes spelled out: a -1 cannot be inferred where M is 0
    xhat = (merge_tokens(x, merge, order, grid, geometry).to(acc).view(M, groups, K // groups) - stats[..., :1]) * rstd
    dx = n = dwn = None
    if n_dtype is not None:
        n = (xhat * nw if nw is not None else xhat).to(n_dtype).view(M, K)
    if need_dwn or need_dx:
        g = dn.to(acc).reshape(M, groups, K // groups)
        if need_dwn:  # sum over rows, then over the S² tokens for a pre-merge norm
            dwn = (g * xhat).view(M, K).sum(0)
            dwn = dwn.view(merge * merge, C).sum(0) if pre else dwn
        if need_dx:
            dxhat = g * nw if nw is not None else g
            d = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
            dx = unmerge_tokens(d.view(M, K).to(x.dtype), x.shape, merge, order, grid, geometry)
    return dx, n, dwn


def layer_norm_backward(x, nw, nb, dn, merge, order, grid, geometry, pre, eps, need_dx, n_dtype, need_dwn, need_dbn):
    """(dx, norm output (M, K) in ``n_dtype``, dweight, dbias), each None unless requested, of a LayerNorm: ATen's
    own, as eager autograd runs it for ``F.layer_norm``: ``native_layer_norm`` recomputes the
    statistics (and the norm output: the forward's bits) and ``native_layer_norm_backward`` takes
    them, one call where a composed formula makes ~30. dweight and dbias in at least fp32."""
    src = _norm_source(x, merge, order, grid, geometry, pre)
    span = [src.shape[-1]]
    out, mean, rstd = torch.native_layer_norm(src, span, nw, nb, eps)
    if dn is not None and dn.dtype is not x.dtype:  # a 16-bit MLP's gradient into a float32 norm
        dn = dn.to(x.dtype)
    n = (merge_tokens(out, merge, order, grid, geometry) if pre else out).to(n_dtype) if n_dtype is not None else None
    dx = dwn = dbn = None
    if need_dx or need_dwn or need_dbn:
        g = unmerge_tokens(dn, x.shape, merge, order, grid, geometry) if pre else dn
        dx, dwn, dbn = _native_layer_norm_backward(g, src, span, mean, rstd, nw, nb, [need_dx, need_dwn, need_dbn])
        acc = stats_dtype(x.dtype)
        dx = (dx if pre else unmerge_tokens(dx, x.shape, merge, order, grid, geometry)) if need_dx else None
        dwn = dwn.to(acc) if need_dwn else None
        dbn = dbn.to(acc) if need_dbn else None
    return dx, n, dwn, dbn

