"""Adaptive average pooling of token grids, forward and its adjoint (the un-pooling of gradients).

Tokens are ``(B, N, C)`` with ``N = T*H*W`` in row-major (t, h, w) order, pooled to
``(B, OT*OH*OW, C)``.

* ``pool_tokens_kernel``: one program per (batch, output cell, channel block) sums its window,
  loading its tokens as one tile (``pool_tile``). Reads B*N*C elements (more where windows
  overlap), writes B*P*C.
* ``unpool_tokens_kernel``: the backward. One program per (batch, input token, channel block)
  *gathers* ``grad_out / |window|`` from every window that contains the token, in a fixed order,
  so the result is deterministic (PyTorch's CUDA adaptive-pool backward scatters with atomics and
  is not: pytorch issue 149130) and every input element is written exactly once.

Grid ``(B * cells, channel blocks)``: the batch rides on axis 0, whose limit is 2**31 - 1 (axes 1
and 2 stop at 65535), cells fastest so one image's programs run together. Both accumulate in fp32
and honour arbitrary strides of their (B, N, C) operands; program ids and token indices are
widened to int64 before they multiply strides.
"""

import torch
import triton
import triton.language as tl

from ._device import on_input_device
from ._host_arith import cdiv, next_power_of_2
from ._traceable import launcher
from .adaptive_window import max_window, window, windows_containing

UNPOOL_BLOCK_C = 1024  # 8 channels per thread of 4 warps: 16-byte loads and stores in 16-bit
TILE = 4096  # elements of one pooling program's [window tokens, channels] tile


@triton.jit
def pool_tokens_kernel(
    x_ptr, out_ptr,
    C, T, H, W, OT, OH, OW,
    sxb, sxn, sxc, sob, son, soc,
    BLOCK_C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (OT * OH * OW)
    cell = pid % (OT * OH * OW)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    ow = cell % OW
    oh = (cell // OW) % OH
    ot = cell // (OW * OH)
    t0, t1 = window(ot, T, OT)
    h0, h1 = window(oh, H, OH)
    w0, w1 = window(ow, W, OW)
    # KH window rows of KW tokens each load as one [KH * KW, BLOCK_C] tile: every load of a
    # window in flight at once (a token at a time, the loads wait on each other)
    r = tl.arange(0, KH * KW)
    dh = r // KW
    w = w0 + r % KW
    acc = tl.zeros([KH * KW, BLOCK_C], dtype=tl.float32)
    x_b = x_ptr + b * sxb
    for t in range(t0, t1):
        for h in range(h0, h1, KH):
            rows = h + dh
            token = ((t * H + rows) * W + w).to(tl.int64)
            valid = (rows < h1) & (w < w1)
            acc += tl.load(x_b + token[:, None] * sxn + c[None, :] * sxc, mask=valid[:, None] & c_mask[None, :],
                           other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0) / ((t1 - t0) * (h1 - h0) * (w1 - w0)).to(tl.float32)
    tl.store(out_ptr + b * sob + cell * son + c * soc, total.to(out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def unpool_tokens_kernel(
    g_ptr, dx_ptr,
    C, T, H, W, OT, OH, OW,
    sgb, sgp, sgc, sdb, sdn, sdc,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (T * H * W)
    token = pid % (T * H * W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    w = token % W
    h = (token // W) % H
    t = token // (W * H)
    it0, it1 = windows_containing(t, T, OT)
    ih0, ih1 = windows_containing(h, H, OH)
    iw0, iw1 = windows_containing(w, W, OW)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    g_b = g_ptr + b * sgb + c * sgc
    for ot in range(it0, it1):
        t0, t1 = window(ot, T, OT)
        for oh in range(ih0, ih1):
            h0, h1 = window(oh, H, OH)
            for ow in range(iw0, iw1):
                w0, w1 = window(ow, W, OW)
                count = ((t1 - t0) * (h1 - h0) * (w1 - w0)).to(tl.float32)
                cell = ((ot * OH + oh) * OW + ow).to(tl.int64)
                g = tl.load(g_b + cell * sgp, mask=c_mask, other=0.0).to(tl.float32)
                acc += g / count
    tl.store(dx_ptr + b * sdb + token * sdn + c * sdc, acc.to(dx_ptr.dtype.element_ty), mask=c_mask)


def _block_c(C: int, limit: int) -> int:
    return min(limit, next_power_of_2(C))


def pool_tile(C: int, H: int, W: int, OH: int, OW: int) -> tuple[int, int, int]:
    """(BLOCK_C, KH, KW) of ``pool_tokens_kernel``: KW covers the widest window (a power of two),
    KH as many of its rows as keep the tile at most 16 tokens (all of them for LLaVA's 2x2 and
    SigLIP's 27->12 windows, 4x4 at most), and the channel block fills 4096 elements (16-byte
    loads per thread for 16-bit tokens), at least 32 channels."""
    KW = next_power_of_2(max_window(W, OW))
    KH = next_power_of_2(max_window(H, OH))
    KH = KH if KH * KW <= 16 else 1
    return _block_c(C, max(32, TILE // (KH * KW))), KH, KW


@on_input_device
def pool_tokens(x: torch.Tensor, grid: tuple[int, int, int], out_grid: tuple[int, int, int]) -> torch.Tensor:
    """(B, T*H*W, C) -> (B, OT*OH*OW, C), adaptive average over each cell's window."""
    B, _, C = x.shape
    T, H, W = grid
    OT, OH, OW = out_grid
    P = OT * OH * OW
    out = torch.empty((B, P, C), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block, KH, KW = pool_tile(C, H, W, OH, OW)
    launcher(pool_tokens_kernel, x)[(B * P, cdiv(C, block))](
        x, out, C, T, H, W, OT, OH, OW, *x.stride(), *out.stride(), BLOCK_C=block, KH=KH, KW=KW,
    )
    return out


@on_input_device
def unpool_tokens(grad: torch.Tensor, grid: tuple[int, int, int], out_grid: tuple[int, int, int]) -> torch.Tensor:
    """Adjoint of ``pool_tokens``: (B, P, C) gradient -> (B, T*H*W, C) gradient."""
    B, _, C = grad.shape
    T, H, W = grid
    OT, OH, OW = out_grid
    N = T * H * W
    dx = torch.empty((B, N, C), device=grad.device, dtype=grad.dtype)
    if dx.numel() == 0:
        return dx
    block = _block_c(C, UNPOOL_BLOCK_C)
    launcher(unpool_tokens_kernel, grad)[(B * N, cdiv(C, block))](
        grad, dx, C, T, H, W, OT, OH, OW, *grad.stride(), *dx.stride(), BLOCK_C=block,
    )
    return dx


def pool_bytes(B: int, N: int, P: int, C: int, elem: int) -> int:
    """Fewest bytes pooling must move: read every token once, write every pooled cell once."""
    return (B * N * C + B * P * C) * elem
