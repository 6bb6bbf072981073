"""What is timed: for each op, shape and direction, a group holding deco_ops and its baselines as
zero-argument callables on the same data. Shared by the pytest-benchmark suite and the report.

Directions:
* ``fwd``: inference, under ``torch.no_grad()`` for every implementation.
* ``fwd_bwd``: forward then ``backward`` of a fixed random output gradient. Pool ops: the weights
  are trained and the vision tokens are frozen (LLaVA's setting: the vision tower needs no
  gradient). Attention: q, k and v all need gradients (Q-Former training).
* ``fwd_bwd_dx`` (pool ops only): as ``fwd_bwd`` and the tokens need a gradient too.
Gradients are reset to None at the start of every call, so no call pays for accumulation.

deco_ops itself appears three times: ``deco_ops``, the strategy it picks by itself (``auto``: measured
per shape bucket on CUDA, the composed twin on the PyTorch backend), and ``deco_ops_fused`` /
``deco_ops_composed``, each candidate forced (``deco_ops.use_strategy``), so the fused kernels' own
speed is never hidden behind the winner; ``deco_ops_fused_tma`` forces the opt-in TMA kernels
(sm_90 GPUs only): attention's forward (then the fused backward), pool_mlp's and merge_mlp's first
GEMM and their backward's dz GEMM; attention's ``deco_ops_fused_one_kernel`` its opt-in one-kernel
backward (many queries). On the PyTorch backend the projectors have only their
composed twin, and attention's ``fused`` is the chunked online-softmax reference.

Baselines:
* pool ops: ``eager``, DeCo's ``AvgPoolProjector`` (rearrange to (B, C, H, W), ``nn.AdaptiveAvgPool2d``
  / ``3d``, ``nn.Sequential(Linear, GELU, Linear)``); ``compile``, ``torch.compile`` of it (CUDA,
  or ``--compile``).
* attention: ``sdpa_<backend>``, ``F.scaled_dot_product_attention`` on (B, H, M, D) views with one
  backend forced by ``sdpa_kernel`` (flash, efficient, cudnn, math; a backend that cannot take the
  inputs is skipped, and the report's ``sdpa`` column is the fastest one); ``eager_softmax``, the BLIP-2 Q-Former's attention (matmul, scale, additive mask, softmax,
  dropout with p=0, matmul, permute + contiguous); ``compile``, ``torch.compile`` of that.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import deco_ops

from . import counts, shapes

DIRECTIONS = ("fwd", "fwd_bwd", "fwd_bwd_dx")
# "deco_ops" runs the strategy deco_ops picks (``auto``); these force each candidate, so the fused
# kernels' own speed stays visible beside the winner
STRATEGY_IMPLS = ("deco_ops_fused", "deco_ops_composed")
# the opt-in TMA kernels (``fused_tma``, sm_90 only), forced under their own name; never picked by ``auto`` yet
POOL_IMPLS = ("deco_ops", *STRATEGY_IMPLS, "deco_ops_fused_tma", "eager", "compile")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
ATTENTION_IMPLS = ("deco_ops", *STRATEGY_IMPLS, "deco_ops_fused_tma", "deco_ops_fused_one_kernel", *(f"sdpa_{b}" for b in SDPA_BACKENDS), "eager_softmax",
                   "compile")
# which callable a baseline's column in the report stands for
BASELINE_KIND = {"eager": "eager", "compile": "compile", "eager_softmax": "eager_softmax",
                 **{f"sdpa_{b}": "sdpa" for b in SDPA_BACKENDS}}


class Unavailable(Exception):
    """This implementation cannot run here (op not in deco_ops yet, backend missing, ...)."""


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    backend: str = "auto"  # deco_ops backend inside the timed calls ("auto": Triton on CUDA, reference on CPU)
    compile: bool = False  # run torch.compile baselines
    seed: int = 0

    @classmethod
    def default(cls, compile: bool | None = None, dtype: torch.dtype | None = None, backend: str = "auto") -> Env:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        return cls(
            device=device,
            dtype=dtype or (torch.bfloat16 if cuda else torch.float32),
            backend=backend,
            compile=cuda if compile is None else compile,
        )

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Runner:
    """One implementation ready to time: ``run()`` is the timed call (no synchronisation),
    ``reset()`` drops gradients so memory is measured from a clean state."""

    run: Callable[[], object]
    reset: Callable[[], None] = lambda: None
    output: Callable[[], torch.Tensor] | None = None  # forward output, for agreement checks


@dataclass
class Group:
    op: str
    shape: str  # the named shape (the real one, even when its tiny twin runs)
    shape_obj: object  # what actually runs
    direction: str
    flops: int
    bytes: int
    impls: dict[str, Callable[[], Runner]]  # name -> factory (raises Unavailable)
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.op}-{self.shape}-{self.direction}"


def _randn(shape, env: Env, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=env.device, dtype=env.dtype)


def _generator(env: Env, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(env.seed * 1000 + salt)


@contextlib.contextmanager
def _deco(env: Env, strategy: str = "auto"):
    with deco_ops.use_backend(env.backend), deco_ops.use_strategy(strategy):
        yield


def _on_triton(env: Env) -> bool:
    """Whether deco_ops runs this environment's calls on its Triton backend."""
    with deco_ops.use_backend(env.backend):
        return deco_ops._backend.use_triton(env.device)


