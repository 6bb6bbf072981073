"""Patch-merge projectors, fused: ``merge_mlp`` and ``merge_mlp_packed``, forward and backward.

``Linear2(act(Linear1(norm(merge(x)))))`` (norm before the merge over each token's C channels, or
after it over the merged row's S*S*C): Qwen2-VL's ``PatchMerger`` (LayerNorm, pre),
Qwen2.5-VL's (RMSNorm, pre), Qwen3-VL's (LayerNorm, pre or post) and InternVL's ``pixel_shuffle``
+ ``mlp1`` (LayerNorm, post, row-major grid).

Forward on the Triton backend, two launches and a cuBLAS GEMM: ``merge_norm_stats`` (per-group
mean and rstd, fp32), ``merge_gemm`` (the merge is a gather in the first GEMM's A-tile load, the
norm is applied there from the statistics, bias + activation in the epilogue), then
``torch.addmm`` for the second Linear. Its composed twin is the HF modules' own sequence
(``merge_reference.composed_forward``), the only path on the PyTorch backend; on CUDA
``deco_ops.strategy`` picks between them per shape bucket (``DECO_OPS_STRATEGY`` /
``use_strategy`` force one). On Hopper an opt-in ``fused_tma`` candidate runs the composed norm
and merge, then the first GEMM, its bias and activation on the persistent TMA GEMM
(``composed.linear_act_linear_tma``). The strategy picks the norm backward likewise, between its
kernels (statistics pre-pass + backward) and its composed twin: ATen's LayerNorm backward
(``merge_reference.layer_norm_backward``, what eager autograd runs for ``F.layer_norm``) or the
RMSNorm formula (``rms_norm_stats`` + ``rms_norm_backward``).

Kept for backward (only when autograd needs it): the pre-activation ``(M, hidden)``, plus the
tokens ``x`` (an input) only when a gradient needs them (``x``, the norm's parameters or ``w1``).
Never the statistics, the merged or normalised tensor, or the activation. Backward:
``gemm_act_grad`` (dz and act(z) in one GEMM epilogue), cuBLAS for ``dW2``, ``dn = dz @ W1`` and
``dW1``; ``deco::merge_norm_backward`` recomputes the statistics from the tokens (the forward's
pre-pass again: one more read of tokens that it reads anyway, instead of keeping 8 bytes per
group alive between the passes) and rebuilds dW1's A operand, the norm output, from them in the
same pass that writes ``dx`` to every token's place and the norm's parameter gradients as
deterministic per-program partial sums.

Registered op: ``deco::merge_mlp``; ``merge_mlp_packed`` runs it on a packed batch.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _autocast, _backend, _plan, _validate, composed, merge_reference, reference, strategy
from ._direct import custom_op, deco, register_autograd
from .kernels import merge_gemm, merge_norm, packed_pool
from .packed import Packing, PackedPlans, _grid_table, device_geometry, device_tables
from ._plan import needs_residuals
from .projector import ACTIVATIONS, activation_backward, add_grads, linear_grads

ORDERS = ("block", "grid")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")


def _image_table(geometry: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if geometry is None:
        return None
    return packed_pool.image_index(geometry, "out_rows", rows)


def _layout(grid: list[int]) -> tuple[int, int, int]:
    return tuple(grid) if grid else (1, 1, 1)


def _fused(x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals):
    B, N, _ = x.shape
    layout = _layout(grid)
    image = _image_table(geometry, B * N // (merge * merge))
    stats = merge_norm.merge_norm_stats(x, merge, order, layout, geometry, image, norm, pre, eps)
    act, pre_act = merge_gemm.merge_gemm(
        x, stats, _contiguous(norm_weight), _contiguous(norm_bias), w1.contiguous(), _contiguous(b1),
        merge, order, layout, geometry, image, norm, pre, activation, store_pre=keep_residuals,
    )
    w2t = w2.t()
    y = torch.addmm(b2, act, w2t) if b2 is not None else act @ w2t
    return y.view(B, N // (merge * merge), w2.shape[0]), pre_act


def _composed(x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals):
    B, N, _ = x.shape
    y, pre_act = merge_reference.composed_forward(
        x, norm_weight, norm_bias, w1, b1, w2, b2, merge, order, _layout(grid), geometry, norm, pre, eps, activation,
        keep_residuals)
    return y.view(B, N // (merge * merge), w2.shape[0]), pre_act


def _tma(x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals):
    """The norm and merge in PyTorch (as the composed twin), then the MLP with its first GEMM on the
    persistent TMA GEMM (``composed.linear_act_linear_tma``)."""
    B, N, _ = x.shape
    rows = merge_reference.norm_forward(x, norm_weight, norm_bias, merge, order, _layout(grid), geometry, norm, pre, eps)
    y, pre_act = composed.linear_act_linear_tma(rows.to(w1.dtype).contiguous(), w1, b1, w2, b2, activation, keep_residuals)
    return y.view(B, N // (merge * merge), w2.shape[0]), pre_act


def _mlp_dtype_field(x: torch.Tensor, mlp: torch.dtype | None) -> dict:
    """A strategy key's field for the MLP's dtype where it is not the tokens' (a float32 norm
    before a 16-bit MLP); none where they agree, so the keys of one-dtype calls are as they always
    were."""
    return {} if mlp is None or mlp == x.dtype else {"mlp_dtype": mlp}


def _implementation(x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation,
                    keep_residuals):
    """The function that runs ``deco::merge_mlp`` on these arguments (the strategy's choice). It
    returns (y, pre-activation) where the residual is kept, else y and anything: the custom op's
    body puts the empty tensor of its schema in its place (``projector._pool_mlp_implementation``)."""
    B, N, C = x.shape

    def key():
        return strategy.make_key(
            "merge_mlp", x.device, x.dtype, keep_residuals, rows=strategy.bucket(B * N // (merge * merge)), C=C,
            hidden=w1.shape[0], out=w2.shape[0], merge=merge, order=order, packed=geometry is not None, norm=norm,
            pre=pre, activation=activation, **_mlp_dtype_field(x, w1.dtype))

    on_triton = _backend.use_triton(x.device)
    args = (x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals)
    tma = {"fused_tma": strategy.Candidate(_tma, opt_in=True)} if on_triton and composed.tma_applies(x, w1, b1, w1.dtype) else None
    return strategy.implementation(args, on_triton=on_triton, key=key, fused=_fused if on_triton else None, composed=_composed,
                                   composed_kernels=tma)


@custom_op("merge_mlp")
def _merge_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    geometry: torch.Tensor | None,
    grid: list[int],
    merge: int,
    order: str,
    norm: str,
    pre: bool,
    eps: float,
    activation: str,
    keep_residuals: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals)
    y, pre_act = _implementation(*args)(*args)
    return y, pre_act if keep_residuals else w1.new_empty((0,))


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@_merge_mlp.register_fake
def _(x, norm_weight, norm_bias, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep_residuals):
    B, N, _ = x.shape
    M = B * N // (merge * merge)
    y = w2.new_empty((B, N // (merge * merge), w2.shape[0]))  # the MLP's dtype (a float32 norm may precede it)
    return y, w1.new_empty((M, w1.shape[0])) if keep_residuals else w1.new_empty((0,))


def _norm_grads(x, grads) -> tuple[torch.Tensor, ...]:
    """``deco::merge_norm_backward``'s outputs: an empty tensor for each one not requested (None)."""
    return tuple([x.new_empty((0,)) if t is None else t for t in grads])  # a list: no generator frame per item


def _norm_backward_fused(x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps, *flags):
    layout = _layout(grid)
    image = _image_table(geometry, x.shape[0] * x.shape[1] // (merge * merge))
    stats = merge_norm.merge_norm_stats(x, merge, order, layout, geometry, image, norm, pre, eps)
    return _norm_grads(x, merge_norm.merge_norm_backward(
        x, stats, norm_weight, norm_bias, dn, merge, order, layout, geometry, image, norm, pre, *flags))


def _layer_norm_backward_composed(x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps, *flags):
    return _norm_grads(x, merge_reference.layer_norm_backward(
        x, norm_weight, norm_bias, dn, merge, order, _layout(grid), geometry, pre, eps, *flags))


def _rms_norm_backward_composed(x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps,
                                need_dx, n_dtype, need_dwn, need_dbn):
    layout = _layout(grid)
    stats = merge_reference.rms_norm_stats(x, merge, order, layout, geometry, pre, eps)
    return _norm_grads(x, (*merge_reference.rms_norm_backward(
        x, stats, norm_weight, dn, merge, order, layout, geometry, pre, need_dx, n_dtype, need_dwn), None))


def _norm_backward_implementation(x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps,
                                  need_dx, n_dtype, need_dwn, need_dbn):
    """The function that runs ``deco::merge_norm_backward`` on these arguments (the strategy's choice)."""
    args = (x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps, need_dx, n_dtype, need_dwn, need_dbn)

    def key():
        flags = (need_dx, n_dtype is not None, need_dwn, need_dbn)
        return strategy.make_key(
            "merge_norm_backward", x.device, x.dtype, False, rows=strategy.bucket(x.shape[0] * x.shape[1] // (merge * merge)),
            C=x.shape[2], merge=merge, order=order, packed=geometry is not None, norm=norm, pre=pre,
            flags="".join(str(int(f)) for f in flags), **_mlp_dtype_field(x, n_dtype if dn is None else dn.dtype))

    on_triton = _backend.use_triton(x.device)
    composed = _layer_norm_backward_composed if norm == "layernorm" else _rms_norm_backward_composed
    return strategy.implementation(
        args, on_triton=on_triton, key=key, fused=_norm_backward_fused if on_triton else None, composed=composed)


@custom_op("merge_norm_backward", plan=_norm_backward_implementation)
def _norm_backward(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    dn: torch.Tensor | None,
    geometry: torch.Tensor | None,
    grid: list[int],
    merge: int,
    order: str,
    norm: str,
    pre: bool,
    eps: float,
    need_dx: bool,
    n_dtype: torch.dtype | None,
    need_dwn: bool,
    need_dbn: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, norm output (M, K) in ``n_dtype`` (dW1's operand, in the MLP's dtype: a float32 norm's
    rows rounded once, as the forward rounded them), fp32 dweight, fp32 dbias); empty where not
    requested (``n_dtype`` None: no norm output). The norm statistics are recomputed from the tokens
    by the forward's own pre-pass, not saved."""
    args = (x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps, need_dx, n_dtype, need_dwn, need_dbn)
    return _norm_backward_implementation(*args)(*args)


@_norm_backward.register_fake
def _(x, norm_weight, norm_bias, dn, geometry, grid, merge, order, norm, pre, eps, need_dx, n_dtype, need_dwn, need_dbn):
    width = x.shape[2] * (1 if pre else merge * merge)
    rows = x.shape[0] * x.shape[1] // (merge * merge)
    acc = merge_reference.stats_dtype(x.dtype)
    empty = x.new_empty((0,))
    return (
        x.new_empty(x.shape) if need_dx else empty,
        x.new_empty((rows, merge * merge * x.shape[2]), dtype=n_dtype) if n_dtype is not None else empty,
        x.new_empty((width,), dtype=acc) if need_dwn else empty,
        x.new_empty((width,), dtype=acc) if need_dbn else empty,
    )


def _setup(ctx, inputs, output):
    x, nw, nb, w1, b1, w2, b2, geometry, grid, merge, order, norm, pre, eps, activation, keep = inputs
    need_x, need_nw, need_nb, need_w1 = ctx.needs_input_grad[:4]
    # The tokens are needed for dx, the norm's parameter gradients and dW1 (its A operand is
    # rebuilt from them); a frozen tower under a frozen first layer keeps nothing token-sized.
    tokens = x if need_x or need_nw or need_nb or need_w1 else None
    if tokens is not None and tokens.is_inference():
        # Tokens made under torch.inference_mode (a frozen tower run in it) cannot be saved for
        # backward; eager PyTorch saves the norm's output, an ordinary tensor, and trains the
        # layers after them: a copy of the tokens is saved instead (the size of what eager keeps)
        tokens = tokens.clone()
    ctx.save_for_backward(tokens, nw, nb, w1, w2, geometry, output[1])
    ctx.set_materialize_grads(False)  # outputs nothing used (the residual) bring None, not zeros
    ctx.args = (grid, merge, order, norm, pre, eps)
    ctx.activation, ctx.keep = activation, keep
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _backward(ctx, dy, dpre_extra):
    x, nw, nb, w1, w2, geometry, pre_act = ctx.saved_tensors
    if not ctx.keep:
        raise RuntimeError("deco::merge_mlp ran with keep_residuals=False; call deco_ops.merge_mlp to differentiate it")
    need_x, need_nw, need_nb, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:7]
    grid, merge, order, norm, pre, eps = ctx.args
    dz = dw2 = db2 = db1 = dx = dnw = dnb = dw1 = None
    need_b1 = need_b1 and ctx.has_b1
    if dy is not None:  # None (not zeros) when only the residual output was used
        dy2 = dy.reshape(-1, dy.shape[-1])
        dz, act, db1 = activation_backward(dy2, w2, pre_act, ctx.activation, need_b1 and dpre_extra is None)
        dw2, db2 = linear_grads(dy2, act, need_w2, need_b2 and ctx.has_b2)
        del act  # freed before dW1 (eager frees the activation after the second Linear's backward)
    dz = add_grads(dz, dpre_extra)
    if dz is None:
        return dx, dnw, dnb, dw1, db1, dw2, db2, None, None, None, None, None, None, None, None, None
    if need_b1 and db1 is None:
        db1 = reference.bias_grad(dz)
    need_nw, need_nb = need_nw and nw is not None, need_nb and nb is not None
    if need_x or need_nw or need_nb or need_w1:
        dx, n, dnw, dnb = deco.merge_norm_backward(  # dn = dz @ W1 an argument: freed before dW1
            x, nw, nb, dz @ w1 if need_x or need_nw or need_nb else None, geometry, grid, merge, order, norm, pre, eps, need_x, w1.dtype if need_w1 else None, need_nw, need_nb)
        if need_w1:
            dw1 = dz.t() @ n
        dx = dx if need_x else None
        dnw = dnw.to(nw.dtype) if need_nw else None
        dnb = dnb.to(nb.dtype) if need_nb else None
    return dx, dnw, dnb, dw1, db1, dw2, db2, None, None, None, None, None, None, None, None, None


register_autograd(_merge_mlp, _backward, _setup)


# ----------------------------------------------------------------------------------------------
# validation and public API


def _choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_eps(eps) -> float:
    """The norm's epsilon: a finite real number >= 0 (a SymFloat under torch.compile: comparisons only)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return eps


def _check_params(x, norm_weight, norm_bias, w1, b1, w2, b2, merge, norm, norm_position, eps, activation):
    """Checks every argument but the token layout; returns (norm, pre, eps)."""
    C = x.shape[-1]
    merge = _validate.positive_int("merge_size", merge)
    _choice("norm", norm, NORMS)
    pre = _choice("norm_position", norm_position, NORM_POSITIONS) == "pre"
    check_eps(eps)
    width, width_name = (C, "x.shape[-1]") if pre else (merge * merge * C, "merge_size**2 * x.shape[-1]")
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p is not None:
            _validate.tensor(name, p, 1)
            if p.shape[0] != width:
                raise ValueError(f"{name} has shape {tuple(p.shape)} but a {norm_position}-merge norm spans {width_name} = {width} channels")
    if norm == "rmsnorm" and norm_bias is not None:
        raise ValueError("norm_bias must be None for norm='rmsnorm' (RMSNorm has no bias)")
    _validate.linear("w1", w1, "b1", b1, merge * merge * C, "merge_size**2 * x.shape[-1]")
    _validate.linear("w2", w2, "b2", b2, w1.shape[0], "w1.shape[0] (hidden features)")
    _validate.activation(activation, ACTIVATIONS)
    use_triton = _backend.use_triton(x.device)
    params = {"norm_weight": norm_weight, "norm_bias": norm_bias, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    _validate.floating("x", x, use_triton)
    for name, value in params.items():
        if value is not None:
            _validate.floating(name, value, use_triton)
    _check_dtypes(x, norm_weight, norm_bias, w1, b1, w2, b2)
    _validate.same_device("x", x, **params)
    return merge, pre, float(eps)


_NORM_IN_FP32_FOR = (torch.float16, torch.bfloat16)  # MLP dtypes that may follow a float32 norm


def _check_dtypes(x, norm_weight, norm_bias, w1, b1, w2, b2) -> None:
    """One dtype for the tokens and the norm's parameters, one for the MLP's weights; the two
    equal, or a float32 norm in front of a 16-bit MLP (what ``torch.autocast`` runs: the norm in
    float32, as it runs ``F.layer_norm``, the Linears in its dtype; ``_autocast`` casts the
    arguments so). Inside an autocast region the dtypes are judged as that cast leaves them."""
    norm_dtype = _validate.norm_dtype_under_autocast(x)
    for name, value in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if value is not None and _validate.norm_dtype_under_autocast(value) != norm_dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but x has {x.dtype}; cast them to one dtype")
    _validate.same_dtype("w1", w1, b1=b1, w2=w2, b2=b2)
    mlp_dtype = _validate.dtype_under_autocast(w1)
    if mlp_dtype != norm_dtype and not (norm_dtype is torch.float32 and mlp_dtype in _NORM_IN_FP32_FOR):
        raise TypeError(f"w1 has dtype {w1.dtype} but x has {x.dtype}; merge_mlp takes one dtype, or float32 tokens and norm "
                        "with a float16/bfloat16 MLP")


def tokens_for_norm(x, norm_weight, norm_bias, w1):
    """``x`` as the norm reads it where 16-bit tokens meet a float32 norm before an MLP in the
    tokens' dtype (a norm kept in float32, e.g. Hugging Face's ``keep_in_fp32_modules``):
    ``F.layer_norm``/``F.rms_norm`` take that mix and compute in float32, their output in the
    tokens' dtype, so the Linears after them run. Here the tokens are cast to float32 (exact,
    differentiable: their gradient comes back in their dtype) and the float32-norm-before-a-16-bit-MLP
    path runs, which rounds the norm's rows to the MLP's dtype once, as eager does. Any other mix
    is left for ``_check_dtypes`` to refuse, as eager's Linear refuses it. Only called where a norm
    parameter's dtype differs from the tokens'."""
    if (isinstance(x, torch.Tensor) and x.dtype in _NORM_IN_FP32_FOR and isinstance(w1, torch.Tensor) and w1.dtype is x.dtype
            and all(p is None or (isinstance(p, torch.Tensor) and p.dtype is torch.float32) for p in (norm_weight, norm_bias))):
        return x.to(dtype=torch.float32)
    return x


def check_merge_grid(grid, merge: int) -> tuple[int, ...]:
    """A "grid"-order input's grid, checked against the merge size (also where a module is built)."""
    return _merge_multiples(_validate.grid("grid", grid), merge)


