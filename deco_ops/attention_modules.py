"""Cross-attention ``nn.Module``s built on ``deco_ops.cross_attention``: a drop-in for
``nn.MultiheadAttention`` used as cross-attention, and the Q-Former / resampler compressor."""

from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _validate, _validate_attention
from ._checks import value_checks
from .attention import cross_attention
from .merge import check_eps
from .modules import check_parameter_dtype, not_scriptable


def _dropout(value) -> float:
    """A module's attention dropout probability, checked (a real number in [0, 1], numpy's too; not
    a bool): 1.0 too, as ``nn.MultiheadAttention`` takes it (``_dropped``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"dropout must be a float in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"dropout must be a float in [0, 1], got {value!r}")
    return float(value)


def _dropped(t: torch.Tensor | None, dropout_p: float) -> torch.Tensor | None:
    """``t`` (attention output or weights computed without dropout) as dropout with ``dropout_p``
    = 1 leaves it: every probability times 0, as ``F.dropout(p=1)`` drops them in
    ``nn.MultiheadAttention`` (NaN stays NaN; gradients are zeros, not absent). The kernels take
    dropout in [0, 1): a module runs p = 1 as no dropout, then this."""
    return t if t is None or dropout_p < 1.0 else t * 0.0


def _no_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool, average: bool) -> tuple:
    """(the (B, M, H, D) attention output, the weights or None) of a call with no query or no key
    (q (B, M, H, D), k and v (B, N, H, D), M or N = 0), which the kernels take neither of: the
    softmax and product as ``nn.MultiheadAttention`` computes them, PyTorch's ops on tensors of no
    element. The output is zeros (``out_proj``'s bias after it), the weights have no element, and
    the gradients reach the projections as zeros, not as None (optimizers step them, DDP sees them
    used)."""
    w = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1), -1)  # (B, H, M, N)
    o = (w @ v.transpose(1, 2)).transpose(1, 2)
    return o, ((w.mean(1) if average else w) if need_weights else None)


def _heads(embed_dim, num_heads) -> tuple[int, int, int]:
    """(embed_dim, num_heads, head_dim) as Python ints, checked: a head dim the kernels take."""
    embed_dim, num_heads = _validate.positive_int("embed_dim", embed_dim), _validate.positive_int("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    head_dim = embed_dim // num_heads
    if head_dim > _validate_attention.MAX_HEAD_DIM:
        raise ValueError(f"embed_dim {embed_dim} / num_heads {num_heads} = head dim {head_dim}; deco_ops.cross_attention "
                         f"takes head dims up to {_validate_attention.MAX_HEAD_DIM}: use more heads")
    return embed_dim, num_heads, head_dim


def _as_stored(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s tensor ``name`` as stored, for its dtype and device: a parametrized one's
    original, where reading the attribute computes the parametrization (a spectral norm steps its
    power iteration) once more per forward than the module replaced does."""
    parametrizations = module.__dict__.get("_modules", {}).get("parametrizations")
    if parametrizations is not None and name in parametrizations:
        original = getattr(parametrizations[name], "original", None)  # none where it has several (original0, ...)
        if original is not None:
            return original
    return getattr(module, name)


def _check_against_parameters(parameter: torch.Tensor, **inputs: torch.Tensor) -> None:
    """Inputs the module's projections can take with ``parameter`` (one of its weights): floating,
    in its dtype once autocast has cast both (bf16 tokens into an fp32 module inside
    ``torch.autocast``, as ``nn.MultiheadAttention`` takes them), on its device; named here, not by
    ``F.linear``'s RuntimeError."""
    for name, t in inputs.items():
        if t.dtype is not parameter.dtype:
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if _validate.dtype_under_autocast(t) is not _validate.dtype_under_autocast(parameter):
                raise TypeError(f"{name} has dtype {t.dtype} but the module's parameters have {parameter.dtype}; "
                                "cast one to the other (module.to(dtype)) or run inside torch.autocast")
        if t.device != parameter.device:
            raise ValueError(f"{name} is on {t.device} but the module's parameters are on {parameter.device}")


def _hf_hint(key_padding_mask: torch.Tensor) -> str:
    return (
        "key_padding_mask uses PyTorch's convention (True or -inf = ignore this key); a Hugging Face "
        "attention mask (1/True = keep) must be inverted first: key_padding_mask = ~hf_mask.bool()"
        if key_padding_mask.dtype == torch.bool
        else "a float key_padding_mask is added to the scores: 0 keeps a key, -inf ignores it"
    )


def _reads_values(mask: torch.Tensor) -> bool:
    """Whether checks may read a mask's values on the host: never while ``torch.compile`` traces
    (they would be data-dependent) or inside a ``torch.func`` transform (a vmapped mask has no one
    value per element), elsewhere as ``deco_ops._checks.value_checks`` says."""
    return (not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(mask)
            and value_checks(mask.device))


def _check_mask_kind(name: str, mask) -> None:
    """An ``nn.MultiheadAttention`` mask is a bool or float tensor."""
    if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool or float tensor (True or -inf = not allowed), got {got}")


def _check_key_padding_mask(key_padding_mask, batch: int | None, keys: int, device: torch.device) -> None:
    """A module's ``key_padding_mask``: a bool or float tensor of shape (``batch``, ``keys``), or
    (``keys``,) for unbatched inputs (``batch`` None), on the inputs' ``device``; checked before
    anything reads it."""
    _check_mask_kind("key_padding_mask", key_padding_mask)
    shape = (keys,) if batch is None else (batch, keys)
    if tuple(key_padding_mask.shape) != shape:
        what = "unbatched inputs take a key_padding_mask of shape (keys,)" if batch is None else "key_padding_mask must have shape (batch, keys)"
        raise ValueError(f"{what} = {shape}, got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but the inputs are on {device}")


def _additive(name: str, mask: torch.Tensor) -> torch.Tensor:
    """An ``nn.MultiheadAttention`` mask as an additive float mask: bool True (= not allowed)
    becomes -inf, a float mask is added as it is."""
    _check_mask_kind(name, mask)
    if mask.dtype != torch.bool:
        return mask
    return torch.where(mask, float("-inf"), 0.0)  # not in place: a vmapped mask fills a batched result


def _attention_learning_the_bias(q, k, v, kv_lens, bias, dropout_p: float) -> torch.Tensor:
    """(B, M, H, D) attention by ``F.scaled_dot_product_attention``, which differentiates ``bias``
    (as ``CrossAttention`` runs ``F.multi_head_attention_forward`` for such a mask), with
    ``kv_lens`` (clamped into [0, N], as the kernels take it) as -inf past each row's keys; the
    bias in the queries' dtype, as SDPA takes it (an fp32 bias with bf16 projections under
    autocast)."""
    B, N = k.shape[:2]
    if kv_lens is not None:
        past = torch.arange(N, device=k.device) >= kv_lens.clamp(0, N)[:, None]
        bias = bias.masked_fill(past[:, None, None, :], float("-inf"))
    q = q.expand(B, -1, -1, -1)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
    return o.transpose(1, 2)


def _check_attn_mask(attn_mask, B: int, H: int, M: int, N: int, device: torch.device) -> None:
    """A module's ``attn_mask``: a bool or float tensor of shape (``M``, ``N``) or (``B`` * ``H``,
    ``M``, ``N``), as ``nn.MultiheadAttention`` takes it, on the inputs' ``device``."""
    _check_mask_kind("attn_mask", attn_mask)
    shape = tuple(attn_mask.shape)
    # == rather than ``in``: while torch.compile traces, ``in`` compares a static mask shape with
    # the symbolic sizes of a recompile as different objects (False), where == compares values
    if not (shape == (M, N) or shape == (B * H, M, N)):
        raise ValueError(
            f"attn_mask must have shape (queries, keys) = {(M, N)} or (batch * num_heads, queries, keys) = "
            f"{(B * H, M, N)}, got {shape}"
        )
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but the inputs are on {device}")


def mha_masks_to_bias(key_padding_mask, attn_mask, B: int, H: int, M: int, N: int) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s ``key_padding_mask`` (B, N) and ``attn_mask`` ((M, N) or
    (B * H, M, N)), bool (True = not allowed) or float (added), as one additive mask of shape
    (B, 1 or H, 1 or M, N) for ``deco_ops.cross_attention``'s ``attn_mask``: any pattern (holes,
    left padding), never read on the host. None without masks. Both masks are checked by the
    caller (``_check_key_padding_mask``, ``_check_attn_mask``)."""
    terms = []
    if key_padding_mask is not None:
        terms.append(_additive("key_padding_mask", key_padding_mask)[:, None, None, :])
    if attn_mask is not None:
        am = _additive("attn_mask", attn_mask)
        terms.append(am[None, None] if am.dim() == 2 else am.view(B, H, M, N))
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _warn_if_every_key_ignored(key_padding_mask: torch.Tensor) -> None:
    """A bool row of all True ignores every key: what a Hugging Face keep-mask (True = keep) of an
    unpadded row looks like when passed uninverted."""
    if not key_padding_mask.shape[-1]:  # no key to ignore (nn.MultiheadAttention's empty softmax: ``_no_attention``)
        return
    rows = torch.nonzero(key_padding_mask.reshape(-1, key_padding_mask.shape[-1]).all(-1)).flatten().tolist()
    if rows:
        warnings.warn(
            f"key_padding_mask ignores every key of batch rows {rows} (their output is NaN with need_weights=True, "
            f"out_proj's bias without, as in nn.MultiheadAttention). {_hf_hint(key_padding_mask)}",
            stacklevel=5,  # here, forward, Module's two call frames, then the caller's line
        )


class CrossAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention``: the same constructor (positional order and
    defaults), ``forward`` signature, return value, parameters and ``state_dict`` keys
    (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``, ``in_proj_bias``,
    ``bias_k``/``bias_v``, ``out_proj.*``), so ``load_state_dict`` works both ways.

    Every call runs ``deco_ops.cross_attention``'s fused kernels, ``nn.MultiheadAttention``'s default
    call included:

    * ``key_padding_mask`` (B, N) and ``attn_mask`` ((L, S) or (B * num_heads, L, S)), bool (True =
      not allowed) or float (added to the scores), any pattern (holes, left padding), become one
      additive mask computed in the kernels (``mha_masks_to_bias``); nothing is read on the host, so
      results are the same with value checks on or off.
    * ``need_weights=True`` (the default) returns the attention weights computed from the kernel's
      log-sum-exp, head-averaged (B, L, S) or per head (B, num_heads, L, S) with
      ``average_attn_weights=False``, after dropout as ``nn.MultiheadAttention`` returns them;
      they carry gradients to the inputs and parameters.
    * ``add_bias_kv`` and ``add_zero_attn`` append their keys after the given ones, as
      ``nn.MultiheadAttention`` does (its masks get zero columns for them).
    * A query whose keys are all masked gives what ``nn.MultiheadAttention`` gives: NaN output and
      weights with ``need_weights=True``, zero attention (``out_proj``'s bias) without.
    * Not as ``nn.MultiheadAttention``: a query whose every key carries a finite float mask below
      about -1e8 (``torch.finfo(dtype).min``) gets the right output (the uniform average), but with
      ``need_weights=True`` weights that sum to its key count and gradients that many times MHA's
      (the saved log-sum-exp, one fp32 number, cannot hold log(n) beside 1e30; MHA with
      ``need_weights=False`` shares this through SDPA). Mask such keys with ``-inf`` or a bool
      mask: docs/masks.md.
    * Shapes and settings MHA takes that the kernels do not: no query or no key (L or S = 0: zero
      attention, ``out_proj``'s bias, and weights of no element), and ``dropout=1.0`` (every
      probability times 0 in training, as ``F.dropout(p=1)``).
    * ``is_causal`` is a hint that ``attn_mask`` is causal; without ``attn_mask`` it raises. As in
      ``nn.MultiheadAttention``, with ``need_weights=False`` and no ``key_padding_mask`` the causal
      mask SDPA's ``is_causal`` builds (top-left aligned) replaces ``attn_mask``; otherwise
      ``attn_mask`` is used.

    The one call that runs PyTorch's ``F.multi_head_attention_forward`` instead: a mask that
    requires grad (a learned additive bias), since the kernels give masks no gradient.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_parameter_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        embed_dim, num_heads, self.head_dim = _heads(embed_dim, num_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else _validate.positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _validate.positive_int("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout = _dropout(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # nn.MultiheadAttention's class: quantize_dynamic({nn.Linear}) skips it (its forward passes
        # out_proj.weight to the functional op, which a quantized Linear has not)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    __prepare_scriptable__ = not_scriptable

    def _reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Inputs and masks as ``nn.MultiheadAttention`` takes them, for both paths (the kernels' and
        PyTorch's for a mask that requires grad); returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        layout = "(batch, tokens, features)" if self.batch_first else "(tokens, batch, features)"
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must all be batched {layout} or all unbatched (tokens, features), got "
                f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name} has {t.shape[-1]} features but the module expects {dim}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must have the same tokens and batch, got {tuple(key.shape)} and {tuple(value.shape)}")
        _check_against_parameters(_as_stored(self.out_proj, "weight"), query=query, key=key, value=value)
        batched = query.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if batched and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(f"query has batch {query.shape[batch_dim]} but key has {key.shape[batch_dim]} ({layout})")
        token_dim = 1 if batched and self.batch_first else 0
        queries, keys = query.shape[token_dim], key.shape[token_dim]
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, key.shape[batch_dim] if batched else None, keys, query.device)
        if attn_mask is not None:
            _check_attn_mask(attn_mask, key.shape[batch_dim] if batched else 1, self.num_heads, queries, keys, query.device)
        return batched

    # nn.TransformerEncoderLayer's inference fast path asks its ``self_attn`` to merge the masks
    # before it runs its own fused kernel on the layer's parameters (ours, under MHA's names); the
    # method reads ``num_heads`` only
    merge_masks = nn.MultiheadAttention.merge_masks

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            # nn.MultiheadAttention's warning (F._canonical_mask), here pointing at the caller's line
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both instead.",
                          stacklevel=4)
        if any(isinstance(m, torch.Tensor) and m.requires_grad for m in (key_padding_mask, attn_mask)):
            return self._pytorch_attention(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, batched)
        if is_causal and attn_mask is None:
            raise ValueError(
                "is_causal is a hint that attn_mask is the causal mask (nn.MultiheadAttention's contract): pass attn_mask too"
            )
        if key_padding_mask is not None and key_padding_mask.dtype == torch.bool and _reads_values(key_padding_mask):
            _warn_if_every_key_ignored(key_padding_mask)
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        causal = is_causal and key_padding_mask is None and not need_weights  # what nn.MultiheadAttention runs
        out, weights = self._fused_attention(
            query, key, value, key_padding_mask, None if causal else attn_mask, need_weights, average_attn_weights, causal)
        if not batched:
            return out.squeeze(0), (None if weights is None else weights.squeeze(0))
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _fused_attention(self, query, key, value, key_padding_mask, attn_mask, need_weights, average_attn_weights, causal):
        """Batch-first (B, L, E) inputs through ``deco_ops.cross_attention``: (out, weights or None).
        ``causal``: SDPA's top-left causal mask over every key, the extra ones included."""
        B, M, _ = query.shape
        N = key.shape[1]
        bias = mha_masks_to_bias(key_padding_mask, attn_mask, B, self.num_heads, M, N)  # raises before any work
        wq, wk, wv = self._projection_weights()
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq)
        k, v = F.linear(key, wk, bk), F.linear(value, wv, bv)
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.expand(B, 1, -1).to(k.dtype))
            extra_v.append(self.bias_v.expand(B, 1, -1).to(v.dtype))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros((B, 1, self.embed_dim)))
            extra_v.append(v.new_zeros((B, 1, self.embed_dim)))
        if extra_k:  # after the given keys, as nn.MultiheadAttention: the weights' columns line up
            k, v = torch.cat([k, *extra_k], 1), torch.cat([v, *extra_v], 1)
            bias = None if bias is None else F.pad(bias, (0, len(extra_k)))
        heads = (self.num_heads, self.head_dim)
        q, k, v = q.view(B, M, *heads), k.view(B, k.shape[1], *heads), v.view(B, v.shape[1], *heads)
        if not (M and k.shape[1]):
            o, weights = _no_attention(q, k, v, need_weights, average_attn_weights)
            return self.out_proj(o.reshape(B, M, self.embed_dim)), weights
        if causal:
            allowed = torch.ones(M, k.shape[1], dtype=torch.bool, device=q.device).tril()
            bias = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))[None, None]
        dropout = self.dropout if self.training else 0.0
        result = cross_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout if dropout < 1.0 else 0.0, need_weights=need_weights,
            average_attn_weights=average_attn_weights,
        )
        del q, k, v  # before out_proj's output exists, as nn.MultiheadAttention frees its projections
        o, weights = result if need_weights else (result, None)
        o, weights = _dropped(o, dropout), _dropped(weights, dropout)
        if weights is not None and bias is not None:
            # Queries without any allowed key, as nn.MultiheadAttention gives them: NaN (output and
            # weights) where it returns weights (its softmax of a row of -inf); without weights its
            # SDPA call attends to nothing, zeros before out_proj, as the kernels do.
            dead = (bias == float("-inf")).all(-1)  # (B, 1 or H, 1 or M)
            o = torch.where(dead.transpose(1, 2)[..., None], float("nan"), o)
            dead_w = dead.any(1) if average_attn_weights else dead
            weights = torch.where(dead_w[..., None], float("nan"), weights)
        return self.out_proj(o.reshape(B, M, self.embed_dim)), weights

    def _pytorch_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal, batched):
        """``nn.MultiheadAttention.forward``'s computation on these parameters, for masks that require
        grad (the kernels give masks no gradient)."""
        if batched and self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # additive masks in the query's dtype, as nn.MultiheadAttention.forward hands them on: the
        # functional's matmuls refuse another float dtype (float64, fp16 beside fp32), which the
        # kernels take, and it would warn about a bool beside a float mask a second time
        if key_padding_mask is not None:
            key_padding_mask = _additive("key_padding_mask", key_padding_mask).to(query.dtype)
        if attn_mask is not None:
            attn_mask = _additive("attn_mask", attn_mask).to(query.dtype)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
            q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
        if batched and self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


