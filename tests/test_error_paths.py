"""Every error path: each ``raise`` statement in the modules listed in COVERED is triggered by a
case of CASES, with its exception type and message checked, before any kernel is launched.

``test_every_raise_has_a_case`` walks the covered modules' source (AST) for ``raise`` statements,
runs every case, and finds which statement raised from the traceback (line numbers are read from
the current source, so edits elsewhere never break it). A raise added to a covered module without
a case fails it, naming the file, function and line. Modules added later (and other engineers'
new files) are not covered until they are listed here with their cases.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import traceback
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import deco_ops
from deco_ops import _backend, _checks, _setting, aot
from harness import Calls

PACKAGE = Path(os.path.realpath(deco_ops.__file__)).parent

COVERED = (
    "_backend", "_checks", "_setting", "_validate", "_validate_attention", "aot", "attention", "attention_modules",
    "mlp_pool", "modules", "packed", "pooling", "projector", "reference", "reference_attention",
)


# ----------------------------------------------------------------------------------------------
# inputs: valid ones, and the single change each case makes


def mlp(**change):
    args = {"x": torch.randn(2, 16, 4), "w1": torch.randn(8, 4), "b1": torch.randn(8), "w2": torch.randn(5, 8),
            "b2": torch.randn(5), "grid": (4, 4), "out_grid": (2, 2), "activation": "gelu"} | change
    return deco_ops.pool_mlp(args.pop("x"), args.pop("w1"), args.pop("b1"), args.pop("w2"), args.pop("b2"), **args)


def packed(op=deco_ops.adaptive_avg_pool_tokens_packed, **change):
    args = {"x": torch.randn(28, 4), "grids": torch.tensor([[4, 4], [3, 4]]), "stride": 2} | change
    return op(args.pop("x"), args.pop("grids"), **args)


def packed_mlp(**change):
    args = {"x": torch.randn(16, 4), "grids": torch.tensor([[4, 4]]), "w1": torch.randn(8, 4), "b1": None,
            "w2": torch.randn(5, 8), "b2": None, "stride": 2, "mode": "average"} | change
    positional = [args.pop(k) for k in ("x", "grids", "w1", "b1", "w2", "b2")]
    return deco_ops.pool_mlp_packed(*positional, **args)


def attention(**change):
    args = {"q": torch.randn(2, 4, 2, 16), "k": torch.randn(2, 9, 2, 16), "v": torch.randn(2, 9, 2, 16)} | change
    return deco_ops.cross_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def packed_keys(cu, dtype=torch.int32, **change):
    return attention(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16), cu_seqlens_k=torch.tensor(cu, dtype=dtype), **change)


def exported(fn, example):
    """``torch.export`` (non-strict) of a module whose forward is ``fn``."""
    return torch.export.export(Calls(fn), (example,), strict=False)


def hooked(module):
    """``module`` with a forward hook on its first Linear: it calls its Linears (``deco_ops._children``);
    its input width is still checked by name, before the pooling runs."""
    module.fc1.register_forward_hook(lambda _, args, out: out)
    return module


def cross_attention_module(mask=None, **change):
    args = {"query": torch.randn(1, 3, 16), "key": torch.randn(1, 4, 16), "value": torch.randn(1, 4, 16)} | change
    return deco_ops.CrossAttention(16, 1, batch_first=True)(**args, key_padding_mask=mask, need_weights=False)


def backward_without_residuals(op, *args):
    """A custom op run without its residuals (keep_residuals=False, need_lse=False), then
    differentiated (only deco_ops' own functions choose them, so this is a misuse of the raw op)."""
    leaves = [a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with deco_ops.use_backend("torch"):
        op(*leaves)[0].sum().backward()


def on_cpu(fn):
    with torch.device("cpu"):
        return fn()


def on_auto(fn):
    """``fn()`` on the default backend (meta tensors: the Triton backend has no kernels for them)."""
    with deco_ops.use_backend("auto"):
        return fn()


def under_autocast(fn):
    """``fn()`` inside a bf16 autocast region of the suite's device."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        return fn()


def use(backend):
    with deco_ops.use_backend(backend):
        pass


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
META = torch.device("meta")
NO_RESIDUALS = [torch.randn(16, 4), torch.randn(8, 4), None, torch.randn(5, 8), None]

# (id, fn(monkeypatch), exception, message regex), each run by run_case.
CASES = [
    # _backend
    ("backend-name", lambda mp: use("fast"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'fast'"),
    ("backend-env", lambda mp: (mp.setenv("DECO_OPS_BACKEND", "cuda"), mp.setattr(_setting, "_override", lambda what: None), _backend.selected()), ValueError,
     "DECO_OPS_BACKEND must be one of"),
    ("setting-name-taken", lambda mp: _setting.Setting("DECO_OPS_OTHER", ("auto",), "backend"), ValueError,
     "a setting named 'backend' exists already"),
    ("backend-no-interpreter", lambda mp: (mp.setattr(_backend, "interpreting", lambda: False), on_cpu(mlp)), RuntimeError,
     "DECO_OPS_BACKEND=triton on CPU tensors needs Triton's interpreter"),
    ("backend-no-kernels", lambda mp: _backend.use_triton(META), RuntimeError, "no kernels for device meta"),
    # _checks
    ("checks-env", lambda mp: (mp.setenv("DECO_OPS_CHECKS", "yes"), _checks.value_checks(torch.device("cpu"))), ValueError,
     "DECO_OPS_CHECKS must be 0 or 1, got 'yes'"),
    ("checks-env-word", lambda mp: (mp.setenv("DECO_OPS_CHECKS", "true"), _checks.value_checks(torch.device("cpu"))), ValueError,
     "DECO_OPS_CHECKS must be 0 or 1, got 'true'"),
    # _validate, through pool_mlp
    ("not-a-tensor", lambda mp: mlp(x=[[1.0]]), TypeError, "x must be a torch.Tensor, got list"),
    ("layout", lambda mp: mlp(w1=torch.randn(8, 4).to_sparse()), TypeError, "w1 must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"),
    ("nested", lambda mp: mlp(x=torch.nested.nested_tensor([torch.randn(16, 4)] * 2)), TypeError,
     r"x must be a dense \(strided\) tensor, got a nested tensor"),
    ("rank", lambda mp: mlp(x=torch.randn(2, 16)), ValueError, r"x must have 3 dimensions, got shape \(2, 16\)"),
    ("rank-above", lambda mp: mlp(x=torch.randn(2, 16, 1, 4)), ValueError, r"x must have 3 dimensions, got shape \(2, 16, 1, 4\)"),
    ("dtype", lambda mp: mlp(x=torch.randn(2, 16, 4, dtype=torch.float64)), TypeError,
     "x has dtype torch.float64; supported here: float16, bfloat16, float32"),
    ("mixed-dtype", lambda mp: mlp(w1=torch.randn(8, 4).half()), TypeError,
     "w1 has dtype torch.float16 but x has torch.float32; cast them to one dtype"),
    ("mixed-dtype-last", lambda mp: mlp(b2=torch.randn(5).half()), TypeError,
     "b2 has dtype torch.float16 but x has torch.float32; cast them to one dtype"),
    ("mixed-device", lambda mp: mlp(w2=torch.randn(5, 8, device=META)), ValueError, "w2 is on meta but x is on (cpu|cuda)"),
    ("mixed-device-bias", lambda mp: mlp(b1=torch.randn(8, device=META)), ValueError, "b1 is on meta but x is on (cpu|cuda)"),
    ("mixed-device-autocast", lambda mp: under_autocast(lambda: mlp(w2=torch.randn(5, 8, device=META))), ValueError,
     "w2 is on meta but x is on (cpu|cuda)"),
    ("grid-type", lambda mp: mlp(grid=torch.tensor([4, 4])), TypeError, "grid must be a tuple of 2 or 3 ints"),
    ("grid-rank", lambda mp: mlp(grid=(16,)), ValueError, r"grid must have 2 \(H, W\) or 3 \(T, H, W\) entries, got \(16,\)"),
    ("grid-int", lambda mp: mlp(grid=(4.0, 4)), TypeError, r"grid entries must be ints, got \(4.0, 4\)"),
    ("grid-bool", lambda mp: mlp(out_grid=(True, 2)), TypeError, "out_grid entries must be ints"),
    ("out-grid-zero", lambda mp: mlp(out_grid=(0, 2)), ValueError, r"out_grid entries must be >= 1, got \(0, 2\)"),
    ("out-grid-huge", lambda mp: mlp(out_grid=(2**16, 2**15)), ValueError,
     r"out_grid \(65536, 32768\) has 2147483648 positions; at most 2\*\*31 - 1 per image"),
    ("grid-ranks-differ", lambda mp: mlp(out_grid=(2, 2, 1)), ValueError,
     r"out_grid \(2, 2, 1\) must have as many entries as grid \(4, 4\)"),
    ("tokens", lambda mp: mlp(x=torch.randn(2, 17, 4)), ValueError,
     r"x has 17 tokens but grid \(4, 4\) needs 16; .*num_prefix_tokens"),
    ("in-features", lambda mp: mlp(w1=torch.randn(8, 3)), ValueError,
     r"w1 has shape \(8, 3\): its in_features 3 must equal x.shape\[-1\] = 4"),
    ("hidden-features", lambda mp: mlp(w2=torch.randn(5, 7)), ValueError, r"w2 has shape \(5, 7\): its in_features 7 must equal w1"),
    ("bias", lambda mp: mlp(b1=torch.randn(7)), ValueError, r"b1 has shape \(7,\) but w1 has 8 output features"),
    ("bias-rank", lambda mp: mlp(b1=torch.randn(8, 1)), ValueError, r"b1 must have 1 dimensions, got shape \(8, 1\)"),
    ("activation", lambda mp: mlp(activation="relu"), ValueError, r"activation must be one of \('gelu', .*'silu'.*\), got 'relu'"),
    # _validate_attention, through cross_attention
    ("k-layout", lambda mp: attention(k=torch.randn(2, 9, 32)), ValueError, r"k must be \(B, N, H, D\), got shape \(2, 9, 32\)"),
    ("kv-shapes", lambda mp: attention(v=torch.randn(2, 8, 2, 16)), ValueError, "k and v must have the same shape"),
    ("heads", lambda mp: attention(q=torch.randn(2, 4, 3, 16)), ValueError, "k/v have 2 heads but q has 3"),
    ("head-dim-mismatch", lambda mp: attention(q=torch.randn(2, 4, 2, 8)), ValueError, "k/v have head dim 16 but q has 8"),
    ("v-dtype", lambda mp: attention(v=torch.randn(2, 9, 2, 16, dtype=torch.float16)), TypeError,
     "v has dtype torch.float16 but q has torch.float32"),
    ("v-device", lambda mp: attention(v=torch.randn(2, 9, 2, 16, device=META)), ValueError, "v is on meta but q is on (cpu|cuda)"),
    ("head-dim-range", lambda mp: attention(q=torch.randn(1, 4, 1, 300), k=torch.randn(1, 9, 1, 300), v=torch.randn(1, 9, 1, 300)),
     ValueError, r"head dim must be in \[1, 256\]"),
    ("no-query", lambda mp: attention(q=torch.randn(2, 0, 2, 16)), ValueError, "q must have at least one query"),
    ("no-head", lambda mp: attention(q=torch.randn(2, 4, 0, 16), k=torch.randn(2, 9, 0, 16), v=torch.randn(2, 9, 0, 16)),
     ValueError, "q must have at least one head"),
    ("no-key", lambda mp: attention(k=torch.randn(2, 0, 2, 16), v=torch.randn(2, 0, 2, 16)), ValueError,
     "k/v must have at least one key"),
    ("q-batch", lambda mp: attention(q=torch.randn(3, 4, 2, 16)), ValueError,
     r"q has batch 3; it must be 1 \(queries shared by the batch\) or the key batch 2"),
    ("kv-lens-dtype", lambda mp: attention(kv_lens=torch.tensor([9.0, 1.0])), TypeError, "kv_lens must be int32 or int64"),
    ("kv-lens-batch", lambda mp: attention(kv_lens=torch.tensor([9, 9, 9])), ValueError, "kv_lens has 3 entries but the batch is 2"),
    ("kv-lens-device", lambda mp: attention(kv_lens=torch.tensor([1, 1], device=META)), ValueError, "kv_lens is on meta but q is on (cpu|cuda)"),
    ("attn-mask-shape", lambda mp: attention(attn_mask=torch.zeros(2, 1, 4, 8)), ValueError,
     r"attn_mask of shape \(2, 1, 4, 8\) does not broadcast to \(B, H, M, N\) = \(2, 2, 4, 9\)"),
    ("attn-mask-dtype", lambda mp: attention(attn_mask=torch.zeros(4, 9, dtype=torch.int64)), TypeError,
     r"attn_mask must be bool \(True = attend\) or floating \(added to the scores\), got torch.int64"),
    ("attn-mask-device", lambda mp: attention(attn_mask=torch.zeros(4, 9, device=META)), ValueError,
     "attn_mask is on meta but q is on (cpu|cuda)"),
    ("attn-mask-grad", lambda mp: attention(attn_mask=torch.zeros(4, 9, requires_grad=True)), ValueError,
     "attn_mask requires grad: deco_ops.cross_attention computes no gradient"),
    ("cu-traced", lambda mp: torch.jit.trace(lambda q: packed_keys([0, 4, 9], q=q), (torch.randn(2, 4, 2, 16),)),
     RuntimeError, "torch.jit.trace cannot record cu_seqlens_k"),
    ("grids-traced", lambda mp: torch.jit.trace(lambda x: packed(x=x), (torch.randn(28, 4),)), RuntimeError,
     "torch.jit.trace cannot record grids"),
    ("cu-exported", lambda mp: exported(lambda q: packed_keys([0, 4, 9], q=q), torch.randn(2, 4, 2, 16)),
     RuntimeError, "torch.export cannot record cu_seqlens_k"),
    ("grids-exported", lambda mp: exported(lambda x: packed(x=x), torch.randn(28, 4)), RuntimeError,
     "torch.export cannot record grids"),
    ("cu-dtype", lambda mp: packed_keys([0, 4, 9], torch.int64), TypeError, "cu_seqlens_k must be int32"),
    ("cu-length", lambda mp: packed_keys([0]), ValueError, r"cu_seqlens_k must have B \+ 1 >= 2 entries, got 1"),
    ("cu-device", lambda mp: attention(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16),
                                       cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32, device=META)),
     ValueError, "cu_seqlens_k is on meta but q is on (cpu|cuda)"),
    ("cu-meta", lambda mp: on_auto(lambda: attention(
        q=torch.empty(2, 4, 2, 16, device=META), k=torch.empty(9, 2, 16, device=META), v=torch.empty(9, 2, 16, device=META),
        cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32, device=META))),
     ValueError, "cu_seqlens_k must hold its values .* got a tensor on the meta device"),
    ("cu-start", lambda mp: packed_keys([1, 4, 9]), ValueError, r"cu_seqlens_k must start at 0.*got \[1, 4, 9\]"),
    ("cu-decreasing", lambda mp: packed_keys([0, 5, 4]), ValueError, r"never decrease.*got \[0, 5, 4\]"),
    ("cu-past-total", lambda mp: packed_keys([0, 4, 10]), ValueError, r"end at most at total_N=9, got \[0, 4, 10\]"),
    ("scale-type", lambda mp: attention(softmax_scale="big"), TypeError, "softmax_scale must be a finite float or None, got 'big'"),
    ("scale-inf", lambda mp: attention(softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite float"),
    ("scale-minus-inf", lambda mp: attention(softmax_scale=float("-inf")), ValueError, "softmax_scale must be a finite float"),
    ("scale-bool", lambda mp: attention(softmax_scale=True), TypeError, "softmax_scale must be a finite float or None, got True"),
    ("dropout-p", lambda mp: attention(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    ("dropout-p-negative", lambda mp: attention(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\), got -0.1"),
    ("dropout-p-bool", lambda mp: attention(dropout_p=False), ValueError, r"dropout_p must be a float in \[0, 1\), got False"),
    ("generator", lambda mp: attention(dropout_p=0.1, generator=3), TypeError, "generator must be a torch.Generator or None, got int"),
    # attention
    ("lens-and-cu", lambda mp: packed_keys([0, 4, 9], kv_lens=torch.tensor([1, 1])), ValueError,
     "pass either kv_lens or cu_seqlens_k, not both"),
    # attention_modules
    ("positive", lambda mp: deco_ops.QueryResampler(0, 16, 8, 2), ValueError, "num_queries must be a positive int, got 0"),
    ("divisible", lambda mp: deco_ops.CrossAttention(30, 4), ValueError, "embed_dim 30 must be divisible by num_heads 4"),
    ("mha-vdim", lambda mp: deco_ops.CrossAttention(16, 2, vdim=0), ValueError, "vdim must be a positive int, got 0"),
    ("mha-num-heads", lambda mp: deco_ops.CrossAttention(16, 0), ValueError, "num_heads must be a positive int, got 0"),
    ("resampler-kv-dim", lambda mp: deco_ops.QueryResampler(4, 16, 0, 2), ValueError, "kv_dim must be a positive int, got 0"),
    ("mask-dtype", lambda mp: cross_attention_module(torch.zeros(1, 4, dtype=torch.int64)), TypeError,
     "key_padding_mask must be a bool or float tensor .*got torch.int64"),
    ("mask-shape", lambda mp: cross_attention_module(torch.zeros(1, 5, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(batch, keys\) = \(1, 4\)"),
    ("mha-mask-device", lambda mp: cross_attention_module(torch.zeros(1, 4, dtype=torch.bool, device="meta")), ValueError,
     "key_padding_mask is on meta but the inputs are on (cpu|cuda)"),
    ("mha-attn-mask-shape", lambda mp: cross_attention_module(attn_mask=torch.zeros(3, 5)), ValueError,
     r"attn_mask must have shape \(queries, keys\) = \(3, 4\) or \(batch \* num_heads, queries, keys\)"),
    ("mha-dropout", lambda mp: deco_ops.CrossAttention(16, 2, dropout=1.5), ValueError, r"dropout must be a float in \[0, 1\], got 1.5"),
    ("mha-not-a-tensor", lambda mp: cross_attention_module(query=[[0.0]]), TypeError, "query must be a torch.Tensor, got list"),
    ("mha-rank", lambda mp: cross_attention_module(query=torch.randn(3, 16)), ValueError,
     r"query, key and value must all be batched \(batch, tokens, features\) or all unbatched"),
    ("mha-features", lambda mp: cross_attention_module(query=torch.randn(1, 3, 8)), ValueError,
     "query has 8 features but the module expects 16"),
    ("mha-key-value", lambda mp: cross_attention_module(value=torch.randn(1, 5, 16)), ValueError,
     "key and value must have the same tokens and batch"),
    ("mha-batch", lambda mp: cross_attention_module(query=torch.randn(2, 3, 16)), ValueError, "query has batch 2 but key has 1"),
    ("mha-unbatched-mask", lambda mp: cross_attention_module(torch.zeros(1, 4, dtype=torch.bool), query=torch.randn(3, 16),
                                                             key=torch.randn(4, 16), value=torch.randn(4, 16)),
     ValueError, r"unbatched inputs take a key_padding_mask of shape \(keys,\)"),
    ("mha-is-causal", lambda mp: deco_ops.CrossAttention(16, 1)(torch.randn(3, 1, 16), torch.randn(4, 1, 16), torch.randn(4, 1, 16),
                                                                need_weights=False, is_causal=True),
     ValueError, "is_causal is a hint that attn_mask is the causal mask"),
    ("resampler-learned-mask-lens", lambda mp: deco_ops.QueryResampler(4, 16, 8, 2)(
        torch.randn(2, 5, 8), kv_lens=torch.tensor([5.0, 3.0]), key_padding_mask=torch.zeros(2, 5, requires_grad=True)),
     TypeError, "kv_lens must be int32 or int64, got torch.float32"),
    ("resampler-dropout", lambda mp: deco_ops.QueryResampler(4, 16, 8, 2, dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\], got -0.1"),
    ("resampler-dropout-none", lambda mp: deco_ops.QueryResampler(4, 16, 8, 2, dropout=None), TypeError, r"dropout must be a float in \[0, 1\], got NoneType"),
    ("mha-dropout-bool", lambda mp: deco_ops.CrossAttention(16, 2, dropout=True), TypeError, r"dropout must be a float in \[0, 1\], got bool"),
    ("resampler-x-type", lambda mp: deco_ops.QueryResampler(4, 16, 24, 2)([[0.0]]), TypeError, "x must be a torch.Tensor, got list"),
    ("resampler-x", lambda mp: deco_ops.QueryResampler(4, 16, 24, 2)(torch.randn(1, 4, 16)), ValueError,
     r"x must be \(batch, tokens, kv_dim=24\)"),
    # modules
    ("in-features-module", lambda mp: deco_ops.DeCoProjector(0, 4), ValueError, "in_features must be a positive int, got 0"),
    ("out-features-module", lambda mp: deco_ops.DeCoProjector(4, 0), ValueError, "out_features must be a positive int, got 0"),
    ("out-features-merger", lambda mp: deco_ops.PatchMergerProjector(4, 0), ValueError, "out_features must be a positive int, got 0"),
    ("merge-size-merger", lambda mp: deco_ops.PatchMergerProjector(4, 4, merge_size=0), ValueError,
     "merge_size must be a positive int, got 0"),
    ("in-features-merger", lambda mp: deco_ops.PatchMergerProjector(0, 4), ValueError, "in_features must be a positive int, got 0"),
    ("hidden-merger", lambda mp: deco_ops.PatchMergerProjector(4, 4, hidden_features=0), ValueError,
     "hidden_features must be a positive int, got 0"),
    ("hidden-module", lambda mp: deco_ops.DeCoProjector(4, 4, hidden_features=True), ValueError,
     "hidden_features must be a positive int, got True"),
    ("prefix-module", lambda mp: deco_ops.DeCoProjector(4, 4, num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be an int >= 0"),
    ("keys-module", lambda mp: deco_ops.DeCoProjector(4, 4, keys="timm"), ValueError, r"keys must be one of \('llava', 'hf'\)"),
    ("activation-module", lambda mp: deco_ops.DeCoProjector(4, 4, activation="relu"), ValueError,
     r"activation must be one of .* or a Hugging Face name .*got 'relu'"),
    ("order-module", lambda mp: deco_ops.DeCoProjector(4, 4, order="pool_then_mlp"), ValueError,
     r"order must be one of \('pool_mlp', 'mlp_pool'\)"),
    ("tokens-module", lambda mp: deco_ops.DeCoProjector(4, 5, grid=(4, 4), out_grid=(2, 2), num_prefix_tokens=1)(torch.randn(2, 16, 4)),
     ValueError, r"x has 16 tokens but DeCoProjector expects num_prefix_tokens \+ prod\(grid\) = 1 \+ 16 = 17"),
    # packed
    ("mode", lambda mp: packed_mlp(mode="area"), ValueError, r"mode must be one of \('average', 'bilinear'\), got 'area'"),
    ("packed-mlp-mixed-device", lambda mp: packed_mlp(w1=torch.randn(8, 4, device=META)), ValueError, "w1 is on meta but x is on (cpu|cuda)"),
    ("grids-type", lambda mp: packed(grids=[[4, 4]]), TypeError, "grids must be an int torch.Tensor of shape"),
    ("grids-dtype", lambda mp: packed(grids=torch.tensor([[4.0, 4.0]])), TypeError, "grids must be an integer tensor, got dtype torch.float32"),
    ("grids-shape", lambda mp: packed(grids=torch.tensor([4, 4])), ValueError,
     r"grids must have shape \(num_images, 2\) or \(num_images, 3\), got \(2,\)"),
    ("grids-empty", lambda mp: packed(grids=torch.zeros(0, 2, dtype=torch.int64)), ValueError, "grids must hold at least one image"),
    ("out-grids-columns", lambda mp: packed(stride=None, out_grids=torch.tensor([[2, 2, 1], [2, 2, 1]])), ValueError,
     "out_grids has 3 columns but grids has 2; they must match"),
    ("grids-entry", lambda mp: packed(grids=torch.tensor([[4, 4], [0, 4]])), ValueError, r"grids\[1\] = \(0, 4\): entries must be >= 1"),
    ("grids-meta", lambda mp: packed(grids=torch.tensor([[4, 4], [3, 4]], device="meta")), ValueError,
     "grids must hold its values .* got a tensor on the meta device"),
    ("stride-shape", lambda mp: packed(stride=(2, 2, 2)), ValueError, r"stride must be an int or a tuple of 2 ints"),
    ("stride-type", lambda mp: packed(stride=(2.0, 2)), TypeError, r"stride entries must be ints, got \(2.0, 2\)"),
    ("stride-zero", lambda mp: packed(stride=0), ValueError, "stride entries must be >= 1, got 0"),
    ("packed-limit", lambda mp: packed(grids=torch.tensor([[65536, 32768]]), stride=1), ValueError,
     "packed batches are limited to 2\\*\\*31 - 1 tokens and outputs: grids give 2147483648 tokens, out_grids 2147483648 outputs"),
    ("packed-out-limit", lambda mp: packed(x=torch.randn(1, 4), grids=torch.tensor([[1, 1]]), stride=None,
                                           out_grids=torch.tensor([[65536, 32768]])), ValueError,
     "packed batches are limited to 2\\*\\*31 - 1 tokens and outputs: grids give 1 tokens, out_grids 2147483648 outputs"),
    ("stride-or-out-grids", lambda mp: packed(stride=None), ValueError, "pass exactly one of out_grids .* or stride"),
    ("stride-and-out-grids", lambda mp: packed(out_grids=torch.tensor([[2, 2], [2, 2]])), ValueError, "pass exactly one of out_grids"),
    ("out-grids-rows", lambda mp: packed(stride=None, out_grids=torch.tensor([[2, 2]])), ValueError,
     "out_grids has 1 rows but grids has 2 images"),
    ("packed-tokens", lambda mp: packed(x=torch.randn(27, 4)), ValueError, r"x has 27 tokens but grids need sum\(prod\(grids\)\) = 28"),
    ("bilinear-tokens", lambda mp: deco_ops.bilinear_pool_tokens(torch.randn(2, 20, 4), (4, 4), (2, 2)), ValueError,
     r"x has 20 tokens but grid \(4, 4\) needs 16"),
    ("bilinear-dtype", lambda mp: deco_ops.bilinear_pool_tokens(torch.randint(0, 3, (2, 16, 4)), (4, 4), (2, 2)), TypeError,
     "x has dtype torch.int64; supported here: float16, bfloat16, float32"),
    # ops run without their residuals (keep_residuals=False, need_lse=False) differentiated
    ("pool-linear-residuals", lambda mp: backward_without_residuals(torch.ops.deco.pool_linear, torch.randn(1, 16, 4),
                                                                    torch.randn(8, 4), None, [4, 4], [2, 2], False),
     RuntimeError, "deco::pool_linear ran with keep_residuals=False; call deco_ops.pool_linear"),
    ("pool-mlp-residuals", lambda mp: backward_without_residuals(torch.ops.deco.pool_mlp, torch.randn(1, 16, 4), torch.randn(8, 4), None,
                                                                 torch.randn(5, 8), None, [4, 4], [2, 2], "gelu", False),
     RuntimeError, "deco::pool_mlp ran with keep_residuals=False"),
    ("pool-mlp-packed-residuals", lambda mp: backward_without_residuals(
        torch.ops.deco.pool_mlp_packed, *NO_RESIDUALS, deco_ops.packed.Packing([(4, 4)], [(2, 2)]).geometry, 4, "gelu", "average", False),
     RuntimeError, "deco::pool_mlp_packed ran with keep_residuals=False"),
    ("mlp-pool-residuals", lambda mp: backward_without_residuals(
        torch.ops.deco.mlp_pool_packed, *NO_RESIDUALS, deco_ops.packed.Packing([(4, 4)], [(2, 2)]).geometry, 4, "gelu", "average", False),
     RuntimeError, "deco::mlp_pool_packed ran with keep_residuals=False"),
    ("cross-attention-no-lse", lambda mp: backward_without_residuals(
        torch.ops.deco.cross_attention, *(torch.randn(1, 2, 1, 8) for _ in range(3)), None, None, 2, 0.25, 0.0, None, None, False),
     RuntimeError, "deco::cross_attention ran with need_lse=False; call deco_ops.cross_attention"),
    # aot (the compile checker's own consistency checks)
    ("aot-not-jit", lambda mp: aot._raw_jit_function(object()), TypeError, "not a triton JITFunction"),
    ("aot-registry-args", lambda mp: aot.specialize(_fake_kernel(), {}, SimpleNamespace(kwargs={})), ValueError,
     r"k: registry arguments do not match the kernel: missing \['a'\]"),
    ("aot-argument-type", lambda mp: aot.specialize(_fake_kernel(), {"a": [1]}, SimpleNamespace(kwargs={})), TypeError,
     r"k: cannot specialise argument a=\[1\]"),
    ("aot-tool", lambda mp: aot._tool("no-such-cuda-tool"), FileNotFoundError, "no-such-cuda-tool not found next to triton"),
    ("aot-entry", lambda mp: aot._entry("no_such_kernel"), KeyError, "no_such_kernel"),
    ("aot-label", lambda mp: aot.compile_labelled("merge_norm_stats", "R16 C128 w4 s3", "bf16 no such variant", ["bf16"], 90),
     KeyError, "'bf16 no such variant' names 0 of"),
    ("aot-reexec", lambda mp: (mp.setenv(aot._REEXEC_MARK, "1"), aot._reexec_clean([])), SystemExit,
     "TRITON_INTERPRET is still set in the clean subprocess"),
    # modules and attention_modules: constructor and forward checks of the drop-ins
    ("module-dtype", lambda mp: deco_ops.DeCoProjector(4, 4, dtype=torch.int32), TypeError,
     "dtype must be None or one of float16, bfloat16, float32, float64, got torch.int32"),
    ("module-head-dim", lambda mp: deco_ops.CrossAttention(1024, 2), ValueError,
     r"embed_dim 1024 / num_heads 2 = head dim 512; deco_ops.cross_attention takes head dims up to 256"),
    ("module-script", lambda mp: torch.jit.script(torch.nn.Sequential(deco_ops.CrossAttention(4, 1))), RuntimeError,
     r"torch.jit.script cannot compile CrossAttention: deco_ops' ops are Python \(torch.library custom ops\); record the model "
     "with torch.jit.trace or torch.export"),
    ("module-width", lambda mp: deco_ops.DeCoProjector(4, 5, grid=(4, 4), out_grid=(2, 2))(torch.randn(2, 16, 3)), ValueError,
     r"x has 3 features \(x.shape\[-1\]\) but this DeCoProjector takes in_features = 4"),
    ("module-width-hooked", lambda mp: hooked(deco_ops.DeCoProjector(4, 5, grid=(4, 4), out_grid=(2, 2)))(torch.randn(2, 16, 3)),
     ValueError, r"x has 3 features \(x.shape\[-1\]\) but this DeCoProjector takes in_features = 4"),
    ("mha-query-int", lambda mp: cross_attention_module(query=torch.ones(1, 3, 16, dtype=torch.int64)), TypeError,
     "query must be a floating tensor, got torch.int64"),
    ("mha-key-dtype", lambda mp: cross_attention_module(key=torch.randn(1, 4, 16, dtype=torch.float64)), TypeError,
     "key has dtype torch.float64 but the module's parameters have torch.float32"),
    ("resampler-x-device", lambda mp: deco_ops.QueryResampler(4, 16, 24, 2)(torch.randn(1, 4, 24, device=META)), ValueError,
     "x is on meta but the module's parameters are on (cpu|cuda)"),
    ("mha-attn-mask-device", lambda mp: cross_attention_module(attn_mask=torch.zeros(3, 4, device=META, requires_grad=True)), ValueError,
     "attn_mask is on meta but the inputs are on (cpu|cuda)"),
]


def _fake_kernel():
    """What aot.specialize reads of a JITFunction: its name and parameters."""
    return SimpleNamespace(__name__="k", params=[SimpleNamespace(name="a", is_constexpr=False, do_not_specialize=False)])


# ----------------------------------------------------------------------------------------------
# raise statements and the one that raised


@functools.lru_cache(maxsize=1)
def raise_sites() -> list[tuple[str, str, int, int]]:
    """(file, qualified function, first line, last line) of every ``raise <exception>`` in COVERED."""
    sites = []
    for module in COVERED:
        path = PACKAGE / f"{module}.py"

        def visit(node, scope):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name])
                    continue
                if isinstance(child, ast.Raise) and child.exc is not None:
                    sites.append((path.name, ".".join(scope) or "<module>", child.lineno, child.end_lineno))
                visit(child, scope)

        visit(ast.parse(path.read_text(), str(path)), [])
    return sites


def _raising_line(tb) -> tuple[str, int] | None:
    """(file name, line) of the innermost deco_ops frame of a traceback."""
    inner = None
    for frame, line in traceback.walk_tb(tb):
        path = Path(os.path.realpath(frame.f_code.co_filename))
        if path.parent == PACKAGE:
            inner = (path.name, line)
    return inner


def _site_of(tb, sites):
    where = _raising_line(tb)
    matches = [s for s in sites if where and s[0] == where[0] and s[2] <= where[1] <= s[3]]
    return matches[0] if matches else None


@contextlib.contextmanager
def no_kernel_launch():
    """Any kernel launch inside the block fails the case: validation comes first."""
    launched = AssertionError("a kernel was launched before the argument was rejected")
    with mock.patch.object(JITFunction, "run", side_effect=launched), \
            mock.patch.object(InterpretedFunction, "run", side_effect=launched), \
            mock.patch.object(Autotuner, "run", side_effect=launched):
        yield


def run_case(fn, error, match):
    """Runs one case on the Triton backend, its tensors made on DEVICE (the CPU goes through the
    interpreter), with the checks that read tensor values on; returns the pytest ExceptionInfo."""
    with pytest.MonkeyPatch.context() as mp, torch.device(DEVICE), deco_ops.use_backend("triton"), no_kernel_launch():
        mp.setenv("DECO_OPS_CHECKS", "1")
        with pytest.raises(error, match=match) as info:
            fn(mp)
    return info


@pytest.mark.parametrize("fn,error,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_error(fn, error, match):
    info = run_case(fn, error, match)
    assert _site_of(info.tb, raise_sites()) is not None, f"raised at {_raising_line(info.tb)}, not by a raise statement of COVERED"


def test_every_raise_has_a_case():
    sites = raise_sites()
    assert len({s[0] for s in sites}) >= 10, "the AST walk found too few files with raise statements"
    hit = {_site_of(run_case(*c[1:]).tb, sites) for c in CASES}
    missing = [f"{file}:{function} (line {line})" for file, function, line, _ in sites if (file, function, line, _) not in hit]
    assert not missing, "raise statements without a case in CASES: " + ", ".join(missing)


def test_covered_modules_exist():
    assert all((PACKAGE / f"{m}.py").exists() for m in COVERED)
