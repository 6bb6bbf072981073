"""Named shapes, defined once, from the models they come from: what ``python -m deco_ops.tune``
tunes by default and what the benchmark suite (``benchmarks/shapes.py`` re-exports this module)
times. They ship in the package so an installed wheel tunes without a checkout; ``parse`` turns a
``--shape`` spec into a shape of a user's own model.

Every shape has a ``tiny`` twin with the same structure (2D/3D grid, divisible or not, shared
queries, ``kv_lens``) but sizes small enough for a CPU smoke run; ``for_device`` picks the real
shape on CUDA and the twin elsewhere. Real shapes run in bf16 on CUDA; CPU smoke runs use fp32.

Where the model leaves a number open, the choice is written next to it (``note``).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace


@dataclass(frozen=True)
class PoolMLPShape:
    """pool -> Linear -> GELU -> Linear on ``(batch, prod(grid), in_features)`` tokens (DeCo)."""

    name: str
    batch: int
    grid: tuple[int, ...]
    out_grid: tuple[int, ...]
    in_features: int
    hidden: int
    out_features: int
    source: str = ""
    note: str = ""
    tiny: PoolMLPShape | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def pooled(self) -> int:
        return math.prod(self.out_grid)

    def describe(self) -> str:
        g = "x".join(map(str, self.grid))
        o = "x".join(map(str, self.out_grid))
        return f"B={self.batch}, {g}->{o}, {self.in_features}->{self.hidden}->{self.out_features}"


@dataclass(frozen=True)
class MLPPoolShape(PoolMLPShape):
    """Project-then-pool (PLLaVA / LLaVA-OneVision order): Linear -> GELU -> Linear, then pool."""

    mode: str = "average"  # "average" (adaptive average) or "bilinear" (F.interpolate, align_corners=False)

    def describe(self) -> str:
        return super().describe() + f", {self.mode}"


@dataclass(frozen=True)
class PackedShape:
    """A ragged batch of token grids packed back to back, ``(sum_i prod(grids[i]), C)`` ."""

    name: str
    grids: tuple[tuple[int, ...], ...]
    out_grids: tuple[tuple[int, ...], ...]
    in_features: int
    hidden: int
    out_features: int
    source: str = ""
    note: str = ""
    tiny: PackedShape | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return sum(math.prod(g) for g in self.grids)

    @property
    def pooled(self) -> int:
        return sum(math.prod(g) for g in self.out_grids)

    def describe(self) -> str:
        return f"{len(self.grids)} grids, {self.tokens} tokens -> {self.pooled}, {self.in_features}->{self.hidden}->{self.out_features}"


@dataclass(frozen=True)
class AttentionShape:
    """Cross-attention: ``M`` queries (shared by the batch when ``shared_q``) over ``N`` keys."""

    name: str
    batch: int
    M: int
    N: int
    heads: int
    head_dim: int
    shared_q: bool = True
    kv_lens: tuple[int, ...] | None = None
    source: str = ""
    note: str = ""
    tiny: AttentionShape | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        q = "shared" if self.shared_q else "per-sample"
        lens = f", kv_lens={list(self.kv_lens)}" if self.kv_lens else ""
        return f"B={self.batch}, M={self.M} ({q}), N={self.N}, H={self.heads}, D={self.head_dim}{lens}"


@dataclass(frozen=True)
class MergeShape:
    """Patch merge (each ``merge`` x ``merge`` block of tokens concatenated) -> norm -> Linear -> GELU
    -> Linear on ``batch`` images of ``grid`` patches each."""

    name: str
    batch: int
    grid: tuple[int, int]
    in_features: int
    hidden: int
    out_features: int
    order: str  # "block" (Qwen: each block's tokens consecutive) or "grid" (InternVL: row-major)
    norm: str  # "layernorm" or "rmsnorm"
    norm_position: str  # "pre" (per token, over C) or "post" (per merged row, over merge**2 * C)
    eps: float
    merge: int = 2
    source: str = ""
    note: str = ""
    tiny: MergeShape | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        return self.batch * math.prod(self.grid)

    @property
    def merged(self) -> int:
        return self.tokens // (self.merge * self.merge)

    def describe(self) -> str:
        g = "x".join(map(str, self.grid))
        return (f"{self.batch}x {g} grid, {self.order} order, {self.norm} {self.norm_position}, "
                f"{self.merge * self.merge * self.in_features}->{self.hidden}->{self.out_features}")


def _with_tiny(shape, **tiny_fields):
    return replace(shape, tiny=replace(shape, name=shape.name + "_tiny", **tiny_fields))


# ----------------------------------------------------------------------------------------------
# pool + MLP (deco_ops.pool_mlp)

POOL_MLP = {
    s.name: s
    for s in [
        _with_tiny(
            PoolMLPShape("llava15_7b", 32, (24, 24), (12, 12), 1024, 4096, 4096,
                         source="LLaVA-1.5-7B: CLIP ViT-L/14-336 (24x24 patches), Vicuna-7B (4096)"),
            batch=2, grid=(8, 8), out_grid=(4, 4), in_features=32, hidden=64, out_features=64,
        ),
        _with_tiny(
            PoolMLPShape("llava15_13b", 32, (24, 24), (12, 12), 1024, 5120, 5120,
                         source="LLaVA-1.5-13B: CLIP ViT-L/14-336, Vicuna-13B (5120)"),
            batch=2, grid=(8, 8), out_grid=(4, 4), in_features=32, hidden=80, out_features=80,
        ),
        _with_tiny(
            PoolMLPShape("siglip_qwen2_7b", 32, (27, 27), (12, 12), 1152, 3584, 3584,
                         source="SigLIP-so400m/14-384 (27x27 patches), Qwen2-7B (3584)",
                         note="27 -> 12 is not divisible: overlapping, uneven windows"),
            batch=2, grid=(9, 9), out_grid=(4, 4), in_features=48, hidden=56, out_features=56,
        ),
        _with_tiny(
            PoolMLPShape("pllava_16f", 4, (16, 24, 24), (16, 12, 12), 1024, 4096, 4096,
                         source="PLLaVA-7B: 16 frames of CLIP ViT-L/14-336, Vicuna-7B",
                         note="batch chosen here: 4 videos (36,864 tokens, 2x llava15_7b's)"),
            batch=1, grid=(4, 8, 8), out_grid=(4, 4, 4), in_features=32, hidden=64, out_features=64,
        ),
        _with_tiny(
            PoolMLPShape("infer_b1", 1, (24, 24), (12, 12), 1024, 4096, 4096,
                         source="LLaVA-1.5-7B widths, one image: inference latency"),
            batch=1, grid=(8, 8), out_grid=(4, 4), in_features=32, hidden=64, out_features=64,
        ),
    ]
}

# ----------------------------------------------------------------------------------------------
# cross-attention (deco_ops.cross_attention)

_VIDEO_FRAMES = (16, 12, 10, 7)

CROSS_ATTENTION = {
    s.name: s
    for s in [
        _with_tiny(
            AttentionShape("blip2_qformer", 64, 32, 257, 12, 64,
                           source="BLIP-2 Q-Former: 32 learned queries, EVA ViT-g/14-224 (256+CLS tokens)"),
            batch=2, M=4, N=17, heads=2, head_dim=16,
        ),
        _with_tiny(
            AttentionShape("blip2_vitl336", 64, 32, 577, 12, 64,
                           source="BLIP-2-style Q-Former over CLIP ViT-L/14-336 (576+CLS tokens)"),
            batch=2, M=4, N=37, heads=2, head_dim=16,
        ),
        _with_tiny(
            AttentionShape("qwenvl_resampler", 16, 256, 1024, 32, 128,
                           source="Qwen-VL resampler: 256 queries, 4096 wide (32x128), 448px/14 -> 1024 tokens"),
            batch=2, M=8, N=32, heads=2, head_dim=32,
        ),
        _with_tiny(
            AttentionShape("video_resampler", 4, 256, 16 * 576, 16, 64,
                           kv_lens=tuple(f * 576 for f in _VIDEO_FRAMES),
                           source="video resampler: 256 queries over up to 16 frames x 576 tokens",
                           note=f"kv_lens chosen here: videos of {list(_VIDEO_FRAMES)} frames x 576"),
            batch=2, M=8, N=36, heads=2, head_dim=16, kv_lens=(36, 27),
        ),
    ]
}

# ----------------------------------------------------------------------------------------------
# Packed ragged batches and project-then-pool. Benchmarked only when deco_ops exposes
# pool_mlp_packed / mlp_pool.

def llava_next_unpadded_grid(width: int, height: int, side: int = 48) -> tuple[int, int]:
    """(rows, cols) of an image's high-resolution token grid after LLaVA-NeXT's ``unpad_image``: the
    ``side x side`` grid of its tiles (2x2 tiles of 24x24 for 672x672) with the rows or columns
    of letterbox padding cropped, as LLaVA-NeXT computes them (the kept extent is always even)."""
    if width / height > 1:
        pad = (side - int(height * side / width)) // 2
        return side - 2 * pad, side
    pad = (side - int(width * side / height)) // 2
    return side, side - 2 * pad


# Typical photo and screenshot sizes; every one selects LLaVA-NeXT's 672x672 (2x2 tiles) layout.
_ANYRES_IMAGES = ((1024, 1024), (640, 480), (480, 640), (1280, 720), (720, 1280), (1280, 1024), (800, 1200), (1200, 800))


def _anyres_batch(images, base: int, side: int) -> tuple[tuple, tuple]:
    """(grids, out_grids): per image its base grid and its unpadded high-res grid, pooled 2x."""
    grids = []
    for w, h in images:
        grids += [(base, base), llava_next_unpadded_grid(w, h, side)]
    return tuple(grids), tuple((r // 2, c // 2) for r, c in grids)


_ANYRES_GRIDS, _ANYRES_OUT_GRIDS = _anyres_batch(_ANYRES_IMAGES, 24, 48)

PACKED = {
    s.name: s
    for s in [
        _with_tiny(
            PackedShape("anyres_5tiles", _ANYRES_GRIDS, _ANYRES_OUT_GRIDS, 1024, 4096, 4096,
                        source="LLaVA-NeXT-7B AnyRes: per image the base 24x24 grid and its 2x2 tiles' 48x48 grid, "
                               "unpadded to the image's aspect ratio; 2x2 pooling of each grid",
                        note=f"8 images {[f'{w}x{h}' for w, h in _ANYRES_IMAGES]}: 16 grids of "
                             f"{len(set(_ANYRES_GRIDS))} sizes; the padded baseline pads "
                             "every grid to 48x48, a (16, 2304, C) batch"),
            **dict(zip(("grids", "out_grids"), _anyres_batch(_ANYRES_IMAGES[:3], 4, 8))),
            in_features=32, hidden=64, out_features=64,
        ),
    ]
}

MLP_POOL = {
    s.name: s
    for s in [
        _with_tiny(
            MLPPoolShape("onevision_32f", 1, (32, 27, 27), (32, 14, 14), 1152, 3584, 3584, mode="bilinear",
                         source="LLaVA-OneVision-7B video: 32 frames of SigLIP-so400m (27x27), MLP to Qwen2-7B, "
                                "then 2x bilinear down-sampling to 14x14",
                         note="bilinear per frame (deco_ops: trilinear on (T, H, W) with T unchanged, the same map)"),
            grid=(4, 9, 9), out_grid=(4, 5, 5), in_features=32, hidden=48, out_features=48,
        ),
    ]
}

# ----------------------------------------------------------------------------------------------
# patch-merge projectors (deco_ops.merge_mlp)

_MERGE_TINY = dict(batch=2, grid=(8, 8), in_features=16, hidden=64, out_features=32)

MERGE = {
    s.name: s
    for s in [
        _with_tiny(
            MergeShape("qwen2vl_7b_merger", 4, (56, 56), 1280, 5120, 3584, "block", "layernorm", "pre", 1e-6,
                       source="Qwen2-VL-7B PatchMerger: LayerNorm(1280) per token, 2x2 merge (5120), MLP to Qwen2-7B (3584)",
                       note="4 images of 784x784 px (56x56 patches of 14 px, 3136 tokens each), packed as one sequence"),
            **_MERGE_TINY,
        ),
        _with_tiny(
            MergeShape("qwen25vl_72b_merger", 4, (56, 56), 1280, 5120, 8192, "block", "rmsnorm", "pre", 1e-6,
                       source="Qwen2.5-VL-72B PatchMerger: RMSNorm(1280) per token, 2x2 merge, MLP to Qwen2.5-72B (8192)",
                       note="4 images of 784x784 px, as qwen2vl_7b_merger"),
            **_MERGE_TINY,
        ),
        _with_tiny(
            MergeShape("internvl25_8b_mlp1", 13, (32, 32), 1024, 4096, 4096, "grid", "layernorm", "post", 1e-5,
                       source="InternVL2.5-8B: InternViT-300M (1024) on 448x448 tiles, 32x32 grid pixel-shuffled to "
                              "16x16 (4096), LayerNorm(4096), MLP to InternLM2.5-7B (4096)",
                       note="13 tiles: InternVL's dynamic tiling at its default max of 12 tiles plus the thumbnail"),
            **_MERGE_TINY,
        ),
    ]
}

# ----------------------------------------------------------------------------------------------
# the CPU path: real sizes, run only on a CPU (no tiny twin), where the default backend must
# stay within 1.1x of SDPA and 1.05x of eager PyTorch

CPU_PATH = {
    s.name: s
    for s in [
        AttentionShape("blip2_qformer_cpu_b8", 8, 32, 257, 12, 64,
                       source="BLIP-2 Q-Former on a CPU: 32 learned queries, EVA ViT-g/14-224 (256+CLS tokens)"),
        AttentionShape("blip2_qformer_cpu_b32", 32, 32, 257, 12, 64,
                       source="BLIP-2 Q-Former on a CPU, batch 32"),
        PoolMLPShape("llava15_cpu_b1", 1, (24, 24), (12, 12), 1024, 4096, 4096,
                     source="LLaVA-1.5-7B DeCo projector on a CPU, one image"),
        PoolMLPShape("llava15_cpu_b2", 2, (24, 24), (12, 12), 1024, 4096, 4096,
                     source="LLaVA-1.5-7B DeCo projector on a CPU, two images"),
    ]
}

ALL = {**POOL_MLP, **CROSS_ATTENTION, **PACKED, **MLP_POOL, **MERGE, **CPU_PATH}

# Shapes the performance targets speak of come first in the report, so a run cut short still has them.
PRIORITY = ["llava15_7b", "infer_b1", "blip2_qformer", "blip2_vitl336", "qwenvl_resampler", "video_resampler"]


def for_device(shape, device) -> object:
    """The real shape on CUDA, its tiny twin elsewhere."""
    is_cuda = getattr(device, "type", device) == "cuda"
    return shape if is_cuda or shape.tiny is None else shape.tiny


def select(names: list[str] | None, cpu: bool = False) -> list[str]:
    """Shape names to run, bar shapes first; ``names`` filters (unknown names raise). The CPU
    path's shapes run by default only on a CPU, first."""
    order = [*CPU_PATH, *PRIORITY] + [n for n in ALL if n not in PRIORITY and n not in CPU_PATH]
    if not names:
        return order if cpu else [n for n in order if n not in CPU_PATH]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {list(ALL)}")
    return [n for n in order if n in names]