def _merge_multiples(g: tuple[int, ...], merge: int) -> tuple[int, ...]:
    if g[-2] % merge or g[-1] % merge:
        raise ValueError(f"grid {g}: H and W must be multiples of merge_size = {merge}")
    return g


def _merge_grid(grid, merge: int, tokens: int) -> list[int]:
    """(T, H, W) of a dense "grid"-order input, checked against the token count and merge size."""
    g = _validate.grid("grid", grid)
    if math.prod(g) != tokens:
        raise ValueError(f"x has {tokens} tokens but grid {g} needs {math.prod(g)}")
    g = _merge_multiples(g, merge)
    return [1, *g] if len(g) == 2 else list(g)


def merge_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    grid=None,
    merge_size: int = 2,
    order: str = "block",
    norm: str = "layernorm",
    norm_position: str = "pre",
    eps: float = 1e-6,
    activation: str = "gelu",
) -> torch.Tensor:
    """The patch-merge projector ``Linear2(act(Linear1(norm(merge(x)))))``, fused.

    Args:
        x: ``(B, N, C)`` or ``(N, C)`` patch tokens.
        norm_weight, norm_bias: the norm's ``(C,)`` (``norm_position="pre"``) or ``(S*S*C,)``
            (``"post"``) weight and bias, or None; RMSNorm takes no bias.
        w1, b1: ``(hidden, S*S*C)`` and ``(hidden,)`` or None. w2, b2: ``(out, hidden)``, ``(out,)``.
        grid: ``(H, W)`` or ``(T, H, W)`` of a row-major token grid, with ``order="grid"`` only.
        merge_size: S, the side of the merged blocks (Qwen's ``spatial_merge_size``, InternVL's
            ``1 / downsample_ratio``).
        order: ``"block"``: each block's S*S tokens are consecutive (Qwen2/2.5/3-VL's vision
            towers; the merge is HF's ``view(-1, S*S*C)``). ``"grid"``: row-major grid, merged as
            InternVL's ``pixel_shuffle(x, 1/S)`` (channel block ``dh*S + dw``).
        norm: ``"layernorm"`` or ``"rmsnorm"``; norm_position: ``"pre"`` (each token over C,
            Qwen2/2.5-VL) or ``"post"`` (the merged row over S*S*C, InternVL, Qwen3-VL's
            post-shuffle norm). eps: the norm's epsilon.
        activation: ``"gelu"`` (erf, ``nn.GELU()``), ``"gelu_tanh"`` or ``"silu"``.
    Returns:
        ``(B, N / S², out)`` (``(N / S², out)`` for 2D ``x``), merged rows in block order
        (``"block"``) or row-major over the merged ``(T, H/S, W/S)`` grid (``"grid"``).
    """
    try:  # 16-bit tokens before a norm kept in float32 (``tokens_for_norm``); the checks name a non-tensor
        if norm_weight is not None and norm_weight.dtype is not x.dtype or norm_bias is not None and norm_bias.dtype is not x.dtype:
            x = tokens_for_norm(x, norm_weight, norm_bias, w1)
    except AttributeError:
        pass
    plan = _plans.get(x, norm_weight, norm_bias, w1, b1, w2, b2, grid, merge_size, order, norm, norm_position, eps, activation)
    if plan is None:
        kwargs = {"grid": grid, "merge_size": merge_size, "order": order, "norm": norm, "norm_position": norm_position, "eps": eps,
                  "activation": activation}
        out = _autocast.plain_call(merge_mlp, "merge_mlp", (x, norm_weight, norm_bias, w1, b1, w2, b2), kwargs, norm_args=3)
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = _through(deco.merge_mlp, order, norm, activation, *_checked(
            x, norm_weight, norm_bias, w1, b1, w2, b2, grid, merge_size, order, norm, norm_position, eps, activation))
    return plan(x, norm_weight, norm_bias, w1, b1, w2, b2)


