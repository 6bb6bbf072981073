"""Where the tokens of a merged row live, and the norm applied to them: the tile helpers shared by
the patch-merge kernels (``merge_norm.py``, ``merge_gemm.py``).

A merge of size S concatenates each S x S block of patch tokens into one row of width S*S*C:
channel ``k = q*C + c`` of a merged row, ``q = dh*S + dw``, is channel ``c`` of the block's token
``(dh, dw)``. Hugging Face's Qwen2-VL ``PatchMerger`` (``view(-1, S*S*C)``) and InternVL's
``pixel_shuffle(x, 1/S)`` both give this channel order. Nothing is copied: every kernel reads a
merged row's tokens through the offsets below (a gather in its operand loads).

Token orders (``ORDER``):

* ``BLOCK`` (0): the block's tokens are consecutive, as the Qwen2/2.5/3-VL vision towers emit
  them: merged row ``m`` of a sequence is tokens ``m*S*S .. m*S*S + S*S - 1``.
* ``GRID`` (1): row-major ``(T, H, W)`` grids (InternVL, any ViT): merged row ``(t, i, j)`` reads
  tokens ``(t, S*i + dh, S*j + dw)``. ``PACKED``: a ragged batch of grids back to back, each row's
  image geometry from ``packed_pool``'s int32 tables (``[T, H, W, T, H/S, W/S, tok0, row0]``).

Norm statistics: ``NORM`` is ``LAYERNORM`` (0) or ``RMSNORM`` (1); ``PRE`` norms each token over
its C channels (S*S groups per merged row, Qwen2/2.5-VL), otherwise the merged row over its S*S*C
channels (one group; InternVL, Qwen3-VL's post-shuffle norm). ``stats`` is fp32
``(M, groups, 2)``: the mean (0 for RMSNorm) and ``1/sqrt(var + eps)`` of every group.
"""

import triton
import triton.language as tl

from .packed_pool import packed_geometry

BLOCK, GRID = 0, 1
ORDERS = {"block": BLOCK, "grid": GRID}
LAYERNORM, RMSNORM = 0, 1
NORMS = {"layernorm": LAYERNORM, "rmsnorm": RMSNORM}


def groups(merge: int, pre: bool) -> int:
    """Norm groups per merged row: one per token for a pre-merge norm, one for a post-merge norm."""
    return merge * merge if pre else 1


@triton.jit
def merged_rows(rows, row_mask, P, H, W, sxb, sxn, image_ptr, geometry_ptr,
                ORDER: tl.constexpr, PACKED: tl.constexpr, MERGE: tl.constexpr):
    """int64 element offsets ``(base, step_h)`` of merged rows ``rows`` (int64): token ``(dh, dw)``
    of row ``r`` lies at ``base[r] + dh * step_h[r] + dw * sxn``. Dense inputs are ``(B, N, C)``
    with ``P`` merged rows per batch element and grid ``(T, H, W)``."""
    if ORDER == 0:
        base = (rows // P) * sxb + (rows % P) * (MERGE * MERGE) * sxn
        step_h = tl.zeros_like(rows) + MERGE * sxn
    else:
        if PACKED:
            _, Hr, Wr, _, OH, OW, tok0, row0 = packed_geometry(rows, row_mask, image_ptr, geometry_ptr)
            cell = rows - row0
            first = tok0 * sxn
        else:
            Hr = tl.zeros_like(rows) + H
            Wr = tl.zeros_like(rows) + W
            OH = H // MERGE
            OW = W // MERGE
            cell = rows % P
            first = (rows // P) * sxb
        t = cell // (OH * OW)
        i = (cell // OW) % OH
        j = cell % OW
        base = first + ((t * Hr + MERGE * i) * Wr + MERGE * j) * sxn
        step_h = Wr.to(tl.int64) * sxn
    return base, step_h


@triton.jit
def load_token_tile(x_ptr, base, step_h, sxn, sxc, q, c, mask, MERGE: tl.constexpr):
    """fp32 ``[rows, c]`` tile of sub-token ``q`` of each merged row (0 where ``mask`` is off)."""
    offsets = base + (q // MERGE) * step_h + (q % MERGE) * sxn
    return tl.load(x_ptr + offsets[:, None] + c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def group_stats(stats_ptr, rows, row_mask, g, GROUPS: tl.constexpr):
    """(mean, rstd) of norm group ``g`` of each row."""
    p = stats_ptr + (rows * GROUPS + g) * 2
    return tl.load(p, mask=row_mask, other=0.0), tl.load(p + 1, mask=row_mask, other=0.0)


@triton.jit
def standardize(x, mean, rstd, mask, NORM: tl.constexpr):
    """x-hat: ``(x - mean) * rstd`` (LayerNorm) or ``x * rstd`` (RMSNorm); 0 where ``mask`` is off."""
    if NORM == 0:
        xhat = (x - mean[:, None]) * rstd[:, None]
    else:
        xhat = x * rstd[:, None]
    return tl.where(mask, xhat, 0.0)


@triton.jit
def standardized_tile(x_ptr, base, step_h, sxn, sxc, q, c, C, row_mask, mean, rstd, NORM: tl.constexpr, MERGE: tl.constexpr):
    """(x-hat ``[rows, c]`` tile of sub-token ``q``, 0 outside the tokens; the channel mask)."""
    c_mask = c < C
    mask = row_mask[:, None] & c_mask[None, :]
    x = load_token_tile(x_ptr, base, step_h, sxn, sxc, q, c, mask, MERGE)
    return standardize(x, mean, rstd, mask, NORM), c_mask


@triton.jit
def norm_channels(q, c, C, PRE: tl.constexpr):
    """Index into the norm's weight and bias of channel ``c`` of sub-token ``q``."""
    if PRE:
        return c
    else:
        return q * C + c


@triton.jit
def scale(xhat, wn_ptr, channel, c_mask, HAS_WN: tl.constexpr):
    """``xhat * weight`` (the norm's elementwise weight), or ``xhat`` without one."""
    if HAS_WN:
        return xhat * tl.load(wn_ptr + channel, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    else:
        return xhat


@triton.jit
def affine(xhat, wn_ptr, bn_ptr, channel, c_mask, HAS_WN: tl.constexpr, HAS_BN: tl.constexpr):
    """The norm's output ``xhat * weight + bias`` in fp32."""
    y = scale(xhat, wn_ptr, channel, c_mask, HAS_WN)
    if HAS_BN:
        y += tl.load(bn_ptr + channel, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return y
