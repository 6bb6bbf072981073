"""Ahead-of-time compile check of every Triton kernel of deco_ops, no GPU needed.

    python -m deco_ops.aot [--kernels pool_gemm,gemm_act_grad] [--targets 90,80]
                           [--dtypes fp16,bf16] [--json rows.json] [--jobs 2] [--doc docs/aot.md]
    python -m deco_ops.aot --summary rows.json [--doc docs/aot.md]

For each registered kernel, each entry of its CUDA config list (``cuda_configs()`` for the
autotuned kernels, the launcher's fixed block sizes for the plain ones), each dtype and a few
representative constexpr sets (activation, pooling window, ...), it compiles the kernel with
``triton.compile`` for sm_90 (Hopper, H100) and sm_80 (Ampere, A100) and reads the cubin back with
the ``cuobjdump`` that ships with Triton: registers per thread, spill bytes (ptxas' own count),
shared memory per program (Triton's dynamic allocation + static), and the tensor-core instruction
in the SASS (``HGMMA`` = Hopper warpgroup MMA, which sm_90 GEMMs need to reach their roofline;
``HMMA`` = the Ampere-style warp MMA), whether tiles move through Hopper's tensor memory accelerator
(``tma``: UTMALDG/UTMASTG/UBLKCP in the SASS, ``cp.async.bulk`` in the PTX) and whether the kernel
is warp-specialised (``warp_specialized``: producer/consumer warpgroups that resize their register
files, USETMAXREG / ``setmaxnreg``).

It prints a markdown table and exits non-zero on any compile error, any spill, shared memory over
the target's per-block limit, an fp16/bf16 GEMM config whose sm_90 SASS has no HGMMA, or a kernel
written for TMA and warp specialisation whose sm_90 SASS lacks either.

Kernels are compiled the way the JIT would compile them for a representative launch: integer
arguments are specialised from real-model values exactly as ``JITFunction`` does (a value of 1
becomes a constant, multiples of 16 get the divisibility hint), pointers are 16-byte aligned. Each
kernel's representative arguments live next to its registry entry below.

Nothing is cached globally: Triton's cache goes to a temporary directory removed at exit. The check
must run with compiled Triton, not its interpreter: if ``TRITON_INTERPRET=1`` is set (or
``DECO_OPS_BACKEND`` asked for it), the tool re-runs itself in a clean subprocess.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .projector import ACTIVATIONS

TARGETS = (90, 80)
# Largest shared memory one block may use (opt-in), bytes: H100 227 KiB, A100 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}
DTYPES = ("fp16", "bf16", "fp32")
_REEXEC_MARK = "DECO_OPS_AOT_CLEAN"
# The generated block of the compile report (docs/aot.md); the prose around it is kept.
DOC_BEGIN, DOC_END = "<!-- aot-summary:begin -->", "<!-- aot-summary:end -->"


# ----------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class Variant:
    """One representative specialisation of a kernel.

    ``args`` maps every non-config parameter of the kernel to a representative value: a pointer
    type string (``"*fp16"``), a Python int/float (specialised as the JIT would), or the value of
    a ``tl.constexpr`` parameter. ``hgmma`` says whether the sm_90 SASS must contain HGMMA (tensor
    core dots on fp16/bf16 operands); ``tma`` and ``warp_specialized`` whether it must show TMA
    copies and producer/consumer warpgroups (the kernels written for Hopper's TMA and Triton's
    automatic warp specialisation, which is silently off when its conditions are not met)."""

    label: str
    dtype: str
    args: dict[str, Any]
    hgmma: bool = False
    tma: bool = False
    warp_specialized: bool = False


@dataclasses.dataclass(frozen=True)
class Entry:
    """A kernel to compile: where it lives, its config list and its representative variants."""

    name: str
    module: str
    attr: str
    configs: Callable[[Any], list]  # module -> list[triton.Config]
    variants: Callable[[Any, list[str]], list[Variant]]  # (module, dtypes) -> variants
    optional: bool = False  # the module may not exist yet (work in progress elsewhere)
    # (module, config, variant, arch) -> whether the kernel's own autotune pruning keeps this
    # config for this variant on this target; pruned pairs are never launched, so not compiled.
    launchable: Callable[[Any, Any, Variant, int], bool] | None = None


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _plain_config(**meta):
    """A fixed launch config of a non-autotuned kernel (the JIT's defaults: 4 warps, 3 stages)."""
    import triton

    num_warps = meta.pop("num_warps", 4)
    num_stages = meta.pop("num_stages", 3)
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# -- representative shapes: LLaVA-1.5-7B projector (B=32, 24x24 patch grid, 1024 -> 4096 -> 4096),
#    pooled 24x24 -> 12x12 (2x2 windows) and 24x24 -> 6x6 (4x4 windows).
_B, _GRID, _C, _HIDDEN = 32, 24, 1024, 4096
_WINDOWS = {"2x2": 12, "4x4": 6}  # window label -> pooled side of a 24x24 grid
_PACKED_MODES = {0: "average", 1: "bilinear"}  # packed_pool.MODES
_FP32_PRECISIONS = ("ieee", "tf32")  # torch's default (allow_tf32=False) and allow_tf32=True
_ACTIVATIONS_ENV = "DECO_OPS_AOT_ACTIVATIONS"  # --activations, read here and in the workers


def _activations() -> tuple[str, ...]:
    """The epilogue activations compiled where a kernel compiles each of the projector's: all of
    them, or those ``--activations`` names (CI's sm_80 pass: their registers differ by <= 2 there)."""
    chosen = os.environ.get(_ACTIVATIONS_ENV, "")
    return tuple(a for a in ACTIVATIONS if a in chosen.split(",")) if chosen else ACTIVATIONS
_H100_SMS = 132  # the persistent kernels' grid (H100 SXM and H200: 132 SMs)


def _dtype_variants(dtypes: list[str]):
    """(dtype, input_precision, label suffix, tensor-core dot expected) for each requested dtype."""
    for dtype in dtypes:
        if dtype == "fp32":
            for precision in _FP32_PRECISIONS:
                yield dtype, precision, f"fp32/{precision}", False
        else:
            yield dtype, "tf32", dtype, True


def _pool_gemm_variants(module, dtypes):
    from .kernels import activations, adaptive_window

    out = []
    for dtype, precision, dlabel, tensor_cores in _dtype_variants(dtypes):
        for wlabel, side, act in [(w, side, a) for w, side in _WINDOWS.items() for a in _activations()
                                  if a == "gelu" or w == "2x2"]:
            win = adaptive_window.max_window(_GRID, side)
            M, N, K = _B * side * side, _HIDDEN, _C
            args = dict(
                x_ptr=_ptr(dtype), w_ptr=_ptr(dtype), b_ptr=_ptr(dtype), out_ptr=_ptr(dtype),
                pre_ptr=_ptr(dtype), pooled_ptr=_ptr(dtype),
                M=M, N=N, K=K, T=1, H=_GRID, W=_GRID, OT=1, OH=side, OW=side,
                sxb=_GRID * _GRID * _C, sxn=_C, sxc=1, swn=_C, swk=1,
                # training forward of pool_mlp: bias, activation, pre-activation and pooled rows kept
                HAS_BIAS=True, ACTIVATION=activations.CODES[act], STORE_PRE=True, STORE_POOLED=True,
                WT=1, WH=win, WW=win, DOT_FP32=False, INPUT_PRECISION=precision,
            )
            args.update(image_ptr="*i32", geometry_ptr="*i32", PACKED=False, MODE=0)  # tables unused
            out.append(Variant(f"{dlabel} {act} {wlabel}", dtype, args, hgmma=tensor_cores))
        # pool_gemm_packed (pool_mlp_packed's training forward): a ragged batch of 24x24 grids
        # pooled to 12x12, geometry from the int32 tables; runtime tap loops, WT=WH=WW=1.
        for mode, mlabel in _PACKED_MODES.items():
            M, N, K = _B * 144, _HIDDEN, _C
            args = dict(
                x_ptr=_ptr(dtype), w_ptr=_ptr(dtype), b_ptr=_ptr(dtype), out_ptr=_ptr(dtype),
                pre_ptr=_ptr(dtype), pooled_ptr=_ptr(dtype), image_ptr="*i32", geometry_ptr="*i32",
                M=M, N=N, K=K, T=1, H=1, W=1, OT=1, OH=1, OW=1,
                sxb=0, sxn=_C, sxc=1, swn=_C, swk=1,
                HAS_BIAS=True, ACTIVATION=activations.GELU, STORE_PRE=True, STORE_POOLED=True,
                WT=1, WH=1, WW=1, PACKED=True, MODE=mode, DOT_FP32=False, INPUT_PRECISION=precision,
            )
            out.append(Variant(f"{dlabel} gelu packed {mlabel}", dtype, args, hgmma=tensor_cores))
    return out


def _pool_gemm_launchable(module, config, variant, arch) -> bool:
    from .kernels._tuning import SMEM_LIMIT

    args = variant.args
    elem = _elem(variant)
    ieee = variant.dtype == "fp32" and args["INPUT_PRECISION"] == "ieee"
    return module.fits(config, args["WT"] * args["WH"] * args["WW"], elem, ieee, SMEM_LIMIT[arch], args.get("PACKED", False))


def _gemm_act_grad_variants(module, dtypes):
    from .kernels import activations

    out = []
    M, N, K = _B * 144, _HIDDEN, _HIDDEN  # dz = dy (M, out) @ w2 (out, hidden)
    for dtype, precision, dlabel, tensor_cores in _dtype_variants(dtypes):
        for act in _activations():
            args = dict(
                dy_ptr=_ptr(dtype), w_ptr=_ptr(dtype), z_ptr=_ptr(dtype), dz_ptr=_ptr(dtype), a_ptr=_ptr(dtype),
                M=M, N=N, K=K, sdym=K, sdyk=1, swk=N, swn=1, szm=N, szn=1,
                ACTIVATION=activations.CODES[act], DOT_FP32=False, INPUT_PRECISION=precision,
            )
            out.append(Variant(f"{dlabel} {act}", dtype, args, hgmma=tensor_cores))
    return out


def _tma_gemm_variants(module, dtypes):
    """kernels/tma_gemm.py, 16-bit only: the projector's first GEMM in its training forward (bias,
    activation, pre-activation kept; LLaVA-1.5-7B pooled 2x2: x (B*144, 1024), w1 (4096, 1024)) and
    the backward's dH GEMM (dz = dy @ w2 * act'(z), act(z); dy (B*144, 4096), w2 (4096, 4096))."""
    from .kernels import activations

    out = []
    M = _B * 144
    for dtype, _, dlabel, _ in _dtype_variants([d for d in dtypes if d != "fp32"]):
        for epilogue, elabel, K in ((module.BIAS_ACT, "bias_act", _C), (module.ACT_GRAD, "act_grad", _HIDDEN)):
            for act in _activations():
                args = dict(
                    a_ptr=_ptr(dtype), w_ptr=_ptr(dtype), b_ptr=_ptr(dtype), z_ptr=_ptr(dtype), out_ptr=_ptr(dtype),
                    aux_ptr=_ptr(dtype), M=M, N=_HIDDEN, K=K, sam=K, swr=K if epilogue == module.BIAS_ACT else _HIDDEN,
                    szm=_HIDDEN, EPILOGUE=epilogue, HAS_BIAS=epilogue == module.BIAS_ACT,
                    STORE_PRE=epilogue == module.BIAS_ACT, ACTIVATION=activations.CODES[act], DOT_FP32=False,
                    NUM_SMS=_H100_SMS,
                )
                out.append(Variant(f"{dlabel} {elabel} {act}", dtype, args, hgmma=True, tma=True, warp_specialized=True))
    return out


def _tma_gemm_launchable(module, config, variant, arch) -> bool:
    # TMA descriptors and wgmma are Hopper's: the launcher runs this kernel on sm_90 only.
    return arch == 90 and module.fits(config, _elem(variant), SMEM_LIMIT[arch], variant.args["EPILOGUE"])


def _mlp_pool_variants(module, dtypes):
    """gemm_unpool_act_grad (mlp_pool's backward): dz = act'(x @ w1.T + b1) * unpool(dpa) over
    the tokens of a packed batch of 24x24 grids pooled to 12x12 (x (B*576, 1024), w1 (4096, 1024))."""
    from .kernels import activations

    out = []
    M, N, K = _B * _GRID * _GRID, _HIDDEN, _C
    for dtype, precision, dlabel, tensor_cores in _dtype_variants(dtypes):
        for (mode, mlabel), act in [(m, a) for m in _PACKED_MODES.items() for a in _activations()]:
            args = dict(
                # dpa = dy @ W2 stays fp32 until un-pooled (deco_ops/mlp_pool.py)
                x_ptr=_ptr(dtype), w_ptr=_ptr(dtype), b_ptr=_ptr(dtype), g_ptr=_ptr("fp32"), dz_ptr=_ptr(dtype),
                image_ptr="*i32", geometry_ptr="*i32",
                M=M, N=N, K=K, sxm=K, sxk=1, swn=K, swk=1, sgp=N, sgn=1,
                HAS_BIAS=True, ACTIVATION=activations.CODES[act], MODE=mode, DOT_FP32=False,
                INPUT_PRECISION=precision,
            )
            out.append(Variant(f"{dlabel} {act} {mlabel}", dtype, args, hgmma=tensor_cores))
    return out


def _activation_backward_variants(module, dtypes):
    """activation_backward (the composed MLP backward's elementwise pass after cuBLAS's dh = dy @ W2):
    dz, act and db1 (partial sums, then the last program's sum) over LLaVA's B*144 pooled rows x hidden
    4096 (no dots)."""
    from .kernels import activations

    out = []
    M, N = _B * 144, _HIDDEN
    for dtype in dtypes:
        for act in _activations():
            args = dict(
                dh_ptr=_ptr(dtype), z_ptr=_ptr(dtype), dz_ptr=_ptr(dtype), a_ptr=_ptr(dtype), partial_ptr=_ptr("fp32"),
                count_ptr="*i32", db_ptr=_ptr(dtype),
                M=M, N=N, sdm=N, sdn=1, szm=N, szn=1, ACTIVATION=activations.CODES[act], BIAS_GRAD=True,
            )
            out.append(Variant(f"{dtype} {act}", dtype, args))
    return out


def _packed_pool_variants(module, dtypes, unpool: bool):
    """pool_packed / unpool_packed: a packed batch of 24x24 grids <-> 12x12, C = 1024 (no dots)."""
    out = []
    rows, tokens = _B * 144, _B * _GRID * _GRID
    for dtype in dtypes:
        for mode, mlabel in _PACKED_MODES.items():
            if unpool:  # g (rows, C) -> dx (tokens, C)
                args = dict(g_ptr=_ptr(dtype), dx_ptr=_ptr(dtype), N=tokens, sgn=_C, sgc=1, sdn=_C, sdc=1)
            else:  # x (tokens, C) -> out (rows, C)
                args = dict(x_ptr=_ptr(dtype), out_ptr=_ptr(dtype), M=rows, sxn=_C, sxc=1, son=_C, soc=1)
            args.update(image_ptr="*i32", geometry_ptr="*i32", C=_C, MODE=mode)
            out.append(Variant(f"{dtype} {mlabel}", dtype, args))
    return out


def _pool_tokens_variants(module, dtypes, unpool: bool):
    out = []
    for dtype in dtypes:
        for wlabel, side in list(_WINDOWS.items())[:1]:  # windows are runtime values here: one compile
            # pool: x (B, 576, C) -> out (B, side^2, C); unpool: g (B, side^2, C) -> dx (B, 576, C)
            big, small = (_GRID * _GRID * _C, _C, 1), (side * side * _C, _C, 1)
            src, dst = (small, big) if unpool else (big, small)
            names = ("g_ptr", "dx_ptr", "sgb", "sgp", "sgc", "sdb", "sdn", "sdc") if unpool else (
                "x_ptr", "out_ptr", "sxb", "sxn", "sxc", "sob", "son", "soc")
            args = {names[0]: _ptr(dtype), names[1]: _ptr(dtype), "C": _C, "T": 1, "H": _GRID, "W": _GRID,
                    "OT": 1, "OH": side, "OW": side}
            args.update(zip(names[2:5], src))
            args.update(zip(names[5:8], dst))
            out.append(Variant(f"{dtype} {wlabel}", dtype, args))
    return out


def _pool_tokens_configs(module):
    # The tiles ``pool_tile`` picks (JIT default warps/stages): LLaVA's 2x2 windows at C = 1024,
    # SigLIP's 27 -> 12 (windows of 3-4), a global pool of a 24x24 grid (one row of 32 at a time).
    return [_plain_config(**dict(zip(("BLOCK_C", "KH", "KW"), module.pool_tile(C, H, W, OH, OW))))
            for C, H, W, OH, OW in ((1024, 24, 24, 12, 12), (1152, 27, 27, 12, 12), (1024, 24, 24, 1, 1))]


def _unpool_tokens_configs(module):
    # The launcher uses BLOCK_C = min(UNPOOL_BLOCK_C, next_pow2(C)) with the JIT's default warps/stages.
    return [_plain_config(BLOCK_C=module.UNPOOL_BLOCK_C), _plain_config(BLOCK_C=64)]


# -- patch-merge projectors (kernels/merge_gemm.py, kernels/merge_norm.py): 16 images' worth of
#    merged rows (M = 4096), Qwen2-VL-7B (block order, LayerNorm over C = 1280 before the merge,
#    K = hidden = 5120), Qwen2.5-VL (RMSNorm, no bias) and InternVL2.5-8B (32x32 grid of C = 1024,
#    pixel-shuffled, LayerNorm over K = 4096 after it, hidden 4096); packed grids for the ragged path.
_MERGE_ROWS = 4096
_MERGE_VARIANTS = {  # label -> (C, hidden, ORDER, PACKED, NORM, PRE, norm bias)
    "qwen2vl": (1280, 5120, 0, False, 0, True, True),
    "qwen25vl rms": (1280, 5120, 0, False, 1, True, False),
    "internvl": (1024, 4096, 1, False, 0, False, True),
    "internvl packed": (1024, 4096, 1, True, 0, False, True),
}


def _merge_layout(dtype: str, C: int, order: int, packed: bool, pre: bool, norm: int, bias: bool) -> dict:
    tokens = 4 * _MERGE_ROWS
    tables = "*i32" if packed else "*fp32"  # the launcher passes the stats tensor when unused
    return dict(
        x_ptr=_ptr(dtype), stats_ptr="*fp32", image_ptr=tables, geometry_ptr=tables,
        C=C, P=_MERGE_ROWS // 16, H=32, W=32, sxb=tokens // 16 * C, sxn=C, sxc=1,
        ORDER=order, PACKED=packed, MERGE=2, NORM=norm, PRE=pre,
    )


def _norm_dtypes(dtype: str, label: str) -> tuple[tuple[str, str], ...]:
    """(tokens' and norm's dtype, label suffix) of a merge variant: its own dtype, and for a 16-bit
    Qwen2-VL variant the fp32 tokens and norm ``torch.autocast`` gives it (``_autocast.NORM_IN_FP32``)."""
    if dtype == "fp32" or label != "qwen2vl":
        return ((dtype, ""),)
    return (dtype, ""), ("fp32", " fp32-norm")


def _merge_gemm_variants(module, dtypes):
    from .kernels import activations

    out = []
    for dtype, precision, dlabel, tensor_cores in _dtype_variants(dtypes):
        for label, (C, hidden, order, packed, norm, pre, bias) in _MERGE_VARIANTS.items():
            for (norm_dtype, suffix), act in [(n, a) for n in _norm_dtypes(dtype, label)
                                              for a in (_activations() if label == "qwen2vl" and not n[1] else ("gelu",))]:
                args = _merge_layout(norm_dtype, C, order, packed, pre, norm, bias)
                args.update(
                    wn_ptr=_ptr(norm_dtype), bn_ptr=_ptr(norm_dtype), w_ptr=_ptr(dtype), b_ptr=_ptr(dtype), out_ptr=_ptr(dtype),
                    pre_ptr=_ptr(dtype), M=_MERGE_ROWS, N=hidden, swn=4 * C, swk=1,
                    # training forward: the pre-activation is kept
                    HAS_WN=True, HAS_BN=bias, HAS_BIAS=True, ACTIVATION=activations.CODES[act], STORE_PRE=True,
                    DOT_FP32=False, INPUT_PRECISION=precision,
                )
                out.append(Variant(f"{dlabel} {act} {label}{suffix}", dtype, args, hgmma=tensor_cores))
    return out


def _merge_norm_variants(module, dtypes, backward: bool):
    out = []
    for dtype in dtypes:
        for label, (C, _, order, packed, norm, pre, bias) in _MERGE_VARIANTS.items():
            for norm_dtype, suffix in _norm_dtypes(dtype, label) if backward else ((dtype, ""),):
                args = _merge_layout(norm_dtype, C, order, packed, pre, norm, bias)
                args["M"] = _MERGE_ROWS
                if backward:  # every gradient requested: the most live tiles (dn and n in the MLP's dtype)
                    args.update(
                        wn_ptr=_ptr(norm_dtype), bn_ptr=_ptr(norm_dtype), dn_ptr=_ptr(dtype), dx_ptr=_ptr(norm_dtype),
                        n_ptr=_ptr(dtype), dwn_ptr="*fp32", dbn_ptr="*fp32", sdb=args["sxb"], sdn=C, sdc=1, HAS_WN=True,
                        HAS_BN=bias, NEED_DX=True, STORE_N=True, NEED_DWN=True, NEED_DBN=bias,
                    )
                else:
                    args["eps"] = 1e-6
                out.append(Variant(f"{dtype} {label}{suffix}", dtype, args))
    return out


def _merge_norm_configs(module):
    return [_plain_config(**c.kwargs, num_warps=c.num_warps) for c in module.cuda_configs()]


# -- cross-attention (kernels/cross_attention_fwd.py, kernels/cross_attention_bwd.py) ----------
# Representative shapes: BLIP-2 Q-Former (B=64, M=32 queries, N=257 keys, H=12, D=64) and the
# Qwen-VL resampler (M=256, N=1024, H=32, D=128); head dim 80 is padded to a 128 block. Every
# kernel with dots is compiled twice per head dim: inference (dense keys, no dropout) and BLIP-2's
# training path (``kv_lens``, dropout, whose in-loop Philox mask takes the most registers, and an
# additive mask, ``HAS_BIAS``: one more tile loaded per key block). ``--full`` also compiles every
# other combination of the three (a mask alone in inference, dropout alone, ...): ptxas's register
# allocation is not monotone in them, so a tile clean with all three can spill with fewer (triton
# 3.9: the forward's 16x128 tile on 4 warps at head dim 128, with dropout alone).
_ATTN_HEAD_DIMS = (64, 80, 128)
_EXTRAS = ("drop", "lens", "bias")  # dropout, kv_lens, an additive mask: BLIP-2's training path
# The default run compiles the representative subset below; ``--full`` (DECO_OPS_AOT_FULL=1 in the
# workers) compiles every variant. Head dim 80 pads to BLOCK_D=128 and compiles to the same code as
# 128 (only runtime ints differ, all multiples of 16), the split forward differs from the plain one
# only in its epilogue (kept at D=128), the single-pass backward's worst case is its largest
# BLOCK_M, and kernels without dots compile identically for fp32/ieee and fp32/tf32.


def _full() -> bool:
    return os.environ.get("DECO_OPS_AOT_FULL", "0") not in ("", "0")


def _attn_head_dims() -> tuple[int, ...]:
    return _ATTN_HEAD_DIMS if _full() else (64, 128)


def _attn_extras() -> list[tuple[str, ...]]:
    """The non-empty combinations of ``_EXTRAS`` compiled: all three together, or with ``--full``
    every one."""
    if not _full():
        return [_EXTRAS]
    return [c for r in range(1, len(_EXTRAS) + 1) for c in itertools.combinations(_EXTRAS, r)]


_ATTN_SHAPES = {  # head dim -> (B, M queries, N keys, H): BLIP-2 Q-Former, padded D=80, Qwen-VL resampler
    64: (64, 32, 257, 12), 80: (64, 32, 257, 12), 128: (16, 256, 1024, 32),
}
# The FA2 backward (dkdv, dq) runs only where the single pass cannot (cross_attention_bwd.use_single_pass:
# M > 128 or BLOCK_M * BLOCK_D > 8192): Qwen-VL's 256 queries at every head dim.
_FA2_SHAPE = (16, 256, 1024, 32)
_FP32_BUFFERS = ("lse_ptr", "m_ptr", "l_ptr", "delta_ptr", "part_o_ptr", "part_m_ptr", "part_l_ptr", "dq_acc_ptr", "sum_ptr")
# Dense keys and no dropout: the launchers pass the fp32 ``lse`` tensor for the unused kv_lens /
# cu_seqlens_k (int32 when used) and rng (int64 (seed, offset) when used) pointers.
_UNUSED_PTRS = ("lens_ptr", "cu_ptr", "rng_ptr", "bias_ptr")
# kv_lens as the launchers pass it; (seed, offset); a bool mask as converted (fp32 0 / -inf)
_TRAINING_PTRS = {"lens_ptr": "*i32", "rng_ptr": "*i64", "bias_ptr": "*fp32"}
# The backward's in-kernel dQ sum: fp32 partials and int32 arrival counters (empty when unused).
_DQ_SUM_PTRS = {"dq_part_ptr": "*fp32", "count_ptr": "*i32"}
_STRIDE = re.compile(r"^s(q|k|v|o|do|dq|dk|dv)(s?)(b|m|n|h|d)$")


def _attn_args(fn, dtype: str, precision: str, D: int, shape=None, extras: tuple[str, ...] = (),
               **constexprs) -> dict[str, Any]:
    """Representative arguments of a cross-attention kernel, from its parameter names: (B, L, H, D)
    contiguous tensors, fp32 statistics, as the launchers pass them; dense keys, no dropout and no
    mask, but for ``extras`` (of ``_EXTRAS``): dropout 0.1, ``kv_lens``, a per-key mask."""
    pointer_of = {"drop": "rng_ptr", "lens": "lens_ptr", "bias": "bias_ptr"}
    used = {pointer_of[e] for e in extras}
    import triton

    from .kernels.cross_attention_fwd import split_ranges

    B, M, N, H = shape or _ATTN_SHAPES[D]
    split = constexprs.get("SPLIT", False)
    S = 4 if split else 1
    args: dict[str, Any] = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            if name in _DQ_SUM_PTRS:
                args[name] = _DQ_SUM_PTRS[name]
            elif name in used:
                args[name] = _TRAINING_PTRS[name]
            elif name in _UNUSED_PTRS or name in _FP32_BUFFERS or (split and name in ("o_ptr", "dq_ptr")):
                args[name] = "*fp32"
            else:
                args[name] = _ptr(dtype)
        elif name == "sdqs":  # split stride of the single pass's dQ partials
            args[name] = B * M * H * D
        elif name == "dq_batches":  # batches sharing one query set (never specialised: one binary)
            args[name] = B
        elif name in ("sbb", "sbh", "sbm", "sbn"):  # a per-key mask (B, 1, 1, N) broadcast: zero strides
            args[name] = {"sbb": N, "sbh": 0, "sbm": 0, "sbn": 1}[name]
        elif name in ("swb", "swh", "swm", "swn"):  # head-averaged weights (B, M, N)
            args[name] = {"swb": M * N, "swh": 0, "swm": N, "swn": 1}[name]
        elif m := _STRIDE.match(name):
            L = N if m.group(1) in ("k", "v", "dk", "dv") else M
            args[name] = {"b": L * H * D, "m": H * D, "n": H * D, "h": D, "d": 1}[m.group(3)]
            if m.group(2):  # split stride of a partial dQ
                args[name] = B * L * H * D
        elif name in ("B", "BH", "H", "M", "N", "D", "S", "keys_per_split"):
            args[name] = {"B": B, "BH": B * H, "H": H, "M": M, "N": N, "D": D, "S": S,
                          "keys_per_split": split_ranges(N, S)[0]}[name]
        elif name in ("qk_scale", "scale", "dropout_p"):
            args[name] = {"qk_scale": D ** -0.5 * 1.4426950408889634, "scale": D ** -0.5,
                          "dropout_p": 0.1 if "drop" in extras else 0.0}[name]
    import triton.language as tl

    defaults = dict(KV_MODE=int("lens" in extras), HAS_BIAS="bias" in extras, DROPOUT="drop" in extras, AVERAGE=True, ACC=tl.float32,
                    DELTA_FROM_O=False, DQ_ATOMIC=False, ROW_SUMS=False,
                    DOT_FP32=False, INPUT_PRECISION=precision,
                    BLOCK_D=max(16, triton.next_power_of_2(D)), SPLIT=False,
                    BLOCK_M=max(16, triton.next_power_of_2(M)))  # single-pass bwd: all queries in one block
    configured = set().union(*(c.kwargs for c in _ATTN_CONFIGS.get(fn.__name__, lambda: [])()))
    for p in fn.params:
        if p.is_constexpr and p.name in defaults and p.name not in args and p.name not in configured:
            args[p.name] = constexprs.get(p.name, defaults[p.name])
    return args


def _single_pass_shapes(D: int, elem: int):
    """(label, shape) of the single-pass backward at head dim D: BLIP-2's 32 queries and the most
    queries the launcher gives it at this head dim (the largest BLOCK_M, the most registers)."""
    from .kernels.cross_attention_bwd import SINGLE_PASS_MAX_M, SINGLE_PASS_MAX_TILE, use_single_pass

    B, M, N, H = _ATTN_SHAPES[64]
    largest = min(SINGLE_PASS_MAX_M, SINGLE_PASS_MAX_TILE * 2 // elem // max(16, 1 << (D - 1).bit_length()))
    out = [(f" M{largest}", (B, largest, N, H))]
    if _full() and largest != M and use_single_pass(M, D, elem):  # fp32 at head dim 128 runs BLIP-2 in FA2
        out.insert(0, ("", (B, M, N, H)))
    assert all(use_single_pass(shape[1], D, elem) for _, shape in out)
    return out


_ATTN_CONFIGS: dict[str, Callable[[], list]] = {}  # kernel name -> its config list (set by _attn_entries)


def _attn_variants(attr: str, splits=(False,), gemm: bool = True, alternate: str | None = None, fixed: dict | None = None):
    """``alternate``: a constexpr switching on a second code path (dK/dV's own Delta), compiled
    with dense keys (the training path without it); ``--full`` compiles both paths on both.
    ``fixed``: constexprs set in every variant (the dK/dV kernel's one-kernel schedule)."""
    def variants(module, dtypes):
        fn = _raw_jit_function(getattr(module, attr))
        out = []
        for dtype, precision, dlabel, tensor_cores in _dtype_variants(dtypes):
            if not gemm and precision == "ieee" and not _full():  # no dots: ieee == tf32
                continue
            for D in _attn_head_dims():
                if "single_pass" in attr:
                    shapes = _single_pass_shapes(D, 4 if dtype == "fp32" else 2)
                elif attr in ("cross_attention_bwd_dkdv_kernel", "cross_attention_bwd_dq_kernel"):
                    shapes = [("", _FA2_SHAPE)]
                else:
                    shapes = [("", None)]
                for slabel, shape in shapes:
                    both = (False, True) if alternate and _full() else ()
                    combos = [(split, (), alt) for split in splits for alt in both or (alternate is not None,)]
                    combos += [(False, extras, alt) for extras in _attn_extras() for alt in both or (False,)] if gemm else []
                    for split, extras, alt in combos:
                        if split and D != max(_attn_head_dims()) and not _full():
                            continue
                        args = _attn_args(fn, dtype, precision, D, shape, extras=extras, SPLIT=split,
                                          **({alternate: True} if alt else {}), **(fixed or {}))
                        label = (f"{dlabel} D{D}{slabel}" + (" split" if split else "") + (" " + "+".join(extras) if extras else "")
                                 + (f" {alternate}" if alt else ""))
                        out.append(Variant(label, dtype, args, hgmma=tensor_cores and gemm))
        return out

    return variants


# kernels/cross_attention_tma.py: BLIP-2's Q-Former (two heads per program; split keys at batch 1),
# the Qwen-VL resampler (M=256, N=1024, H=16, D=128: the warp-specialised 128 x 128 tile) and the
# plain 64-query tile between them.
_TMA_ATTN_SHAPES = {"blip2": (64, 32, 257, 12, 64), "blip2 B1": (1, 32, 257, 12, 64), "qwenvl": (16, 256, 1024, 16, 128),
                    "M64": (16, 64, 1024, 16, 128)}  # a 64-query tile, one head per program


def _attn_tma_variants(module, dtypes):
    """16-bit only (the strategy offers the kernel for fp16/bf16 on sm_90); dense keys and
    ``kv_lens`` at each shape, split keys where the launcher splits (BLIP-2 at batch 1)."""
    fn = _raw_jit_function(module.cross_attention_tma_kernel)
    out = []
    for dtype, precision, dlabel, _ in _dtype_variants([d for d in dtypes if d != "fp32"]):
        for name, (B, M, N, H, D) in _TMA_ATTN_SHAPES.items():
            split = B == 1
            for lens in (False, True):
                block_m, heads, ws = module.tile(M, H, D, ragged=lens)
                args = _attn_args(fn, dtype, precision, D, (B, M, N, H), SPLIT=split, BLOCK_M=block_m)
                args.update(KV_MODE=int(lens), lens_ptr="*i32" if lens else "*fp32", HEADS=heads, WARP_SPECIALIZE=ws)
                label = f"{dlabel} {name} D{D} heads{heads}" + (" split" if split else "") + (" lens" if lens else "")
                out.append(Variant(label, dtype, args, hgmma=ws, tma=True, warp_specialized=ws))
    return out


def _weights_launchable(module, config, variant, arch) -> bool:
    a = variant.args
    return module.fits(config, _elem(variant), a["INPUT_PRECISION"] == "ieee", a["DROPOUT"] or a["HAS_BIAS"])


def _attn_tma_launchable(module, config, variant, arch) -> bool:
    # TMA descriptors are Hopper's: the strategy offers this kernel on sm_90 only.
    a = variant.args
    return arch == 90 and module.fits(config, a["BLOCK_M"], a["HEADS"], a["BLOCK_D"], _elem(variant), SMEM_LIMIT[arch])


def _elem(variant: Variant) -> int:
    return 4 if variant.dtype == "fp32" else 2


def _attn_entries() -> list[Entry]:
    """The cross-attention kernels (kernels/cross_attention_fwd.py, kernels/cross_attention_bwd.py)."""
    fwd, bwd = "deco_ops.kernels.cross_attention_fwd", "deco_ops.kernels.cross_attention_bwd"
    weights = "deco_ops.kernels.cross_attention_weights"

    def configs(module_name, fn_name):
        def get():
            return getattr(importlib.import_module(module_name), fn_name)()
        return get

    _ATTN_CONFIGS.update({
        "cross_attention_fwd_kernel": configs(fwd, "cuda_configs"),
        "cross_attention_combine_kernel": configs(fwd, "combine_cuda_configs"),
        "cross_attention_bwd_single_pass_kernel": configs(bwd, "single_pass_cuda_configs"),
        "cross_attention_bwd_dkdv_kernel": configs(bwd, "fa2_cuda_configs"),
        "cross_attention_bwd_dq_kernel": configs(bwd, "fa2_cuda_configs"),
        "cross_attention_weights_kernel": configs(weights, "cuda_configs"),
    })
    return [
        Entry("cross_attention_fwd", fwd, "cross_attention_fwd_kernel", lambda m: m.cuda_configs(),
              _attn_variants("cross_attention_fwd_kernel", splits=(False, True)), optional=True,
              launchable=lambda m, config, variant, arch: m.fits(
                  config, _elem(variant), variant.args["INPUT_PRECISION"] == "ieee", variant.args["DROPOUT"], arch,
                  variant.args["HAS_BIAS"], variant.args["BLOCK_D"])),
        Entry("cross_attention_tma", "deco_ops.kernels.cross_attention_tma", "cross_attention_tma_kernel",
              lambda m: m.cuda_configs(), _attn_tma_variants, launchable=_attn_tma_launchable),
        Entry("cross_attention_combine", fwd, "cross_attention_combine_kernel", lambda m: m.combine_cuda_configs(),
              _attn_variants("cross_attention_combine_kernel", gemm=False), optional=True),
        Entry("cross_attention_bwd_single_pass", bwd, "cross_attention_bwd_single_pass_kernel",
              lambda m: m.single_pass_cuda_configs(), _attn_variants("cross_attention_bwd_single_pass_kernel"), optional=True,
              launchable=lambda m, config, variant, arch: m.single_pass_fits(
                  config, variant.args["BLOCK_M"], variant.args["BLOCK_D"], _elem(variant), variant.args["DROPOUT"], arch)),
        Entry("cross_attention_bwd_dkdv", bwd, "cross_attention_bwd_dkdv_kernel", lambda m: m.fa2_cuda_configs(),
              _attn_variants("cross_attention_bwd_dkdv_kernel", alternate="DELTA_FROM_O"), optional=True,
              launchable=lambda m, config, variant, arch: m.fa2_fits(
                  "dkdv", config, _elem(variant), variant.args["DROPOUT"], variant.args["BLOCK_D"], arch,
                  variant.args["DELTA_FROM_O"], variant.args["HAS_BIAS"])),
        Entry("cross_attention_bwd_one_kernel", bwd, "cross_attention_bwd_dkdv_kernel", lambda m: m.fa2_cuda_configs(),
              _attn_variants("cross_attention_bwd_dkdv_kernel", fixed={"DELTA_FROM_O": True, "DQ_ATOMIC": True}),
              optional=True,
              launchable=lambda m, config, variant, arch: m.fa2_fits(
                  "one_kernel", config, _elem(variant), variant.args["DROPOUT"], variant.args["BLOCK_D"], arch)),
        Entry("cross_attention_bwd_dq", bwd, "cross_attention_bwd_dq_kernel", lambda m: m.fa2_cuda_configs(),
              _attn_variants("cross_attention_bwd_dq_kernel"), optional=True,
              launchable=lambda m, config, variant, arch: m.fa2_fits(
                  "dq", config, _elem(variant), variant.args["DROPOUT"], variant.args["BLOCK_D"], arch,
                  bias=variant.args["HAS_BIAS"])),
        Entry("cross_attention_weights", weights, "cross_attention_weights_kernel", lambda m: m.cuda_configs(),
              _attn_variants("cross_attention_weights_kernel"), optional=True, launchable=_weights_launchable),
        # the same kernel's first pass: each row's sum over all keys, per head, without dropout
        Entry("cross_attention_row_sums", weights, "cross_attention_weights_kernel", lambda m: m.cuda_configs(),
              _attn_variants("cross_attention_weights_kernel", fixed={"ROW_SUMS": True, "AVERAGE": False, "DROPOUT": False}),
              optional=True, launchable=_weights_launchable),
    ]


REGISTRY: list[Entry] = [
    Entry("pool_gemm", "deco_ops.kernels.pool_gemm", "pool_gemm_kernel",
          configs=lambda m: m.cuda_configs(), variants=_pool_gemm_variants, launchable=_pool_gemm_launchable),
    Entry("gemm_act_grad", "deco_ops.kernels.gemm_act_grad", "gemm_act_grad_kernel",
          configs=lambda m: m.cuda_configs(), variants=_gemm_act_grad_variants,
          launchable=lambda m, config, variant, arch: m.fits(config, _elem(variant))),
    Entry("tma_gemm", "deco_ops.kernels.tma_gemm", "tma_gemm_kernel",
          configs=lambda m: m.cuda_configs(), variants=_tma_gemm_variants, launchable=_tma_gemm_launchable),
    Entry("gemm_unpool_act_grad", "deco_ops.kernels.mlp_pool", "gemm_unpool_act_grad_kernel",
          configs=lambda m: m.cuda_configs(), variants=_mlp_pool_variants,
          launchable=lambda m, config, variant, arch: m.fits(config, _elem(variant), variant.args["ACTIVATION"], variant.args["MODE"])),
    Entry("activation_backward", "deco_ops.kernels.activation_backward", "activation_backward_kernel",
          configs=lambda m: [_plain_config(ROWS=m.ROWS, BLOCK_M=m.BLOCK_M, BLOCK_N=m.BLOCK_N)],
          variants=_activation_backward_variants),
    Entry("pool_packed", "deco_ops.kernels.packed_pool", "pool_packed_kernel",
          configs=lambda m: m.cuda_configs(), variants=lambda m, d: _packed_pool_variants(m, d, unpool=False),
          launchable=lambda m, config, variant, arch: m.fits(config, _elem(variant))),
    Entry("unpool_packed", "deco_ops.kernels.packed_pool", "unpool_packed_kernel",
          configs=lambda m: m.cuda_configs(), variants=lambda m, d: _packed_pool_variants(m, d, unpool=True),
          launchable=lambda m, config, variant, arch: m.fits(config, _elem(variant))),
    Entry("pool_tokens", "deco_ops.kernels.adaptive_pool", "pool_tokens_kernel",
          configs=_pool_tokens_configs, variants=lambda m, d: _pool_tokens_variants(m, d, unpool=False)),
    Entry("unpool_tokens", "deco_ops.kernels.adaptive_pool", "unpool_tokens_kernel",
          configs=_unpool_tokens_configs, variants=lambda m, d: _pool_tokens_variants(m, d, unpool=True)),
    Entry("merge_gemm", "deco_ops.kernels.merge_gemm", "merge_gemm_kernel",
          configs=lambda m: m.cuda_configs(), variants=_merge_gemm_variants,
          launchable=lambda m, config, variant, arch: m.fits(  # as its _prune: fp32 tokens hold fp32 tiles
              config, 4 if "*fp32" in (variant.args["x_ptr"], variant.args["w_ptr"]) else 2,
              variant.dtype == "fp32" and variant.args["INPUT_PRECISION"] == "ieee", arch)),
    Entry("merge_norm_stats", "deco_ops.kernels.merge_norm", "merge_norm_stats_kernel",
          configs=_merge_norm_configs, variants=lambda m, d: _merge_norm_variants(m, d, backward=False)),
    Entry("merge_norm_backward", "deco_ops.kernels.merge_norm", "merge_norm_backward_kernel",
          configs=_merge_norm_configs, variants=lambda m, d: _merge_norm_variants(m, d, backward=True)),
    *_attn_entries(),
]


# ----------------------------------------------------------------------------------------------
# specialisation: the signature / constexprs / attrs that JITFunction.run would build


def _raw_jit_function(obj):
    """The JITFunction under an Autotuner/Heuristics wrapper."""
    from triton.runtime.jit import JITFunction

    fn = obj
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None or inner is fn:
            raise TypeError(
                f"{getattr(obj, '__name__', obj)!r} is {type(fn).__name__}, not a triton JITFunction "
                "(is TRITON_INTERPRET=1 set in this process?)"
            )
        fn = inner
    return fn


def _int_type(value: int) -> str:
    return "i32" if -(2**31) <= value < 2**31 else ("i64" if -(2**63) <= value < 2**63 else "u64")


def specialize(fn, args: dict[str, Any], config, float_type: str = "fp32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``, as the JIT builds them
    for a launch with these argument values and this autotune config. ``float_type``: what the
    launcher passes Python floats as (Triton's JIT: fp32; torch.compile's Inductor: fp64)."""
    values = {**args, **config.kwargs}
    names = [p.name for p in fn.params]
    missing = [n for n in names if n not in values]
    unknown = [n for n in values if n not in names]
    if missing or unknown:
        raise ValueError(f"{fn.__name__}: registry arguments do not match the kernel: missing {missing}, unknown {unknown}")
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, str) and v.startswith("*"):
            signature[p.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1  # JIT turns 1 into a constant
            else:
                signature[p.name] = _int_type(v)
                if v % 16 == 0 and not p.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = float_type
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {p.name}={v!r}")
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------------------------
# one compile job (runs in a worker process)


def _tool(name: str) -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to triton ({bundled}) nor on PATH")
    return found


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_MMA = re.compile(r"\b((?:HGMMA|HMMA|IMMA|QGMMA|UTCHMMA)\.[\w.]+)")
# Hopper's tensor memory accelerator: tiled (UTMALDG/UTMASTG/UTMAPF/UTMAREDG) and plain bulk
# (UBLKCP/UBLKRED) copies in SASS; cp.async.bulk / cp.reduce.async.bulk in PTX.
_TMA_SASS = re.compile(r"\b(?:UTMALDG|UTMASTG|UTMAPF|UTMAREDG|UBLKCP|UBLKRED)\b")
_TMA_PTX = re.compile(r"\bcp\.(?:reduce\.)?async\.bulk\b")
# Warp specialisation as Triton lowers it on sm_90: producer and consumer warpgroups resize their
# register files (setmaxnreg.inc/.dec, SASS USETMAXREG). A kernel without it is one warpgroup role.
_WS_SASS = re.compile(r"\bUSETMAXREG\b")
_WS_PTX = re.compile(r"\bsetmaxnreg\b")
_SETMAXNREG = re.compile(r"\bsetmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)")


def uses_tma(sass: str, ptx: str = "") -> bool:
    """Whether the kernel copies tiles with the TMA / bulk-copy engine (SASS, else PTX)."""
    return bool(_TMA_SASS.search(sass) or _TMA_PTX.search(ptx))


def warp_specialized(sass: str, ptx: str = "") -> bool:
    """Whether the kernel runs producer/consumer warpgroups with register reallocation."""
    return bool(_WS_SASS.search(sass) or _WS_PTX.search(ptx))


def warpgroup_registers(ptx: str) -> list[int]:
    """The per-thread register counts the warpgroups resize to (``setmaxnreg``), ascending: the
    producer's is the smallest, the consumers' the largest. The ``registers`` column is the
    count at entry, before any warpgroup resizes."""
    return sorted({int(n) for n in _SETMAXNREG.findall(ptx)})


def config_label(config) -> str:
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "GROUP_M": "G", "BLOCK_C": "C", "BLOCK_R": "R"}
    parts = [f"{short.get(k, k)}{v}" for k, v in config.kwargs.items()]
    return " ".join(parts + [f"w{config.num_warps}", f"s{config.num_stages}"])


def _entry(name: str) -> Entry:
    for e in REGISTRY:
        if e.name == name:
            return e
    raise KeyError(name)


def wgmma_eligible(config) -> bool:
    """Triton lowers tl.dot to Hopper's wgmma (HGMMA) only for warpgroups (num_warps % 4 == 0) and
    tiles whose M side is >= 64 (one warpgroup's wgmma is 64 rows). Tiles of 16/32 query rows (the
    M << N attention configs) use the Ampere mma.sync (HMMA) on sm_90 by construction, so HGMMA is
    expected only where every tile side (BLOCK_M, BLOCK_N) is >= 64."""
    sides = [v for k, v in config.kwargs.items() if k in ("BLOCK_M", "BLOCK_N")]
    return config.num_warps % 4 == 0 and all(v >= 64 for v in sides)


def compile_job(name: str, config_index: int, variant_index: int, dtypes: list[str], arch: int) -> dict:
    """Compile one (kernel, config, variant) for one target and measure the cubin."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    entry = _entry(name)
    row: dict[str, Any] = {"kernel": name, "target": f"sm_{arch}", "arch": arch}
    try:
        module = importlib.import_module(entry.module)
        config = entry.configs(module)[config_index]
        variant = entry.variants(module, dtypes)[variant_index]
        row.update(config=config_label(config), variant=variant.label, dtype=variant.dtype,
                   num_warps=config.num_warps, num_stages=config.num_stages,
                   expect_hgmma=variant.hgmma and arch >= 90 and wgmma_eligible(config),
                   expect_tma=variant.tma and arch >= 90,
                   expect_warp_specialized=variant.warp_specialized and arch >= 90)
        start = time.perf_counter()
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = _raw_jit_function(getattr(module, entry.attr))
        signature, constexprs, attrs = specialize(fn, variant.args, config)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        # A fresh cache per job: a cache hit would skip ptxas and its spill report.
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=os.environ.get("DECO_OPS_AOT_CACHE"))
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v (spill counts) to stdout
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        row["compile_s"] = round(time.perf_counter() - start, 2)
        ptxas_log = log.getvalue()
        if not _SPILL.search(ptxas_log):  # no log captured: run ptxas -v on the same PTX
            ptxas_log = _ptxas_verbose(kernel)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{name}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            res = _RES.search(_run([_tool("cuobjdump"), "-res-usage", str(cubin)]))
            try:
                sass = _run([_tool("cuobjdump"), "--dump-sass", str(cubin)])
            except (subprocess.CalledProcessError, FileNotFoundError):
                sass = _run([_tool("nvdisasm"), "-c", str(cubin)])
        spill = _SPILL.search(ptxas_log)
        regs = int(res.group(1)) if res else int(_PTXAS_REGS.search(ptxas_log).group(1))
        mma = sorted(set(_MMA.findall(sass)))
        row.update(
            registers=regs,
            spill_stores=int(spill.group(2)) if spill else None,
            spill_loads=int(spill.group(3)) if spill else None,
            local_bytes=int(res.group(4)) if res else None,
            shared_bytes=int(kernel.metadata.shared) + (int(res.group(3)) if res else 0),
            hgmma=any(m.startswith("HGMMA") for m in mma),
            tma=uses_tma(sass, kernel.asm["ptx"]),
            warp_specialized=warp_specialized(sass, kernel.asm["ptx"]),
            warpgroup_registers=warpgroup_registers(kernel.asm["ptx"]),
            mma=mma[0].split(".")[0] + "." + mma[0].split(".")[1] if mma else "",
            error="",
        )
    except Exception as exc:  # reported in the table; the tool exits non-zero
        msg = str(exc).strip().splitlines()
        row.setdefault("config", "?")
        row.setdefault("variant", "?")
        row["error"] = f"{type(exc).__name__}: " + (" | ".join(msg[-3:]) if msg else "")
    return row


def _ptxas_verbose(kernel) -> str:
    arch = kernel.metadata.arch if isinstance(kernel.metadata.arch, str) else f"sm_{kernel.metadata.arch}"
    arch = arch if arch.startswith("sm_") else "sm_" + arch.removeprefix("sm")
    if arch == "sm_90":
        arch = "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = ""
        for name in ("ptxas", "ptxas-blackwell"):  # the one that accepts this PTX version
            with contextlib.suppress(FileNotFoundError):
                proc = subprocess.run([_tool(name), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx) + ".o"],
                                      capture_output=True, text=True)
                out = proc.stdout + proc.stderr
                if proc.returncode == 0:
                    break
        return out


# ----------------------------------------------------------------------------------------------
# driver


def compile_labelled(name: str, config: str, variant: str, dtypes: list[str], arch: int) -> dict:
    """``compile_job`` of the config and variant with these labels (as the rows print them), the row's
    problems filled in: one named compile, for tests that pin a kernel's worst tile."""
    entry = _entry(name)
    module = importlib.import_module(entry.module)
    configs = [config_label(c) for c in entry.configs(module)]
    variants = [v.label for v in entry.variants(module, dtypes)]
    for label, labels in ((config, configs), (variant, variants)):
        if labels.count(label) != 1:
            raise KeyError(f"{name}: {label!r} names {labels.count(label)} of {labels}")
    row = compile_job(name, configs.index(config), variants.index(variant), dtypes, arch)
    row["problems"] = _problems(row)
    return row


def _problems(row: dict) -> list[str]:
    out = []
    if row.get("error"):
        return ["compile error"]
    if (row["spill_stores"] or 0) + (row["spill_loads"] or 0) > 0 or (row["local_bytes"] or 0) > 0:
        out.append("spills")
    if row["shared_bytes"] > SMEM_LIMIT.get(row["arch"], 1 << 30):
        out.append(f"smem > {SMEM_LIMIT[row['arch']]}")
    if row["expect_hgmma"] and not row["hgmma"]:
        out.append("no HGMMA")
    if row.get("expect_tma") and not row["tma"]:
        out.append("no TMA")
    if row.get("expect_warp_specialized") and not row["warp_specialized"]:
        out.append("not warp-specialised")
    return out


def _yes_no(row: dict, field: str) -> str:
    """A row's sm_90 SASS feature as a table cell ("?" for rows saved before the field existed)."""
    if row["arch"] < 90:
        return "n/a"
    return "?" if field not in row else ("yes" if row[field] else "no")


def _ws_cell(row: dict) -> str:
    """The WS cell of the full table: yes/no, and the warpgroups' register counts where resized."""
    regs = row.get("warpgroup_registers")
    return _yes_no(row, "warp_specialized") + (f" ({'/'.join(map(str, regs))})" if regs else "")


def _share(rows: list[dict], field: str) -> str:
    """How many of a config's variants show a SASS feature: "yes" (all), "some", "no" (none, but
    some were expected to) or "-" (none, none expected); "?" for rows saved before the field existed."""
    if any(field not in r for r in rows):
        return "?"
    have = [bool(r[field]) for r in rows]
    if all(have):
        return "yes"
    if any(have):
        return "some"
    return "no" if any(r.get("expect_" + field) for r in rows) else "-"


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | variant | config | target | regs | spill st/ld (B) | smem (B) | MMA | HGMMA | TMA | WS "
            "| s | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['target']} | | | | | | | | | "
                         f"ERROR {r['error'][:200].replace('|', '/')} |")
            continue
        status = ", ".join(r["problems"]) or "ok"
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['target']} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes']} | {r['mma'] or '-'} | "
            f"{_yes_no(r, 'hgmma')} | {_yes_no(r, 'tma')} | {_ws_cell(r)} | "
            f"{r['compile_s']} | {status} |"
        )
    return "\n".join(lines)


