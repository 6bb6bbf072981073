"""Cross-attention ``nn.Module``s built on ``deco_ops.cross_attention``: a drop-in for
``nn.MultiheadAttention`` used as cross-attention, and the Q-Former / resampler compressor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import cross_attention


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _head_dim(embed_dim: int, num_heads: int) -> int:
    _positive("embed_dim", embed_dim)
    _positive("num_heads", num_heads)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
    return embed_dim // num_heads


def padding_mask_to_lengths(key_padding_mask: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """``nn.MultiheadAttention``'s bool ``key_padding_mask`` (B, N), True = ignore, as kv_lens (B,).

    Only right padding is representable (the valid keys of every row are a prefix): any other
    mask raises ValueError (checked eagerly; skipped while ``torch.compile`` traces). For keys
    with holes, gather the valid keys to the front (or pack them and call ``cross_attention`` with
    ``cu_seqlens_k``) first.
    """
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask must be a bool tensor (True = ignore this key); additive float masks are not supported")
    if tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must have shape (batch, keys) = {(B, N)}, got {tuple(key_padding_mask.shape)}")
    valid = ~key_padding_mask
    lengths = valid.sum(1, dtype=torch.int32)
    if not torch.compiler.is_compiling():
        prefix = torch.arange(N, device=valid.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, valid):
            raise ValueError(
                "key_padding_mask must mark a contiguous prefix of valid keys per row (right padding: "
                "False...False True...True); move the valid keys to the front first"
            )
    return lengths


class CrossAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`` used as
    cross-attention, running ``deco_ops.cross_attention``.

    Same parameters and ``state_dict`` keys as ``nn.MultiheadAttention``: ``in_proj_weight``
    (3E, E) when ``kdim == vdim == embed_dim``, else ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight``; ``in_proj_bias`` (3E,) and ``out_proj.weight``/``out_proj.bias``. So
    ``load_state_dict(mha.state_dict())`` works both ways.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False)`` returns
    ``(attn_output, None)`` like ``nn.MultiheadAttention(..., need_weights=False)``.
    ``key_padding_mask`` is bool (B, N), True = ignore, and must be right padding (see
    ``padding_mask_to_lengths``). A row whose keys are all masked gives ``out_proj.bias`` (the
    attention output is zero) where ``nn.MultiheadAttention`` gives NaN. ``need_weights=True``
    is not supported: the attention matrix is never formed.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.head_dim = _head_dim(embed_dim, num_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else _positive("kdim", kdim)
        self.vdim = embed_dim if vdim is None else _positive("vdim", vdim)
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
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
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

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

    def _projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("CrossAttention never forms the attention matrix; call it with need_weights=False")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3D (batch, tokens, features) tensor, got {getattr(t, 'shape', t)!r}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, M, _ = query.shape
        N = key.shape[1]
        wq, wk, wv = self._projection_weights()
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, wq, bq).view(B, M, self.num_heads, self.head_dim)
        k = F.linear(key, wk, bk).view(key.shape[0], N, self.num_heads, self.head_dim)
        v = F.linear(value, wv, bv).view(value.shape[0], value.shape[1], self.num_heads, self.head_dim)
        kv_lens = None if key_padding_mask is None else padding_mask_to_lengths(key_padding_mask, key.shape[0], N)
        o = cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(o.reshape(B, M, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


class QueryResampler(nn.Module):
    """The Q-Former / resampler compressor: ``num_queries`` learned queries cross-attend once to
    the visual tokens.

        q = q_proj(LayerNorm_q(queries))          (1, num_queries, H, D): shared, never expanded
        k, v = k_proj(LayerNorm_kv(x)), v_proj(LayerNorm_kv(x))
        out = out_proj(cross_attention(q, k, v, kv_lens))

    ``forward(x, kv_lens=None)`` takes ``(B, N, kv_dim)`` and returns ``(B, num_queries, embed_dim)``,
    the same token budget interface as ``DeCoProjector``'s output.
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
        factory = {"device": device, "dtype": dtype}
        self.num_queries = _positive("num_queries", num_queries)
        self.kv_dim = _positive("kv_dim", kv_dim)
        self.head_dim = _head_dim(embed_dim, num_heads)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.queries = nn.Parameter(torch.empty((num_queries, embed_dim), **factory))
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps, **factory)
        self.ln_kv = nn.LayerNorm(kv_dim, eps=eps, **factory)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.trunc_normal_(self.queries, std=0.02)

    def forward(self, x: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.kv_dim:
            raise ValueError(f"x must be (batch, tokens, kv_dim={self.kv_dim}), got {getattr(x, 'shape', x)!r}")
        B, N, _ = x.shape
        q = self.q_proj(self.ln_q(self.queries)).view(1, self.num_queries, self.num_heads, self.head_dim)
        kv = self.ln_kv(x)
        k = self.k_proj(kv).view(B, N, self.num_heads, self.head_dim)
        v = self.v_proj(kv).view(B, N, self.num_heads, self.head_dim)
        o = cross_attention(q, k, v, kv_lens=kv_lens, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.reshape(B, self.num_queries, self.embed_dim))