def _through(run, order, norm, activation, batched, layout, merge, pre, eps, keep):
    """``merge_mlp``'s call ``(x, norm_weight, norm_bias, w1, b1, w2, b2) -> y`` through ``run``
    (``deco.merge_mlp``, or what a plan runs in its place), given ``_checked``'s answers."""

    def call(x, nw, nb, w1, b1, w2, b2):
        y = run(x if batched else x[None], nw, nb, w1, b1, w2, b2, None, layout, merge, order, norm, pre, eps, activation, keep)[0]
        return y if batched else y.squeeze(0)  # a view whose backward is a view (y[0]'s fills a zero buffer)

    return call


def _checked(x, norm_weight, norm_bias, w1, b1, w2, b2, grid, merge_size, order, norm, norm_position, eps, activation):
    """Every check of ``merge_mlp``: (whether x is batched (B, N, C), the dense grid's layout,
    merge size, whether the norm is pre-merge, eps as a float, whether autograd needs the residual)."""
    x3 = as_batch(x)
    merge, pre, eps = _check_params(x3, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, norm, norm_position, eps, activation)
    _choice("order", order, ORDERS)
    layout = token_layout(x3.shape[1], grid, merge, order)
    keep = needs_residuals(x, norm_weight, norm_bias, w1, b1, w2, b2)
    return x.dim() == 3, layout, merge, pre, eps, keep