def summary(data: dict, arch: int = 90, labels: tuple[str, ...] = ("bf16", "fp32/tf32")) -> str:
    """A compact markdown table from a ``--json`` file: one row per (dtype, kernel, config) on
    ``arch``, the worst of its variants (most registers; spills and shared memory are maxima),
    then a totals line per target and dtype label."""
    rows = data["rows"]

    def dlabel(r):
        return r["variant"].split(" ")[0] if r.get("variant") else "?"

    head = ("| dtype | kernel | config | variants | worst variant | regs | spill st/ld (B) | smem (B) | HGMMA | TMA | WS "
            "| status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in labels:
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["arch"] == arch and dlabel(r) == label:
                groups.setdefault((r["kernel"], r["config"]), []).append(r)
        for (kernel, config), rs in sorted(groups.items()):
            ok = [r for r in rs if not r.get("error")]
            problems = sorted({p for r in rs for p in (r.get("problems") or _problems(r))})
            if not ok:
                lines.append(f"| {label} | {kernel} | {config} | {len(rs)} | | | | | | | | {', '.join(problems)} |")
                continue
            worst = max(ok, key=lambda r: (r["registers"], (r["spill_stores"] or 0) + (r["spill_loads"] or 0)))
            st = max(r["spill_stores"] or 0 for r in ok)
            ld = max(r["spill_loads"] or 0 for r in ok)
            smem = max(r["shared_bytes"] for r in ok)
            regs = worst.get("warpgroup_registers")
            features = " | ".join(_share(ok, field) for field in ("hgmma", "tma", "warp_specialized"))
            features += f" ({'/'.join(map(str, regs))})" if regs else ""
            variant = " ".join(worst["variant"].split(" ")[1:]) or "-"
            lines.append(f"| {label} | {kernel} | {config} | {len(rs)} | {variant} | {worst['registers']} | "
                         f"{st}/{ld} | {smem} | {features} | {', '.join(problems) or 'ok'} |")
    lines.append("")
    totals = []
    for target in sorted({r["target"] for r in rows}, reverse=True):
        for label in sorted({dlabel(r) for r in rows}):
            rs = [r for r in rows if r["target"] == target and dlabel(r) == label]
            if not rs:
                continue
            bad = [r for r in rs if r.get("problems") or _problems(r)]
            spill = sum(1 for r in rs if not r.get("error") and "spills" in _problems(r))
            errors = sum(1 for r in rs if r.get("error"))
            smem = sum(1 for r in rs if not r.get("error") and any(p.startswith("smem") for p in _problems(r)))
            totals.append(f"{target} {label}: {len(rs)} compiles, {len(bad)} with problems "
                          f"({errors} errors, {spill} spill, {smem} smem over limit)")
    lines.append("Totals: " + "; ".join(totals) + ".")
    lines.append(f"Triton {data.get('triton_version')}, {len(rows)} compiles in {data.get('elapsed_s')} s"
                 + (f" ({data['jobs_note']})" if data.get("jobs_note") else "") + ".")
    return "\n".join(lines)


def write_doc(path: Path, data: dict) -> None:
    """Replaces the block between ``DOC_BEGIN`` and ``DOC_END`` in ``path`` with the sm_90 summary
    of bf16 and exact fp32 (PyTorch's default), appending the block (or creating the file) where
    there is none."""
    block = f"{DOC_BEGIN}\n{summary(data, labels=('bf16', 'fp32/ieee'))}\n{DOC_END}"
    doc = path.read_text() if path.exists() else "# Ahead-of-time compile check\n"
    if DOC_BEGIN in doc and DOC_END in doc:
        head, rest = doc.split(DOC_BEGIN, 1)
        doc = head + block + rest.split(DOC_END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def _jobs(names: list[str], dtypes: list[str], targets: list[int]) -> tuple[list[tuple], list[str]]:
    jobs, skipped = [], []
    for name in names:
        entry = _entry(name)
        try:
            module = importlib.import_module(entry.module)
        except ModuleNotFoundError as exc:
            if entry.optional and exc.name == entry.module:
                skipped.append(f"{name}: {entry.module} does not exist yet")
                continue
            raise
        if entry.optional and not hasattr(module, entry.attr):
            skipped.append(f"{name}: {entry.module} has no {entry.attr} yet")
            continue
        configs = entry.configs(module)
        for v, variant in enumerate(entry.variants(module, dtypes)):
            for c, config in enumerate(configs):
                for arch in targets:
                    if entry.launchable is None or entry.launchable(module, config, variant, arch):
                        jobs.append((name, c, v, dtypes, arch))
                    else:
                        skipped.append(f"{name} {config_label(config)} {variant.label} sm_{arch}: pruned by the autotuner (does not fit)")
    return jobs, skipped


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def _reexec_clean(argv: list[str]) -> int:
    """Run this tool again in a process where Triton compiles instead of interpreting."""
    if os.environ.get(_REEXEC_MARK):
        raise SystemExit("deco_ops.aot: TRITON_INTERPRET is still set in the clean subprocess; unset it and rerun")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DECO_OPS_BACKEND")}
    env[_REEXEC_MARK] = "1"
    print("deco_ops.aot: TRITON_INTERPRET/DECO_OPS_BACKEND set in this process; re-running without them",
          file=sys.stderr, flush=True)
    return subprocess.call([sys.executable, "-m", "deco_ops.aot", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m deco_ops.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", help="comma-separated registry names (default: all): "
                        + ", ".join(e.name for e in REGISTRY))
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 90,80")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="subset of fp16,bf16,fp32")
    parser.add_argument("--json", type=Path, help="write the rows (and versions) to this file")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="worker processes")
    parser.add_argument("--verbose", action="store_true", help="list every pruned (config, variant, target)")
    parser.add_argument("--full", action="store_true",
                        help="every representative variant (attention head dim 80, split forward at every head dim, "
                        "BLIP-2's 32-query single pass, fp32/ieee for dot-free kernels); default: the subset that "
                        "still covers every kernel x config x dtype x target")
    parser.add_argument("--activations", help="comma-separated epilogue activations to compile (default: all): "
                        + ", ".join(ACTIVATIONS))
    parser.add_argument("--summary", type=Path, metavar="JSON",
                        help="print the compact sm_90 bf16 + fp32/tf32 table of a --json file (no compiling)")
    parser.add_argument("--doc", type=Path, metavar="MARKDOWN",
                        help="write the compact sm_90 table of bf16 and exact fp32 into this file (e.g. docs/aot.md) "
                        f"between {DOC_BEGIN} and {DOC_END}, keeping the rest; from this run, or from --summary's file")
    args = parser.parse_args(argv)
    if args.activations is not None:
        chosen = [a for a in args.activations.split(",") if a]
        if not chosen or any(a not in ACTIVATIONS for a in chosen):
            parser.error(f"--activations: unknown or none {args.activations!r}; known: {list(ACTIVATIONS)}")
        os.environ[_ACTIVATIONS_ENV] = ",".join(chosen)
    if args.summary:
        data = json.loads(args.summary.read_text())
        print(summary(data))
        if args.doc:
            write_doc(args.doc, data)
        return 0

    # deco_ops/__init__ may itself have switched the interpreter on (DECO_OPS_BACKEND=triton on a
    # CPU-only machine), and kernels decorated under it are not JITFunctions: start over cleanly.
    if _interpreting() or os.environ.get("DECO_OPS_BACKEND"):
        return _reexec_clean(argv)

    names = args.kernels.split(",") if args.kernels else [e.name for e in REGISTRY]
    known = {e.name for e in REGISTRY}
    if bad := [n for n in names if n not in known]:
        parser.error(f"unknown kernels {bad}; known: {sorted(known)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := [d for d in dtypes if d not in DTYPES]:
        parser.error(f"unknown dtypes {bad}; known: {DTYPES}")
    targets = [int(t.strip().removeprefix("sm_")) for t in args.targets.split(",") if t.strip()]

    if args.full:
        os.environ["DECO_OPS_AOT_FULL"] = "1"  # read by the variant builders here and in the workers
    import triton

    start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="deco_ops_aot_cache_")
    os.environ["DECO_OPS_AOT_CACHE"] = cache  # workers make one Triton cache per job under it; removed below
    try:
        jobs, skipped = _jobs(names, dtypes, targets)
        pruned = [s for s in skipped if s.endswith("(does not fit)")]
        for s in skipped:
            if s not in pruned or args.verbose:
                print(f"deco_ops.aot: skipped {s}", file=sys.stderr)
        if pruned:
            print(f"deco_ops.aot: {len(pruned)} (config, variant, target) combinations pruned by the kernels' "
                  "own autotune rules (never launched); --verbose lists them", file=sys.stderr)
        ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no state forked from torch
        with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
            rows = list(pool.map(compile_job, *zip(*jobs))) if jobs else []
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for r in rows:
        r["problems"] = _problems(r)
    rows.sort(key=lambda r: (r["kernel"], r.get("variant", ""), r.get("config", ""), -r["arch"]))
    elapsed = time.perf_counter() - start

    print(markdown(rows))
    bad = [r for r in rows if r["problems"]]
    print(f"\n{len(rows)} compiles ({len(jobs)} jobs, {args.jobs} workers) in {elapsed:.1f}s with triton "
          f"{triton.__version__}; {len(bad)} with problems")
    for r in bad:
        print(f"  FAIL {r['kernel']} [{r.get('variant')}] [{r.get('config')}] {r['target']}: "
              f"{', '.join(r['problems'])} {r.get('error', '')}")
    data = {
        "triton_version": triton.__version__, "elapsed_s": round(elapsed, 1), "full": _full(),
        "jobs_note": f"{len(jobs)} jobs on {args.jobs} workers" + (", --full" if _full() else "")
        + (f", --activations {args.activations}" if args.activations else ""),
        "skipped": skipped, "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
    if args.doc:
        write_doc(args.doc, data)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