class QueryResampler(nn.Module):
    """The Q-Former / resampler compressor: ``num_queries`` learned queries cross-attend once to
    the visual tokens.

        q = q_proj(LayerNorm_q(queries))          (1, num_queries, H, D): shared, never expanded
        k, v = k_proj(LayerNorm_kv(x)), v_proj(LayerNorm_kv(x))
        out = out_proj(cross_attention(q, k, v, kv_lens))

    ``forward(x, kv_lens=None, key_padding_mask=None)`` takes ``(B, N, kv_dim)`` and returns
    ``(B, num_queries, embed_dim)``, the same token budget interface as ``DeCoProjector``'s output.
    Padding: ``kv_lens`` (B,) (right padding, the padded keys never read) or ``key_padding_mask``
    (B, N) as ``nn.MultiheadAttention`` takes it (bool True = ignore, or float added to the scores),
    any pattern, computed in the kernels. A batch row with every key ignored gives
    ``out_proj(0)`` (``deco_ops.cross_attention``'s zero row).
    """

    def __init__(
        self,
        num_queries: int,
        embed_dim: int,
        kv_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_parameter_dtype(dtype)
        factory = {"device": device, "dtype": dtype}
        self.num_queries = _validate.positive_int("num_queries", num_queries)
        self.kv_dim = _validate.positive_int("kv_dim", kv_dim)
        embed_dim, num_heads, self.head_dim = _heads(embed_dim, num_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.dropout = _dropout(dropout)
        eps = check_eps(eps)  # here, not as NaN (eps < 0) or layer_norm's TypeError at the first forward
        self.queries = nn.Parameter(torch.empty((num_queries, embed_dim), **factory))
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps, **factory)
        self.ln_kv = nn.LayerNorm(kv_dim, eps=eps, **factory)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.trunc_normal_(self.queries, std=0.02)

    __prepare_scriptable__ = not_scriptable

    def forward(self, x: torch.Tensor, kv_lens: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        _validate.tensor("x", x, 3)
        if x.shape[-1] != self.kv_dim:
            raise ValueError(f"x must be (batch, tokens, kv_dim={self.kv_dim}), got {tuple(x.shape)}")
        _check_against_parameters(_as_stored(self, "queries"), x=x)
        B, N, _ = x.shape
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, B, N, x.device)
        bias = mha_masks_to_bias(key_padding_mask, None, B, self.num_heads, self.num_queries, N)
        q = self.q_proj(self.ln_q(self.queries)).view(1, self.num_queries, self.num_heads, self.head_dim)
        kv = self.ln_kv(x)
        k = self.k_proj(kv).view(B, N, self.num_heads, self.head_dim)
        v = self.v_proj(kv).view(B, N, self.num_heads, self.head_dim)
        dropout = self.dropout if self.training else 0.0
        kernel_dropout = dropout if dropout < 1.0 else 0.0  # p = 1: ``_dropped``
        if not N:
            _validate_attention.kv_lens(kv_lens, B, x.device)  # as cross_attention checks it, though no key is left to read
            o, _ = _no_attention(q.expand(B, -1, -1, -1), k, v, False, True)
        elif bias is not None and bias.requires_grad:  # a learned mask: the kernels give masks no gradient
            o = _attention_learning_the_bias(q, k, v, _validate_attention.kv_lens(kv_lens, B, x.device), bias, kernel_dropout)
        else:
            o = cross_attention(q, k, v, kv_lens=kv_lens, attn_mask=bias, dropout_p=kernel_dropout)
        return self.out_proj(_dropped(o, dropout).reshape(B, self.num_queries, self.embed_dim))