def as_batch(x: torch.Tensor) -> torch.Tensor:
    """``merge_mlp``'s tokens as a batch: ``(B, N, C)`` as they are, ``(N, C)`` as one image."""
    _validate.tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must have 2 (N, C) or 3 (B, N, C) dimensions, got shape {tuple(x.shape)}")
    return x if x.dim() == 3 else x.unsqueeze(0)


def token_layout(tokens: int, grid, merge: int, order: str) -> list[int]:
    """The dense grid ``[T, H, W]`` of an ``order="grid"`` input (``[1, 1, 1]``, what ``_layout``
    makes of it, for ``"block"``: an empty list reaches an AOTInductor package's op call as None),
    checked against its token count and the merge size."""
    if order == "grid":
        if grid is None:
            raise ValueError("order='grid' needs grid=(H, W) or (T, H, W), the row-major token grid")
        return _merge_grid(grid, merge, tokens)
    if grid is not None:
        raise ValueError(f"grid is only used with order='grid' (row-major tokens), got grid={grid!r} with order='block'")
    if tokens % (merge * merge):
        raise ValueError(f"x has {tokens} tokens, not a multiple of merge_size**2 = {merge * merge} (order='block')")
    return [1, 1, 1]


def _plan_of(x, norm_weight, norm_bias, w1, b1, w2, b2, grid, merge_size, order, norm, norm_position, eps, activation):
    """A plain eager call's plan: the function ``(x, norm_weight, norm_bias, w1, b1, w2, b2) -> y``
    that runs it. Where that is the composed twin on its own (the PyTorch backend, or the
    strategy's choice on the Triton one, where autograd records nothing), the twin's ATen ops for
    this signature (``merge_reference.forward_of``): the same bits, without the op's generic
    argument handling."""
    checked = _checked(x, norm_weight, norm_bias, w1, b1, w2, b2, grid, merge_size, order, norm, norm_position, eps, activation)
    batched, layout, merge, pre, eps, keep = checked
    args = (x if batched else x[None], norm_weight, norm_bias, w1, b1, w2, b2, None, layout, merge, order, norm, pre, eps,
            activation, keep)
    run = _plan.runner(deco.merge_mlp, _implementation, args, keep)
    if run is _composed:
        return merge_reference.forward_of(x.shape, merge, order, _layout(layout), norm, pre, eps, activation, w2.shape[0],
                                          None if w1.dtype == x.dtype else w1.dtype)
    return _through(run, order, norm, activation, *checked)


