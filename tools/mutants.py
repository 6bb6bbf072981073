"""The mutants of ``python -m tools.mutate``: realistic one-line bugs, each the kind a kernel author
writes (a window bound off by one, a mask or a count that forgets the time axis, a gradient flag
read for the wrong input, a validation clause dropped), and the narrowest test selection that
should catch it.

Each mutant replaces ``original`` (which must occur exactly once in ``file``) by ``replacement``.
Snippets are kept to the semantically central parts (kernel math, window bounds, masks, gradient
flags, validation checks) so that refactors elsewhere leave them intact;
``tests/test_mutants.py`` checks in CI that every snippet still occurs exactly once.

``equivalent``: for a mutant no test can kill because it does not change behaviour, why. Every
survivor of a run is either killed by a new test or gets its reason here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments, run from the repository root
    bug: str  # what the mutant gets wrong, in words
    equivalent: str = ""


def _grad_matrix(k: str) -> tuple[str, ...]:
    return ("tests/test_grad_matrix.py", "-k", k)


def _uneven(k: str) -> tuple[str, ...]:
    return ("tests/test_uneven_windows.py", "-k", k)


def _error(case: str) -> tuple[str, ...]:
    return ("tests/test_error_paths.py", "-k", case)


_ACTIVATIONS = ("tests/test_activations_exact.py",)
_MERGE = ("tests/test_merge.py",)


def _long(k: str) -> tuple[str, ...]:
    return ("tests/test_long_reductions.py", "-k", k)


def _rounded_per_step(name: str, file: str, step: str, dtype: str, acc: str, tests: tuple[str, ...], what: str) -> Mutant:
    """The running sum rounded to the operand dtype (``dtype``) after every K step ``step``, the bug
    of a kernel that accumulates in 16 bits: invisible at K <= 96, several times eager's error at
    K = 1024 (issue 24)."""
    return Mutant(name, file, step, step.replace("INPUT_PRECISION)", f"INPUT_PRECISION).to({dtype}).to({acc})", 1),
                  tests, f"{what}: the accumulator rounded to 16 bits at every step")

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------------------------------
    # kernels/activations.py
    Mutant("tanh_gelu_constant", "kernels/activations.py",
           "_TANH_CUBIC = tl.constexpr(0.044715)", "_TANH_CUBIC = tl.constexpr(0.0447)",
           _ACTIVATIONS, "tanh-GELU's cubic coefficient truncated (issue 14, mutant 1)"),
    Mutant("gelu_derivative_drops_z", "kernels/activations.py",
           "z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)", "_INV_SQRT_2PI * tl.exp(-0.5 * z * z)",
           _ACTIVATIONS, "erf-GELU' without the z of z * phi(z)"),
    Mutant("silu_derivative", "kernels/activations.py",
           "return s * (1.0 + z * (1.0 - s))", "return s * (1.0 + z * s)",
           _ACTIVATIONS, "SiLU' with s for (1 - s)"),
    Mutant("tanh_argument", "kernels/activations.py",
           "2.0 * tl.sigmoid(2.0 * x) - 1.0", "2.0 * tl.sigmoid(x) - 1.0",
           _ACTIVATIONS, "tanh(x) as 2 sigmoid(x) - 1 (that is tanh(x / 2))"),
    Mutant("tanh_gelu_derivative_cubic", "kernels/activations.py",
           "(3.0 * _TANH_CUBIC)", "_TANH_CUBIC",
           _ACTIVATIONS, "tanh-GELU' differentiates c z^3 as c z^2"),
    # ------------------------------------------------------------------------------------------
    # kernels/adaptive_window.py, kernels/adaptive_pool.py
    Mutant("window_end_floor", "kernels/adaptive_window.py",
           "return (i * L) // O, ((i + 1) * L + O - 1) // O", "return (i * L) // O, ((i + 1) * L) // O",
           _uneven("test_pool_tokens and not packed"), "window end rounded down instead of up"),
    Mutant("windows_containing_end_floor", "kernels/adaptive_window.py",
           "return (j * O) // L, ((j + 1) * O + L - 1) // L", "return (j * O) // L, ((j + 1) * O) // L",
           _uneven("test_pool_tokens and not packed"), "an input's last window rounded down: overlaps lose gradient"),
    Mutant("pool_count_drops_time", "kernels/adaptive_pool.py",
           "total = tl.sum(acc, axis=0) / ((t1 - t0) * (h1 - h0)", "total = tl.sum(acc, axis=0) / ((h1 - h0)",
           _uneven("test_pool_tokens and not packed"), "pooling divides by the window's H x W, not T x H x W"),
    Mutant("unpool_first_time_window_only", "kernels/adaptive_pool.py",
           "for ot in range(it0, it1):", "for ot in range(it0, it0 + 1):",
           _uneven("test_pool_tokens and not packed"), "un-pooling gathers from the first time window only"),
    # ------------------------------------------------------------------------------------------
    # kernels/pool_gemm.py
    Mutant("pool_gemm_time_mask", "kernels/pool_gemm.py",
           "inside = row_mask & (t < t1) & (h < h1) & (w < w1)", "inside = row_mask & (h < h1) & (w < w1)",
           _uneven("pool_linear"), "the A-tile window mask forgets the time axis (issue 14, the fuzzer's flaky find)"),
    Mutant("pool_gemm_count_drops_time", "kernels/pool_gemm.py",
           "inv_count = 1.0 / ((t1 - t0) * (h1 - h0) * (w1 - w0))", "inv_count = 1.0 / ((h1 - h0) * (w1 - w0))",
           _uneven("pool_linear"), "the fused pooling divides by H x W only"),
    Mutant("pool_gemm_pooled_row_stride", "kernels/pool_gemm.py",
           "pooled_ptrs = pooled_ptr + rows64[:, None] * K + k[None, :]",
           "pooled_ptrs = pooled_ptr + rows64[:, None] * N + k[None, :]",
           _grad_matrix("test_pool_linear and triton"), "the saved pooled tile written with the output's row stride"),
    Mutant("pool_gemm_packed_cell", "kernels/pool_gemm.py",
           "cell = rows64 - row0", "cell = rows64 - tok0",
           _uneven("test_pool_mlp_packed"), "a packed row's cell counted from the image's first token, not its first row"),
    # ------------------------------------------------------------------------------------------
    # kernels/packed_pool.py
    Mutant("packed_geometry_tok0_field", "kernels/packed_pool.py",
           "tok0 = tl.load(g + 6, mask=mask, other=0)", "tok0 = tl.load(g + 7, mask=mask, other=0)",
           _uneven("test_pool_tokens_packed"), "an image's first token read from the row0 column"),
    Mutant("source_tap_window_bound", "kernels/packed_pool.py",
           "wgt = tl.where(i < e, 1.0 / (e - s).to(tl.float32), 0.0)",
           "wgt = tl.where(i <= e, 1.0 / (e - s).to(tl.float32), 0.0)",
           _uneven("test_pool_tokens_packed and average"), "packed pooling reads one tap past a shorter window"),
    Mutant("target_weight_window_bound", "kernels/packed_pool.py",
           "(s <= j) & (j < e) & (o < O)", "(s <= j) & (j <= e) & (o < O)",
           _uneven("test_pool_tokens_packed and average"), "packed un-pooling credits the token after a window",
           equivalent="in average mode unpooled_tile only visits the outputs target_span returns, which are exactly "
           "the windows containing j (windows_containing), so s <= j < e holds for every visited output and j == e "
           "never occurs: the membership test is a redundant guard there"),
    Mutant("bilinear_last_input_weight", "kernels/packed_pool.py",
           "w1 = tl.where(last, 0.0, frac)", "w1 = frac",
           _uneven("test_pool_tokens_packed and bilinear"), "bilinear's clamped last input counted twice"),
    Mutant("unpool_packed_token_origin", "kernels/packed_pool.py",
           "tokens - tok0, T, H, W, OT, OH, OW, row0", "tokens - row0, T, H, W, OT, OH, OW, row0",
           _uneven("test_pool_tokens_packed"), "packed un-pooling indexes tokens from the image's first output row"),
    # ------------------------------------------------------------------------------------------
    # kernels/tiling.py, kernels/dot.py, kernels/gemm_act_grad.py, kernels/mlp_pool.py
    Mutant("grouped_tile_last_group", "kernels/tiling.py",
           "group_rows = min(num_m - first_m, GROUP_M)", "group_rows = GROUP_M",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and triton and dtype0"),
           "a short last group of row tiles maps programs past M and leaves tiles unwritten"),
    Mutant("tile_rows_unmasked", "kernels/tiling.py",
           "return pid_m, pid_n, rows, cols, rows < M, cols < N", "return pid_m, pid_n, rows, cols, rows >= 0, cols < N",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and triton and dtype0"),
           "the last row tile reads and writes past the M rows of its output"),
    Mutant("dot_drops_accumulator", "kernels/dot.py",
           "return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)", "return tl.dot(a, b, input_precision=INPUT_PRECISION)",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and triton and dtype0"),
           "each K step of a GEMM replaces the running sum instead of adding to it"),
    Mutant("act_grad_applies_activation", "kernels/gemm_act_grad.py",
           "(acc * activations.derivative(z, ACTIVATION))", "(acc * activations.apply(z, ACTIVATION))",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and triton and dtype0"),
           "the chain rule multiplies by act(z) instead of act'(z)"),
    Mutant("act_grad_z_strides", "kernels/gemm_act_grad.py",
           "(local[:, None] * szm + cols[None, :] * szn)", "(local[:, None] * szn + cols[None, :] * szm)",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and triton and dtype0"),
           "the pre-activation tile read transposed"),
    Mutant("mlp_pool_recompute_drops_bias", "kernels/mlp_pool.py",
           "HAS_BIAS=b1 is not None", "HAS_BIAS=False",
           _uneven("test_mlp_pool"), "mlp_pool's backward recomputes the pre-activation without b1"),
    Mutant("mlp_pool_token_origin", "kernels/mlp_pool.py",
           "rows - tok0, T, H, W", "rows - row0, T, H, W",
           _uneven("test_mlp_pool"), "the fused un-pooling indexes tokens from the image's first output row"),
    # ------------------------------------------------------------------------------------------
    # kernels/cross_attention_fwd.py
    Mutant("attention_fwd_key_mask", "kernels/cross_attention_fwd.py",
           's = tl.where(col_mask[None, :], s, float("-inf"))', "s = s",
           _grad_matrix("test_cross_attention and kv_lens and not module"), "scores of keys past kv_lens not masked"),
    Mutant("attention_fwd_no_rescale", "kernels/cross_attention_fwd.py",
           "acc * alpha[:, None], DOT_FP32", "acc, DOT_FP32",
           ("tests/test_cross_attention.py", "-k", "test_parity and triton and dtype0 and M17-N37"),
           "online softmax: the accumulator is not rescaled when the running maximum grows"),
    Mutant("attention_packed_length", "kernels/cross_attention_fwd.py",
           "length = tl.load(cu_ptr + b + 1).to(tl.int64) - start", "length = tl.load(cu_ptr + b + 1).to(tl.int64)",
           _grad_matrix("test_cross_attention and cu_seqlens_k and not module"), "a packed sequence's length taken as its end offset"),
    Mutant("attention_combine_weights", "kernels/cross_attention_fwd.py",
           "l_tot += w * tl.load(part_l_ptr", "l_tot += tl.load(part_l_ptr",
           ("tests/test_cross_attention.py", "-k", "test_schedules and 3-True"), "split-key merge sums the partial sums unscaled"),
    Mutant("attention_fwd_dropout_scale", "kernels/cross_attention_fwd.py",
           "p = tl.where(keep, p * inv_keep, 0.0)", "p = tl.where(keep, p, 0.0)",
           ("tests/test_cross_attention.py", "-k", "test_dropout_same_mask_on_both_backends"),
           "inverted dropout without the 1 / (1 - p) rescale of kept probabilities"),
    Mutant("attention_lse_base", "kernels/cross_attention_fwd.py",
           "(m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453",
           "(m_i + tl.log2(tl.where(has_keys, l_i, 1.0)))",
           _grad_matrix("test_cross_attention and dense and not module"), "the LSE stored in base 2"),
    # ------------------------------------------------------------------------------------------
    # kernels/cross_attention_bwd.py
    Mutant("attention_bwd_delta", "kernels/cross_attention_bwd.py",
           "return pz, p * (dp - delta)", "return pz, p * dp",
           _grad_matrix("test_cross_attention and dense and not module"), "dS without the rowsum(dO o O) term"),
    Mutant("attention_bwd_dropout_mask", "kernels/cross_attention_bwd.py",
           "dp = tl.where(keep, dp * inv_keep, 0.0)", "dp = dp * inv_keep",
           ("tests/test_cross_attention.py", "-k", "test_dropout_same_mask_on_both_backends"),
           "backward applies dropout's scale to dP but not its mask"),
    Mutant("attention_dk_scale", "kernels/cross_attention_bwd.py",
           "h * sdkh, dk * scale,", "h * sdkh, dk,",
           _grad_matrix("test_cross_attention and fa2"), "FA2 dK without the softmax scale"),
    Mutant("attention_padding_gradients", "kernels/cross_attention_bwd.py",
           "owned = N if KV_MODE != 2 else kv_len", "owned = kv_len",
           _grad_matrix("test_cross_attention and single_pass and kv_lens"), "dK, dV of keys past kv_lens never written"),
    Mutant("attention_shared_dq_direct", "kernels/cross_attention_bwd.py",
           "direct = num_splits == 1 and not shared", "direct = num_splits == 1",
           _grad_matrix("test_cross_attention and single_pass-dense"), "shared queries' dQ written per batch into one q-sized buffer"),
    # ------------------------------------------------------------------------------------------
    # precision at real reduction lengths (tests/test_long_reductions.py, K = 1024)
    _rounded_per_step("pool_gemm_acc_rounded_per_step", "kernels/pool_gemm.py",
                      "acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)", "x_ptr.dtype.element_ty", "tl.float32",
                      _long("pool_gemm"), "pool_gemm's K loop"),
    _rounded_per_step("act_grad_acc_rounded_per_step", "kernels/gemm_act_grad.py",
                      "acc = dot(g, wt, acc, DOT_FP32, INPUT_PRECISION)", "dy_ptr.dtype.element_ty", "tl.float32",
                      _long("act_grad"), "gemm_act_grad's dy @ W2"),
    _rounded_per_step("mlp_pool_acc_rounded_per_step", "kernels/mlp_pool.py",
                      "acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)", "x_ptr.dtype.element_ty", "tl.float32",
                      _long("mlp_pool"), "mlp_pool's recomputed pre-activation"),
    _rounded_per_step("merge_gemm_acc_rounded_per_step", "kernels/merge_gemm.py",
                      "acc = dot(a, wt, acc, DOT_FP32, INPUT_PRECISION)", "x_ptr.dtype.element_ty", "tl.float32",
                      _long("merge_gemm"), "merge_gemm's K loop over sub-tokens and channels"),
    _rounded_per_step("attention_fwd_acc_rounded_per_step", "kernels/cross_attention_fwd.py",
                      "acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_FP32, INPUT_PRECISION)", "v.dtype", "ACC",
                      _long("cross_attention"), "the forward's P @ V over the key blocks"),
    _rounded_per_step("attention_dq_single_pass_rounded_per_step", "kernels/cross_attention_bwd.py",
                      "dq = dot(ds.to(k.dtype), k, dq, DOT_FP32, INPUT_PRECISION)\n        store_rows", "k.dtype", "ACC",
                      _long("cross_attention and single_pass"), "the single-pass backward's dQ = dS @ K"),
    _rounded_per_step("attention_dq_fa2_rounded_per_step", "kernels/cross_attention_bwd.py",
                      "dq = dot(ds.to(k.dtype), k, dq, DOT_FP32, INPUT_PRECISION)\n    store_rows", "k.dtype", "ACC",
                      _long("cross_attention and fa2"), "the FA2 dQ kernel's dS @ K"),
    Mutant("attention_lse_16bit", "kernels/cross_attention_fwd.py",
           "tl.store(lse_ptr + bh.to(tl.int64) * M + rows, lse, mask=row_mask)",
           "tl.store(lse_ptr + bh.to(tl.int64) * M + rows, lse.to(tl.float16), mask=row_mask)",
           _long("cross_attention and single_pass"), "a 16-bit intermediate: the LSE kept for backward rounded to fp16 (P off by ~0.4%)"),
    Mutant("pool_gemm_window_sum_rounded", "kernels/pool_gemm.py",
           "a = a * inv_count[:, None]", "a = a.to(x_ptr.dtype.element_ty).to(tl.float32) * inv_count[:, None]",
           ("tests/test_projector.py", "-k", "bit_for_bit"),
           "a 16-bit intermediate: the window's sum rounded before the division (two roundings, not one)"),
    # ------------------------------------------------------------------------------------------
    # composed twins (deco_ops/composed.py; on CPU the PyTorch backend runs them under "auto")
    Mutant("composed_pool_mlp_activation", "deco_ops/composed.py",
           "y = F.linear(reference.ACTIVATIONS[activation](pre), w2, b2)", "y = F.linear(F.gelu(pre), w2, b2)",
           ("tests/test_projector.py", "-k", "test_pool_mlp_activations and auto"), "the composed MLP always applies erf-GELU"),
    Mutant("composed_pool_mlp_residual", "deco_ops/composed.py",
           "    return y, pooled, pre\n", "    return y, pooled, reference.ACTIVATIONS[activation](pre)\n",
           ("tests/test_strategy_parity.py", "-k", "test_projector_strategies_agree and pool_mlp and composed"),
           "the composed MLP keeps act(pre) where the shared backward expects the pre-activation"),
    Mutant("composed_mlp_pool_order", "deco_ops/composed.py",
           "pooled = pool(reference.ACTIVATIONS[activation](F.linear(x, w1, b1)), *where)",
           "pooled = reference.ACTIVATIONS[activation](pool(F.linear(x, w1, b1), *where))",
           ("tests/test_strategy_parity.py", "-k", "test_projector_strategies_agree and mlp_pool and composed"),
           "project-then-pool's composed twin pools before the activation"),
    # ------------------------------------------------------------------------------------------
    # strategy choice (deco_ops/strategy.py)
    Mutant("strategy_key_drops_dtype", "deco_ops/strategy.py",
           'return "|".join((op, name, str(dtype).removeprefix("torch."), fields,', 'return "|".join((op, name, "", fields,',
           ("tests/test_strategy.py",), "the decision key forgets the dtype: a bf16 winner is reused for fp32"),
    Mutant("strategy_slowest_wins", "deco_ops/strategy.py",
           "winner = min(times, key=times.get)", "winner = max(times, key=times.get)",
           ("tests/test_strategy.py",), "the slower candidate is kept"),
    Mutant("strategy_remembered_winner_unfiltered", "deco_ops/strategy.py",
           "    known = _decisions.get(key)\n    if known in usable:", "    known = _decisions.get(key)\n    if known in candidates:",
           ("tests/test_strategy.py", "-k", "deterministic"),
           "a winner remembered without deterministic mode is reused under it (a non-deterministic path runs)"),
    # ------------------------------------------------------------------------------------------
    # tuning tables and buckets (kernels/_tuning.py, deco_ops/tuning_tables.py)
    Mutant("tuning_bucket_off_by_one", "kernels/_tuning.py",
           "return 1 << max(0, n - 1).bit_length()", "return 1 << max(0, n).bit_length()",
           ("tests/test_tuning.py", "-k", "bucket"), "a power of two lands in the next bucket (1024 rows tuned as 2048)"),
    Mutant("tuning_label_unbucketed", "kernels/_tuning.py",
           "{bucket(args[k]) if k in self.buckets else args[k]}", "{args[k]}",
           ("tests/test_tuning.py", "-k", "bucket"), "bucket labels keep exact row counts: every batch size is timed again"),
    Mutant("tuning_autotune_off_ignored", "kernels/_tuning.py",
           "if not autotune_enabled() or len(candidates) == 1:", "if len(candidates) == 1:",
           ("tests/test_tuning.py", "-k", "autotune_off"), "DECO_OPS_AUTOTUNE=0 still times the configs"),
    Mutant("tuning_table_strategies_dropped", "deco_ops/tuning_tables.py",
           'strategy.preload(table.get("strategies", {}))', "strategy.preload({})",
           ("tests/test_tuning.py", "-k", "strategies_preloaded"), "a GPU table's strategy decisions are never loaded"),
    # ------------------------------------------------------------------------------------------
    # autocast rules (deco_ops/_autocast.py, deco_ops/_validate.py)
    Mutant("autocast_gemm_ops_not_cast", "deco_ops/_autocast.py",
           "_register(_name, _device_type, cast=True)", "_register(_name, _device_type, cast=False)",
           ("tests/test_autocast.py", "-k", "test_op_under_autocast"), "the GEMM/attention ops ignore autocast and run in their inputs' dtype"),
    Mutant("autocast_casts_float64", "deco_ops/_validate.py",
           "and t.dtype != torch.float64\n", "\n",
           ("tests/test_autocast.py", "-k", "float64_alone"), "autocast casts float64 inputs too (nn.Linear leaves them alone)"),
    # ------------------------------------------------------------------------------------------
    # autograd formulas (deco_ops/)
    Mutant("pool_linear_flags_swapped", "deco_ops/projector.py",
           "need_x, need_w, need_b = ctx.needs_input_grad[:3]", "need_w, need_x, need_b = ctx.needs_input_grad[:3]",
           _grad_matrix("test_pool_linear"), "pool_linear's x and w need-grad flags swapped (issue 14, mutant 4)"),
    Mutant("pool_mlp_b1_tests_has_b2", "deco_ops/projector.py",
           "need_b1 and ctx.has_b1", "need_b1 and ctx.has_b2",
           _grad_matrix("test_pool_mlp and not packed"), "b1's gradient gated on b2 being present (issue 14, mutant 2)"),
    Mutant("pool_mlp_dw2_from_pre", "deco_ops/projector.py",
           "linear_grads(dy, act,", "linear_grads(dy, pre,",
           _grad_matrix("test_pool_mlp and not packed"), "dW2 from the pre-activation instead of the activation"),
    Mutant("unpool_backward_grids_swapped", "deco_ops/pooling.py",
           "deco.adaptive_avg_pool_tokens(grad, ctx.grid, ctx.out_grid)",
           "deco.adaptive_avg_pool_tokens(grad, ctx.out_grid, ctx.grid)",
           _grad_matrix("double_backward"), "the un-pooling's own gradient pools with the grids swapped"),
    Mutant("direct_path_records_no_autograd", "deco_ops/_direct.py",
           "if torch.is_grad_enabled() and any(", "if not torch.is_grad_enabled() and any(",
           _grad_matrix("test_pool_mlp and not packed"), "eager calls that need gradients skip the autograd Function"),
    Mutant("mlp_backward_flags", "deco_ops/projector.py",
           "need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]",
           "need_x, need_w1, need_w2, need_b1, need_b2 = ctx.needs_input_grad[:5]",
           _grad_matrix("test_pool_mlp_packed"), "the MLP backward (dense and packed) reads b1's flag for w2 and w2's for b1"),
    Mutant("packed_unpool_mode", "deco_ops/packed.py",
           "unpool_tokens_packed(grad, geometry, ctx.size, ctx.mode)", 'unpool_tokens_packed(grad, geometry, ctx.size, "average")',
           _grad_matrix("test_pool_tokens_packed and bilinear"), "packed pooling's backward always un-pools as average"),
    Mutant("mlp_pool_b1_alone", "deco_ops/mlp_pool.py",
           "if need_x or need_w1 or (need_b1 and ctx.has_b1):", "if need_x or need_w1:",
           _grad_matrix("test_mlp_pool and not packed"), "mlp_pool skips the fused backward when only b1 needs a gradient"),
    Mutant("attention_need_dkv_v", "deco_ops/attention.py",
           "need_dkv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]", "need_dkv = ctx.needs_input_grad[1]",
           _grad_matrix("test_cross_attention and dense and not module"), "v's gradient only when k needs one too"),
    Mutant("deco_prefix_slice", "deco_ops/modules.py",
           "x = x[:, self.num_prefix_tokens:]", "x = x[:, :-self.num_prefix_tokens]",
           _grad_matrix("deco_projector"), "DeCoProjector drops the last tokens instead of the prefix"),
    Mutant("mha_dead_rows_per_head", "deco_ops/attention_modules.py",
           "dead_w = dead.any(1) if average_attn_weights else dead", "dead_w = dead.all(1) if average_attn_weights else dead",
           ("tests/test_masks.py", "-k", "test_queries_without_keys_give_nan_as_multihead_attention"),
           "averaged weights of a query with no key in one head are not NaN, as nn.MultiheadAttention's are"),
    Mutant("attention_bias_natural_log", "kernels/cross_attention_fwd.py",
           "s + tl.maximum(bias, MIN_BIAS) * LOG2E_JIT", "s + tl.maximum(bias, MIN_BIAS)",
           ("tests/test_masks.py", "-k", "test_attn_mask_matches_softmax_forward_and_backward and triton and float"),
           "the additive mask added in natural-log units to log2-scaled scores"),
    Mutant("attention_weights_not_averaged", "kernels/cross_attention_weights.py",
           "total = total / H", "total = total",
           ("tests/test_masks.py", "-k", "test_weights_match_softmax_and_carry_gradients and triton"),
           "head-averaged weights summed over the heads instead"),
    # ------------------------------------------------------------------------------------------
    # validation
    Mutant("cu_seqlens_start_unchecked", "deco_ops/_validate_attention.py",
           "offsets[0] != 0 or ", "",
           _error("cu-start"), "cu_seqlens_k = [1, 4, 9] accepted (issue 14, mutant 3)"),
    Mutant("kv_lens_not_clamped_above", "kernels/cross_attention_fwd.py",
           "return start, tl.minimum(tl.maximum(length, 0), N)", "return start, tl.maximum(length, 0)",
           ("tests/test_masks.py", "-k", "test_attn_mask_with_kv_lens_and_clamped_lengths and triton"),
           "kv_lens past N not clamped to N (the documented behaviour): keys past the tensor are read"),
    Mutant("grid_entry_zero", "deco_ops/_validate.py",
           "if v < 1:", "if v < 0:",
           _error("out-grid-zero"), "a zero grid entry accepted"),
    Mutant("bias_checked_against_in_features", "deco_ops/_validate.py",
           "if b.shape[0] != w.shape[0]:", "if b.shape[0] != w.shape[1]:",
           _uneven("pool_linear"), "a bias compared with the weight's input features: valid Linears rejected"),
    Mutant("packed_stride_floor", "deco_ops/packed.py",
           "o = [tuple(-(-a // b) for a, b in zip(r, s)) for r in g]", "o = [tuple(a // b for a, b in zip(r, s)) for r in g]",
           _grad_matrix("test_pool_tokens_packed and stride"), "stride's output grid rounded down instead of up"),
    Mutant("packed_out_grids_and_stride", "deco_ops/packed.py",
           "if (out_grids is None) == (stride is None):", "if out_grids is None and stride is None:",
           _error("stride-and-out-grids"), "out_grids and stride both given: stride silently ignored"),
    Mutant("packed_grid_entry_zero", "deco_ops/packed.py",
           "if min(r) < 1:", "if min(r) < 0:",
           _error("grids-entry"), "a packed image with a zero-length axis accepted"),
    # ------------------------------------------------------------------------------------------
    # patch merge: kernels/merge_rows.py, merge_norm.py, merge_gemm.py, gemm_epilogue.py, deco_ops/merge.py
    Mutant("merge_subtoken_order", "kernels/merge_rows.py",
           "offsets = base + (q // MERGE) * step_h + (q % MERGE) * sxn",
           "offsets = base + (q % MERGE) * step_h + (q // MERGE) * sxn",
           _MERGE, "a merged row's sub-tokens gathered in (dw, dh) order: not HF's / pixel_shuffle's channel order"),
    Mutant("merge_stats_mean_width", "kernels/merge_norm.py",
           "mean = total / width", "mean = total / C",
           _MERGE, "a post-merge LayerNorm's mean divided by C instead of the merged row's S*S*C channels"),
    Mutant("merge_norm_dx_projection", "kernels/merge_norm.py",
           "dx = (dxhat - xhat * mean_dx[:, None]) * rstd[:, None]", "dx = (dxhat - mean_dx[:, None]) * rstd[:, None]",
           _MERGE, "the norm's input gradient drops the x-hat factor of its projection term"),
    Mutant("merge_gemm_group_stats", "kernels/merge_gemm.py",
           "group_stats(stats_ptr, rows, row_mask, q, MERGE * MERGE)", "group_stats(stats_ptr, rows, row_mask, 0, MERGE * MERGE)",
           _MERGE, "a pre-merge norm standardises every sub-token with the first token's statistics"),
    Mutant("epilogue_bias_flag", "kernels/gemm_epilogue.py",
           "    if HAS_BIAS:\n        acc += tl.load(b_ptr", "    if not HAS_BIAS:\n        acc += tl.load(b_ptr",
           _MERGE, "the shared GEMM epilogue adds the bias exactly when there is none"),
    Mutant("merge_tokens_for_dw1", "deco_ops/merge.py",
           "tokens = x if need_x or need_nw or need_nb or need_w1 else None", "tokens = x if need_x or need_nw or need_nb else None",
           _MERGE, "the tokens are not kept when only W1 needs a gradient (its A operand is rebuilt from them)"),
    Mutant("tma_gemm_persistent_stride", "kernels/tma_gemm.py",
           "num_tiles, NUM_SMS, flatten=False", "num_tiles, NUM_SMS + 1, flatten=False",
           ("tests/test_tma_gemm.py", "-k", "test_linear_act_matches_float64"),
           "the persistent tile loop strides past the programs it has and skips tiles"),
    Mutant("tma_gemm_act_grad_epilogue", "kernels/tma_gemm.py",
           "(acc * activations.derivative(z, ACTIVATION))", "(acc * activations.apply(z, ACTIVATION))",
           ("tests/test_tma_gemm.py", "-k", "test_act_grad_matches_float64"),
           "the TMA GEMM's backward epilogue multiplies by act instead of act'"),
    Mutant("activation_backward_partial_row", "kernels/activation_backward.py",
           "tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, colsum, mask=col_mask)",
           "tl.store(partial_ptr + cols, colsum, mask=col_mask)",
           ("tests/test_projector.py", "-k", "test_composed_activation_backward_is_one_pass"),
           "every row chunk writes its db1 partial sum into the first partial row"),
    Mutant("activation_backward_row_mask", "kernels/activation_backward.py",
           "mask = (rows < M)[:, None] & col_mask[None, :]", "mask = col_mask[None, :]",
           ("tests/test_projector.py", "-k", "test_composed_activation_backward_is_one_pass"),
           "the elementwise backward pass reads and writes past the last row"),
    Mutant("mlp_pool_dpooled_16bit", "deco_ops/mlp_pool.py",
           "return a.float() @ b.float()", "return (a @ b).float()",
           ("tests/test_mlp_pool.py", "-k", "test_grad_x_where_windows_overlap_is_as_accurate_as_eager"),
           "dy @ W2 rounded to 16 bits per window before un-pooling: overlapping windows lose what cancels"),
    Mutant("mlp_backward_db1_with_extra", "deco_ops/projector.py",
           "need_b1 and dpre_extra is None", "need_b1",
           ("tests/test_projector.py", "-k", "test_gradient_of_the_pre_activation_output_joins_db1"),
           "db1 taken from the activation pass even when a gradient on the pre-activation is added after it"),
    Mutant("strategy_times_in_capture", "deco_ops/strategy.py",
           "if capturing():", "if False:",
           ("tests/test_strategy.py", "-k", "test_nothing_is_timed_inside_a_cuda_graph_capture"),
           "the strategy times candidates inside a CUDA graph capture"),
    Mutant("strategy_ranks_decide_alone", "deco_ops/strategy.py",
           "winner = _agree(key, usable, lambda: _measure(key, usable, timer)) if synchronised else _measure(key, usable, timer)",
           "winner = _measure(key, usable, timer)",
           ("tests/test_strategy.py", "-k", "test_distributed_ranks_adopt_rank_0_decisions"),
           "under torch.distributed every rank times and decides alone"),
    Mutant("composed_lse_padding_kept", "deco_ops/composed_attention.py",
           "return lse.flatten(2)[:, :, :M]", "return lse.flatten(2)",
           ("tests/test_composed_attention.py", "-k", "test_every_backward_follows_every_forward"),
           "the memory-efficient kernel's padded LSE handed on unsliced"),
    Mutant("tuning_table_any_triton", "deco_ops/tuning_tables.py",
           "if table and not same_triton(table, path):", "if False:",
           ("tests/test_tuning.py", "-k", "test_table_from_another_triton_minor_is_ignored"),
           "a tuning table from another triton major.minor is used as is"),
)