# ----------------------------------------------------------------------------------------------
# a user's own shape: ``python -m deco_ops.tune --shape SPEC``

SPEC_KINDS = {"pool_mlp": PoolMLPShape, "mlp_pool": MLPPoolShape, "cross_attention": AttentionShape, "merge_mlp": MergeShape}
_NOT_IN_SPECS = ("source", "note", "tiny")  # descriptions and the CPU twin


def _spec_value(key: str, text: str, annotation: str):
    """``text`` as the field's type: tuples written with ``x`` (``24x24``), booleans as true/false."""
    try:
        if annotation.startswith("tuple"):
            return tuple(int(part) for part in text.split("x"))
        if annotation == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return {"int": int, "float": float}.get(annotation, str)(text)
    except ValueError:
        raise ValueError(f"shape spec: {key}={text!r} does not parse as {annotation}") from None


def parse(spec: str):
    """A shape from ``KIND:field=value,...`` (``--shape``), e.g.
    ``pool_mlp:batch=8,grid=24x24,out_grid=12x12,in_features=1024,hidden=4096,out_features=4096``.
    KIND is one of ``SPEC_KINDS``; the fields are its dataclass's (``name`` defaults to the spec
    itself); tuples are written with ``x``. Raises ValueError naming what is unknown or missing."""
    kind, _, body = spec.partition(":")
    if kind not in SPEC_KINDS or not body:
        raise ValueError(f"shape spec {spec!r} must be KIND:field=value,... with KIND one of {tuple(SPEC_KINDS)}")
    cls = SPEC_KINDS[kind]
    known = {f.name: f for f in fields(cls) if f.name not in _NOT_IN_SPECS}
    values = {"name": spec}
    for item in body.split(","):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or key not in known:
            raise ValueError(f"shape spec: {item!r} is not field=value with a field of {kind}: {sorted(known)}")
        values[key] = text.strip() if key == "name" else _spec_value(key, text.strip(), str(known[key].type))
    missing = [f.name for f in known.values() if f.name not in values and f.default is MISSING]
    if missing:
        raise ValueError(f"shape spec {spec!r} lacks {missing} (fields of {kind}: {sorted(known)})")
    return cls(**values)