_plans = _plan.Plans(_plan_of)


def merge_mlp_packed(
    x: torch.Tensor,
    grids: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    *,
    merge_size: int = 2,
    order: str = "block",
    norm: str = "layernorm",
    norm_position: str = "pre",
    eps: float = 1e-6,
    activation: str = "gelu",
):
    """``merge_mlp`` over a packed batch of images with their own grids (Qwen2-VL's ``grid_thw``).

    Args:
        x: ``(total_tokens, C)``, the images' tokens back to back: each image's merge blocks
            consecutive (``order="block"``, what Qwen's vision towers emit) or its grid row-major
            (``order="grid"``).
        grids: int tensor ``(num_images, 2)`` ``(H, W)`` or ``(num_images, 3)`` ``(T, H, W)``, in
            patches; H and W multiples of ``merge_size``. Read on the host once (pass a CPU tensor
            to avoid a device sync).
        the rest: as ``merge_mlp``.
    Returns:
        ``(y, cu_seqlens)``: ``y`` ``(total_tokens / S², out)``, each image's merged rows back to
        back; ``cu_seqlens`` int32 ``(num_images + 1,)`` offsets of each image's rows in ``y``.
        One statistics launch and one fused GEMM launch for the whole batch.
    """
    try:  # 16-bit tokens before a norm kept in float32 (``tokens_for_norm``); the checks name a non-tensor
        if norm_weight is not None and norm_weight.dtype is not x.dtype or norm_bias is not None and norm_bias.dtype is not x.dtype:
            x = tokens_for_norm(x, norm_weight, norm_bias, w1)
    except AttributeError:
        pass
    args = (x, grids, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, order, norm, norm_position, eps, activation)
    plan = _packed_plans.get((grids,), *args)
    if plan is None:
        kwargs = {"merge_size": merge_size, "order": order, "norm": norm, "norm_position": norm_position, "eps": eps,
                  "activation": activation}
        out = _autocast.plain_call(merge_mlp_packed, "merge_mlp", args[:8], kwargs, norm_args=4)  # x, grids, the norm's
        if out is not _autocast.NOT_PLAIN:
            return out
        plan = (deco.merge_mlp, *_packed_checked(*args))
    run, geometry, merge, pre, eps, keep, cu_seqlens = plan
    geometry, cu_seqlens = device_tables(geometry, cu_seqlens, x.device)
    y = run(x[None], norm_weight, norm_bias, w1, b1, w2, b2, geometry, [], merge, order, norm, pre, eps, activation, keep)[0]
    return y[0], cu_seqlens