def _projectors_fused(env: Env) -> None:
    """Raises Unavailable where the projectors have no fused path: the PyTorch backend runs only
    their composed twin (pooling, then ``F.linear``)."""
    if not _on_triton(env):
        raise Unavailable("the PyTorch backend has one projector path, the composed one")


def _compiled(fn, env: Env):
    if not env.compile:
        raise Unavailable("torch.compile baselines run on CUDA only (pass --compile to force)")
    import torch._dynamo.config as dynamo_config

    # every shape and direction is a recompile of the same code object: keep them all compiled
    # (past the limit dynamo silently runs eager) and static (no dynamic-shape kernels)
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, attr):
            setattr(dynamo_config, attr, max(getattr(dynamo_config, attr), 256))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
    return torch.compile(fn, dynamic=False)


def _grad_runner(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor,
                 ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Runner:
    def reset():
        for t in leaves:
            t.grad = None

    def run():
        reset()
        with ctx():
            y = forward()
            y.backward(dy)
        return y

    return Runner(run, reset)


def _fwd_runner(forward: Callable[[], torch.Tensor],
                ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Runner:
    def run():
        with torch.no_grad(), ctx():
            return forward()

    return Runner(run, output=run)


# ----------------------------------------------------------------------------------------------
# pool + MLP


def eager_pool_tokens(x: torch.Tensor, grid, out_grid, mode: str = "average") -> torch.Tensor:
    """Pooling of ``(B, prod(grid), C)`` tokens as eager code writes it: viewed as an image,
    ``F.adaptive_avg_pool2d``/``3d`` or bilinear ``F.interpolate`` per frame, back to tokens."""
    B, _, C = x.shape
    img = x.transpose(1, 2).reshape(B, C, *grid)  # "b (h w) d -> b d h w": a channels-last view
    if mode == "bilinear":
        T = grid[0] if len(grid) == 3 else 1
        frames = img.reshape(B, C, T, *grid[-2:]).transpose(1, 2).reshape(B * T, C, *grid[-2:])
        pooled = F.interpolate(frames, size=tuple(out_grid[-2:]), mode="bilinear", align_corners=False)
        pooled = pooled.reshape(B, T, C, -1).transpose(1, 2)
    elif len(grid) == 2:
        pooled = F.adaptive_avg_pool2d(img, tuple(out_grid))
    else:
        pooled = F.adaptive_avg_pool3d(img, tuple(out_grid))
    return pooled.reshape(B, C, -1).transpose(1, 2)  # "b d h w -> b (h w) d"


class AvgPoolProjector(nn.Module):
    """DeCo's projector as the paper's code writes it (rearrange, AdaptiveAvgPool, MLP); 3D grids
    pool with AdaptiveAvgPool3d. ``order="mlp_pool"`` is PLLaVA/OneVision's project-then-pool."""

    def __init__(self, in_features, hidden, out_features, grid, out_grid, order="pool_mlp", mode="average",
                 device=None, dtype=None):
        super().__init__()
        self.grid, self.out_grid, self.order, self.mode = tuple(grid), tuple(out_grid), order, mode
        f = {"device": device, "dtype": dtype}
        self.mlp_projector = nn.Sequential(nn.Linear(in_features, hidden, **f), nn.GELU(), nn.Linear(hidden, out_features, **f))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return eager_pool_tokens(x, self.grid, self.out_grid, self.mode)

    def forward(self, x):
        if self.order == "mlp_pool":
            return self.pool(self.mlp_projector(x))
        return self.mlp_projector(self.pool(x))


def _projector(s, env: Env, gen: torch.Generator, order: str = "pool_mlp", mode: str = "average"):
    """The eager projector of shape ``s`` with random weights, and its (w1, b1, w2, b2)."""
    eager = AvgPoolProjector(s.in_features, s.hidden, s.out_features, s.grid, s.out_grid, order=order, mode=mode,
                             dtype=torch.float32)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    eager = eager.to(device=env.device, dtype=env.dtype)
    w1, b1 = eager.mlp_projector[0].weight, eager.mlp_projector[0].bias
    w2, b2 = eager.mlp_projector[2].weight, eager.mlp_projector[2].bias
    return eager, (w1, b1, w2, b2)


def _pool_setup(s, env: Env, order: str = "pool_mlp", mode: str = "average"):
    gen = _generator(env, 1)
    eager, weights = _projector(s, env, gen, order, mode)
    x = _randn((s.batch, s.tokens, s.in_features), env, gen)
    dy = _randn((s.batch, s.pooled, s.out_features), env, gen)
    return eager, weights, x, dy


def _pool_group(op: str, name: str, s, env: Env, direction: str, deco_forward, eager, weights, x, dy, flops_bytes,
                extra=None, more_deco=None, tma_w1=None) -> Group:
    """``more_deco``: name -> forward of further deco_ops variants timed beside the baselines.
    ``tma_w1``: the first Linear's weight of an op with a ``fused_tma`` candidate (pool_mlp, merge_mlp)."""
    grad = direction != "fwd"
    tokens_grad = direction == "fwd_bwd_dx"
    xin = x.detach().requires_grad_(tokens_grad)
    leaves = list(weights) + ([xin] if tokens_grad else [])

    def make(forward, ctx=contextlib.nullcontext):
        return (lambda: _grad_runner(forward, leaves, dy, ctx)) if grad else (lambda: _fwd_runner(forward, ctx))

    def compiled():
        c = _compiled(eager, env)
        return make(lambda: c(xin))()

    def forced(strategy):
        def factory():
            if strategy == "fused":
                _projectors_fused(env)
            return make(lambda: deco_forward(xin), lambda: _deco(env, strategy))()

        return factory

    def tma():
        # forced elsewhere, fused_tma quietly runs fused: shown only where the TMA GEMM itself runs
        if not (tma_w1 is not None and _on_triton(env) and env.device.type == "cuda"
                and deco_ops.composed.tma_applies(x, tma_w1, None)):
            raise Unavailable("the TMA GEMM (fused_tma) runs pool_mlp and merge_mlp on sm_90 GPUs, 16-bit, 16-byte rows")
        return forced("fused_tma")()

    flops, nbytes = flops_bytes(tokens_grad)
    impls = {
        "deco_ops": make(lambda: deco_forward(xin), lambda: _deco(env)),
        "deco_ops_fused": forced("fused"),
        "deco_ops_composed": forced("composed"),
        "deco_ops_fused_tma": tma,
        "eager": make(lambda: eager(xin)),
        "compile": compiled,
    }
    for impl, forward in (more_deco or {}).items():
        impls[impl] = make(lambda forward=forward: forward(xin), lambda: _deco(env))
    return Group(op, name, s, direction, flops, nbytes, impls, extra or {})


def pool_mlp_groups(name: str, env: Env, directions) -> list[Group]:
    s = shapes.for_device(shapes.ALL[name], env.device)
    eager, (w1, b1, w2, b2), x, dy = _pool_setup(s, env)

    def deco_forward(xin):
        return deco_ops.pool_mlp(xin, w1, b1, w2, b2, grid=s.grid, out_grid=s.out_grid, activation="gelu")

    return [
        _pool_group("pool_mlp", name, s, env, d, deco_forward, eager, (w1, b1, w2, b2), x, dy,
                    lambda tg, d=d: counts.pool_mlp_shape(s, env.elem, "fwd" if d == "fwd" else "fwd_bwd", tg), tma_w1=w1)
        for d in directions
    ]


def pooling_groups(name: str, env: Env, directions) -> list[Group]:
    """``adaptive_avg_pool_tokens`` alone at a pool+MLP shape's batch, grids and width (the
    projector's first stage), against eager ``eager_pool_tokens``: forward pools, forward+backward
    also un-pools (token gradients). No FLOPs: GB/s against the copy bandwidth is the figure."""
    s = shapes.for_device(shapes.POOL_MLP[name], env.device)
    gen = _generator(env, 7)
    x = _randn((s.batch, s.tokens, s.in_features), env, gen)
    dy = _randn((s.batch, s.pooled, s.in_features), env, gen)
    groups = []
    for d in directions:
        grad = d != "fwd"
        xin = x.detach().requires_grad_(grad)

        def make(pool, ctx=contextlib.nullcontext, xin=xin, grad=grad):
            forward = lambda: pool(xin, s.grid, s.out_grid)  # noqa: E731
            return (lambda: _grad_runner(forward, [xin], dy, ctx)) if grad else (lambda: _fwd_runner(forward, ctx))

        impls = {"deco_ops": make(deco_ops.adaptive_avg_pool_tokens, lambda: _deco(env)), "eager": make(eager_pool_tokens)}
        groups.append(Group("adaptive_avg_pool_tokens", name, s, d, 0, counts.pool_tokens_shape(s, env.elem, d), impls))
    return groups


def mlp_pool_groups(name: str, env: Env, directions) -> list[Group]:
    s = shapes.for_device(shapes.MLP_POOL[name], env.device)
    mode = s.mode
    eager, (w1, b1, w2, b2), x, dy = _pool_setup(s, env, order="mlp_pool", mode=mode)

    def deco_forward(xin):
        return deco_ops.mlp_pool(xin, w1, b1, w2, b2, grid=s.grid, out_grid=s.out_grid, activation="gelu", mode=mode)

    def fb(tg, d):
        return counts.mlp_pool_shape(s, env.elem, "fwd" if d == "fwd" else "fwd_bwd", tg)

    return [
        _pool_group("mlp_pool", name, s, env, d, deco_forward, eager, (w1, b1, w2, b2), x, dy,
                    lambda tg, d=d: fb(tg, d),
                    extra={"mode": mode, "eager_order_flops": counts.mlp_pool_shape(
                        s, env.elem, "fwd" if d == "fwd" else "fwd_bwd", d == "fwd_bwd_dx", fused=False)[0]})
        for d in directions
    ]


def enclosing_grid(grids) -> tuple[int, ...]:
    """The smallest grid that holds each of ``grids`` (their elementwise maximum)."""
    return tuple(map(max, zip(*grids)))


class Padded(nn.Module):
    """What a batch of unequal grids costs without packing: scatter the packed tokens into a zero
    padded ``(num_grids, prod(pad_grid), C)`` batch, run ``project`` on it (pooling every grid as if
    it were ``pad_grid``), and gather every grid's own pooled rows back, packed."""

    def __init__(self, project, grids, out_grids, device):
        super().__init__()
        self.project = project
        pad, pad_out = enclosing_grid(grids), enclosing_grid(out_grids)
        stride = [p // o for p, o in zip(pad, pad_out)]
        if any(g[d] != o[d] * r for g, o in zip((pad, *grids), (pad_out, *out_grids)) for d, r in enumerate(stride)):
            raise Unavailable("the padded baseline pools like packing only where every grid is pooled by one integer stride")
        total = sum(math.prod(g) for g in grids)
        token_of = torch.full((len(grids), *pad), total, dtype=torch.long)  # ``total``: the appended zero row
        out_pos = torch.arange(len(grids) * math.prod(pad_out)).view(len(grids), *pad_out)
        crop, tok0 = [], 0
        for i, (g, o) in enumerate(zip(grids, out_grids)):
            token_of[i][tuple(slice(0, n) for n in g)] = torch.arange(tok0, tok0 + math.prod(g)).view(g)
            crop.append(out_pos[i][tuple(slice(0, n) for n in o)].reshape(-1))
            tok0 += math.prod(g)
        self.num_grids = len(grids)
        self.register_buffer("token_of", token_of.view(-1).to(device))
        self.register_buffer("crop", torch.cat(crop).to(device))

    def forward(self, x):
        x0 = torch.cat([x, x.new_zeros(1, x.shape[1])])
        y = self.project(x0[self.token_of].view(self.num_grids, -1, x.shape[1]))
        return y.reshape(-1, y.shape[-1])[self.crop]


def packed_groups(name: str, env: Env, directions) -> list[Group]:
    """deco_ops.pool_mlp_packed on the packed batch, against the padded batch (eager, compiled, and
    deco_ops.pool_mlp as ``deco_ops_padded``): the same outputs, the padding's work saved."""
    s = shapes.for_device(shapes.PACKED[name], env.device)
    gen = _generator(env, 2)
    pad, pad_out = enclosing_grid(s.grids), enclosing_grid(s.out_grids)
    as_batch = shapes.PoolMLPShape(s.name, len(s.grids), pad, pad_out, s.in_features, s.hidden, s.out_features)
    projector, (w1, b1, w2, b2) = _projector(as_batch, env, gen)
    eager = Padded(projector, s.grids, s.out_grids, env.device)
    x = _randn((s.tokens, s.in_features), env, gen)
    dy = _randn((s.pooled, s.out_features), env, gen)
    grids_t = torch.tensor(s.grids, dtype=torch.int32, device=env.device)
    out_grids_t = torch.tensor(s.out_grids, dtype=torch.int32, device=env.device)

    def deco_forward(xin):
        return deco_ops.pool_mlp_packed(xin, grids_t, w1, b1, w2, b2, out_grids=out_grids_t, activation="gelu")[0]

    deco_padded = Padded(lambda xp: deco_ops.pool_mlp(xp, w1, b1, w2, b2, grid=pad, out_grid=pad_out, activation="gelu"),
                         s.grids, s.out_grids, env.device)

    def fb(tg, d):
        return counts.packed_shape(s, env.elem, "fwd" if d == "fwd" else "fwd_bwd", tg)

    def padded_flops(d):
        return counts.pool_mlp_shape(as_batch, env.elem, "fwd" if d == "fwd" else "fwd_bwd", d == "fwd_bwd_dx")[0]

    return [
        _pool_group("pool_mlp_packed", name, s, env, d, deco_forward, eager, (w1, b1, w2, b2), x, dy,
                    lambda tg, d=d: fb(tg, d), extra={"padded_flops": padded_flops(d)},
                    more_deco={"deco_ops_padded": deco_padded})
        for d in directions
    ]


# ----------------------------------------------------------------------------------------------
# cross-attention


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def eager_softmax_attention(q, k, v, additive_mask, scale, dropout_p: float = 0.0):
    """BLIP-2 Q-Former ``BertSelfAttention`` as cross-attention, on (B, L, H, D) projections."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # transpose_for_scores
    scores = torch.matmul(qt, kt.transpose(-1, -2))
    scores = scores * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=True)
    ctx = torch.matmul(probs, vt)
    return ctx.permute(0, 2, 1, 3).contiguous()


def attention_groups(name: str, env: Env, directions) -> list[Group]:
    s = shapes.for_device(shapes.ALL[name], env.device)
    gen = _generator(env, 2)
    B, M, N, H, D = s.batch, s.M, s.N, s.heads, s.head_dim
    q0 = _randn((1 if s.shared_q else B, M, H, D), env, gen)
    k0 = _randn((B, N, H, D), env, gen)
    v0 = _randn((B, N, H, D), env, gen)
    dy = _randn((B, M, H, D), env, gen)
    scale = D ** -0.5
    kv_lens = bool_mask = additive = None
    if s.kv_lens is not None:
        kv_lens = torch.tensor(s.kv_lens, dtype=torch.int32, device=env.device)
        keep = torch.arange(N, device=env.device)[None, :] < kv_lens[:, None]
        bool_mask = keep[:, None, None, :]  # (B, 1, 1, N), True = attend
        additive = ((~bool_mask).to(env.dtype) * -10000.0)  # BLIP-2's extended attention mask

    groups = []
    for d in directions:
        if d == "fwd_bwd_dx":
            continue  # attention's fwd_bwd already differentiates q, k and v
        grad = d == "fwd_bwd"
        q, k, v = (t.detach().requires_grad_(grad) for t in (q0, k0, v0))
        leaves = [q, k, v]

        def make(forward, ctx=contextlib.nullcontext, grad=grad, leaves=leaves):
            return (lambda: _grad_runner(forward, leaves, dy, ctx)) if grad else (lambda: _fwd_runner(forward, ctx))

        def deco_factory(strategy="auto", q=q, k=k, v=v, make=make):
            return make(lambda: deco_ops.cross_attention(q, k, v, kv_lens=kv_lens, softmax_scale=scale),
                        lambda: _deco(env, strategy))()

        def tma_factory(q=q, k=k, v=v, f=deco_factory):
            # forced elsewhere, fused_tma quietly runs fused: shown only where the TMA forward itself runs
            if not (_on_triton(env) and env.device.type == "cuda" and deco_ops.attention._tma_applies(q, k, v, 0.0, None)):
                raise Unavailable("the TMA attention forward (fused_tma) runs on sm_90 GPUs, 16-bit, TMA-aligned tensors")
            return f("fused_tma")

        def one_kernel_factory(f, grad=grad):
            if not (grad and _on_triton(env) and deco_ops.kernels.cross_attention_bwd.one_kernel_applies(M, D, env.elem, True, True)):
                raise Unavailable("the one-kernel backward (fused_one_kernel) runs fwd_bwd with many queries on the Triton backend")
            return f("fused_one_kernel")

        def sdpa_forward(q, k, v):
            qt = q.transpose(1, 2).expand(B, H, M, D)
            out = F.scaled_dot_product_attention(qt, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bool_mask,
                                                 scale=scale)
            return out.transpose(1, 2)

        def sdpa_factory(backend, q=q, k=k, v=v, make=make):
            from torch.nn.attention import sdpa_kernel

            runner = make(lambda: sdpa_forward(q, k, v), lambda: sdpa_kernel([_sdpa_backend(backend)]))()
            try:  # probe: SDPA raises when the forced backend cannot take these inputs
                runner.run()
                runner.reset()
            except RuntimeError as e:
                raise Unavailable(f"SDPA {backend} backend unavailable: {str(e).splitlines()[0][:160]}") from None
            return runner

        def compiled(q=q, k=k, v=v, make=make):
            c = _compiled(eager_softmax_attention, env)
            return make(lambda: c(q, k, v, additive, scale))()

        flops, nbytes = counts.cross_attention_shape(s, env.elem, d)
        impls = {"deco_ops": deco_factory}
        for strategy in ("fused", "composed"):  # on the PyTorch backend "fused" is the chunked online-softmax reference
            impls[f"deco_ops_{strategy}"] = lambda strategy=strategy, f=deco_factory: f(strategy)
        impls["deco_ops_fused_tma"] = tma_factory
        impls["deco_ops_fused_one_kernel"] = lambda f=deco_factory: one_kernel_factory(f)
        for b in SDPA_BACKENDS:
            impls[f"sdpa_{b}"] = lambda b=b, f=sdpa_factory: f(b)
        impls["eager_softmax"] = make(lambda q=q, k=k, v=v: eager_softmax_attention(q, k, v, additive, scale))
        impls["compile"] = compiled
        groups.append(Group("cross_attention", name, s, d, flops, nbytes, impls,
                            {"eager_saved_bytes": counts.saved_bytes_eager_attention(B, M, N, H, env.elem)}))
    return groups


# ----------------------------------------------------------------------------------------------
# patch merge + norm + MLP


class HFRMSNorm(nn.Module):
    """Qwen2.5-VL's RMSNorm as HF writes it: fp32 variance and rsqrt, rounded back, times the weight."""

    def __init__(self, width, eps, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class HFPatchMerger(nn.Module):
    """The HF modules' code: Qwen2-VL's ``PatchMerger`` (norm per token, ``view(-1, S*S*C)``, MLP),
    Qwen2.5-VL's (its RMSNorm) and InternVL's ``get_image_features`` tail (reshape to the grid,
    ``pixel_shuffle``, LayerNorm over S*S*C, MLP)."""

    def __init__(self, s, device=None, dtype=None):
        super().__init__()
        self.s = s
        f = {"device": device, "dtype": dtype}
        K = s.merge * s.merge * s.in_features
        width = s.in_features if s.norm_position == "pre" else K
        self.norm = nn.LayerNorm(width, eps=s.eps, **f) if s.norm == "layernorm" else HFRMSNorm(width, s.eps, **f)
        self.mlp = nn.Sequential(nn.Linear(K, s.hidden, **f), nn.GELU(), nn.Linear(s.hidden, s.out_features, **f))

    def pixel_shuffle(self, x):
        n, w, h, c = x.size()
        scale = 1 / self.s.merge
        x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
        return x.permute(0, 2, 1, 3).contiguous()

    def forward(self, x):
        K = self.s.merge * self.s.merge * self.s.in_features
        if self.s.order == "block":
            return self.mlp(self.norm(x).view(-1, K))
        merged = self.pixel_shuffle(x.reshape(x.shape[0], *self.s.grid, -1)).reshape(x.shape[0], -1, K)
        return self.mlp(self.norm(merged))


def merge_groups(name: str, env: Env, directions) -> list[Group]:
    s = shapes.for_device(shapes.MERGE[name], env.device)
    gen = _generator(env, 13)
    eager = HFPatchMerger(s, dtype=torch.float32)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]) + (1.0 if p.dim() == 1 else 0.0))
    eager = eager.to(device=env.device, dtype=env.dtype)
    norm = eager.norm
    weights = [p for p in (norm.weight, getattr(norm, "bias", None), eager.mlp[0].weight, eager.mlp[0].bias,
                           eager.mlp[2].weight, eager.mlp[2].bias) if p is not None]
    x_shape = (s.tokens, s.in_features) if s.order == "block" else (s.batch, math.prod(s.grid), s.in_features)
    x = _randn(x_shape, env, gen)
    dy = _randn((s.merged, s.out_features) if s.order == "block" else (s.batch, s.merged // s.batch, s.out_features), env, gen)

    def deco_forward(xin):
        return deco_ops.merge_mlp(
            xin, norm.weight, getattr(norm, "bias", None), eager.mlp[0].weight, eager.mlp[0].bias,
            eager.mlp[2].weight, eager.mlp[2].bias, grid=s.grid if s.order == "grid" else None, merge_size=s.merge,
            order=s.order, norm=s.norm, norm_position=s.norm_position, eps=s.eps,
        )

    return [
        _pool_group("merge_mlp", name, s, env, d, deco_forward, eager, weights, x, dy,
                    lambda tg, d=d: counts.merge_mlp_shape(s, env.elem, "fwd" if d == "fwd" else "fwd_bwd", tg),
                    tma_w1=eager.mlp[0].weight)
        for d in directions
    ]


# ----------------------------------------------------------------------------------------------

OPS = {
    **{n: pool_mlp_groups for n in shapes.POOL_MLP},
    **{n: attention_groups for n in shapes.CROSS_ATTENTION},
    **{n: attention_groups if isinstance(s, shapes.AttentionShape) else pool_mlp_groups for n, s in shapes.CPU_PATH.items()},
    **{n: packed_groups for n in shapes.PACKED},
    **{n: mlp_pool_groups for n in shapes.MLP_POOL},
    **{n: merge_groups for n in shapes.MERGE},
}


def groups_for(name: str, env: Env, directions=("fwd", "fwd_bwd")) -> list[Group]:
    """Every group of one named shape."""
    return OPS[name](name, env, directions)