def _packed_checked(x, grids, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, order, norm, norm_position, eps, activation):
    """Every check of ``merge_mlp_packed``: (the geometry table (``order="grid"``) or None, merge
    size, whether the norm is pre-merge, eps as a float, whether autograd needs the residual, cu_seqlens)."""
    _validate.tensor("x", x, 2)
    merge, pre, eps = _check_params(x, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, norm, norm_position, eps, activation)
    _choice("order", order, ORDERS)
    g = _grid_table("grids", grids)
    for i, r in enumerate(g):
        if r[-2] % merge or r[-1] % merge:
            raise ValueError(f"grids[{i}] = {r}: H and W must be multiples of merge_size = {merge}")
    packing = Packing(g, [(*r[:-2], r[-2] // merge, r[-1] // merge) for r in g])
    if x.shape[0] != packing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but grids need sum(prod(grids)) = {packing.num_tokens}")
    keep = needs_residuals(x, norm_weight, norm_bias, w1, b1, w2, b2)
    return packing.geometry if order == "grid" else None, merge, pre, eps, keep, packing.cu_seqlens


def _packed_plan(x, grids, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, order, norm, norm_position, eps, activation):
    """A plain eager call's plan: (what runs it, then ``_packed_checked``'s answers)."""
    checked = _packed_checked(x, grids, norm_weight, norm_bias, w1, b1, w2, b2, merge_size, order, norm, norm_position, eps,
                              activation)
    geometry, merge, pre, eps, keep, _ = checked
    args = (x[None], norm_weight, norm_bias, w1, b1, w2, b2, device_geometry(geometry, x.device), [], merge, order, norm,
            pre, eps, activation, keep)
    return _plan.runner(deco.merge_mlp, _implementation, args, keep), *checked


_packed_plans = PackedPlans(_packed_plan)
