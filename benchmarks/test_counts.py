"""The FLOP/byte formulas and the report's bar logic, checked by hand on small numbers."""

import torch

from . import cases, counts, readme_table, report, shapes


def test_pool_mlp_counts():
    # B=1, 4 tokens pooled to 1, C=2 -> hidden 3 -> out 5, fp16
    f, b = counts.pool_mlp(1, 4, 1, 2, 3, 5, 2, direction="fwd")
    assert f == 2 * 1 * 3 * 2 + 2 * 1 * 3 * 5
    assert b == (4 * 2 + 3 * 2 + 3 + 5 * 3 + 5 + 1 * 5) * 2
    fb, _ = counts.pool_mlp(1, 4, 1, 2, 3, 5, 2, direction="fwd_bwd", tokens_grad=True)
    assert fb == 3 * f  # backward with the token gradient is twice the forward
    fb_frozen, _ = counts.pool_mlp(1, 4, 1, 2, 3, 5, 2, direction="fwd_bwd")
    assert fb_frozen == fb - 2 * 1 * 3 * 2


def test_attention_counts_follow_flash_convention():
    s = shapes.CROSS_ATTENTION["blip2_qformer"]
    f, _ = counts.cross_attention_shape(s, 2, "fwd")
    assert f == 4 * 64 * 32 * 257 * 12 * 64
    fb, _ = counts.cross_attention_shape(s, 2, "fwd_bwd")
    assert fb == 14 * 64 * 32 * 257 * 12 * 64
    v = shapes.CROSS_ATTENTION["video_resampler"]
    fv, _ = counts.cross_attention_shape(v, 2, "fwd")
    assert fv == 4 * 256 * sum(v.kv_lens) * 16 * 64  # only valid keys count


def test_mlp_pool_fused_saves_flops():
    s = shapes.MLP_POOL["onevision_32f"]
    fused, _ = counts.mlp_pool_shape(s, 2, "fwd")
    eager, _ = counts.mlp_pool_shape(s, 2, "fwd", fused=False)
    assert fused < eager


def test_anyres_grids_follow_llava_next_unpad_and_packing_saves_flops():
    # LLaVA-NeXT unpad_image on the 48x48 grid of 2x2 tiles: 640x480 keeps 36 of 48 rows, 1280x720
    # keeps 27 rounded up to an even 28, a portrait image keeps columns instead.
    assert shapes.llava_next_unpadded_grid(640, 480) == (36, 48)
    assert shapes.llava_next_unpadded_grid(1280, 720) == (28, 48)
    assert shapes.llava_next_unpadded_grid(480, 640) == (48, 36)
    assert shapes.llava_next_unpadded_grid(1024, 1024) == (48, 48)
    s = shapes.PACKED["anyres_5tiles"]
    assert len(s.grids) == 16 and len(set(s.grids)) == 9 and s.pooled == 4488
    packed, _ = counts.packed_shape(s, 2, "fwd")
    padded, _ = counts.pool_mlp(16, 48 * 48, 24 * 24, s.in_features, s.hidden, s.out_features, 2, direction="fwd")
    assert padded / packed == 16 * 576 / 4488  # the MLP runs on 9216 padded rows instead of 4488
    env = cases.Env(device=torch.device("cpu"), dtype=torch.float32)
    for group in cases.packed_groups("anyres_5tiles", env, ("fwd", "fwd_bwd")):  # the tiny twin on CPU
        assert group.extra["padded_flops"] > group.flops
        assert set(group.impls) == {"deco_ops", "deco_ops_fused", "deco_ops_composed", "deco_ops_fused_tma", "eager", "compile",
                                     "deco_ops_padded"}


def test_shapes_are_named_once_and_have_tiny_twins():
    for name, s in shapes.ALL.items():
        assert s.name == name and (s.tiny is None) == (name in shapes.CPU_PATH)
    assert shapes.select(["infer_b1", "llava15_7b"]) == ["llava15_7b", "infer_b1"]
    assert not set(shapes.select(None)) & set(shapes.CPU_PATH)
    assert shapes.select(None, cpu=True)[:len(shapes.CPU_PATH)] == list(shapes.CPU_PATH)


def test_bar_check_reads_ratios():
    rec = {"op": "pool_mlp", "shape": "infer_b1", "direction": "fwd",
           "impls": {"deco_ops": {"ms": 1.0, "TFLOPs": 1.0, "GBps": 1.0}, "eager": {"ms": 1.5}}}
    rec["speedup"] = report.speedups(rec)
    rows = report.check_bar([rec], {"matmul_TFLOPs": 1.0, "copy_GBps": 1.0}, cpu=False)
    row = next(r for r in rows if r["shape"] == "infer_b1")
    assert row["met"] is False and abs(row["measured"] - 1.5) < 1e-12 and round(row["margin_pct"]) == -25
    assert all(r["status"] == "not run" for r in rows if r["shape"] != "infer_b1")


def test_memory_bar_reads_peaks_against_the_baseline_or_the_fastest_sdpa():
    """Memory targets: deco_ops' peak at most the baseline's (for "sdpa", the fastest backend's);
    without peaks (off CUDA) the row says so instead of passing or failing."""
    pool = {"op": "pool_mlp", "shape": "llava15_7b", "direction": "fwd",
            "impls": {"deco_ops": {"ms": 1.0, "peak_MiB": 117.0}, "eager": {"ms": 1.2, "peak_MiB": 81.0}}}
    attn = {"op": "cross_attention", "shape": "blip2_qformer", "direction": "fwd",
            "impls": {"deco_ops": {"ms": 1.0, "peak_MiB": 3.0, "GBps": 1.0}, "sdpa_flash": {"ms": 1.1, "peak_MiB": 3.1},
                      "sdpa_math": {"ms": 9.0, "peak_MiB": 200.0}}}
    no_peak = {"op": "cross_attention", "shape": "qwenvl_resampler", "direction": "fwd",
               "impls": {"deco_ops": {"ms": 1.0, "peak_MiB": None}, "sdpa_cudnn": {"ms": 1.1, "peak_MiB": None}}}
    for rec in (pool, attn, no_peak):
        rec["speedup"] = report.speedups(rec)
    rows = {(r["op"], r["shape"]): r for r in report.check_bar([pool, attn, no_peak], {"copy_GBps": 1.0}, cpu=False)
            if r["kind"] == "memory" and r["direction"] == "fwd"}
    missed, met = rows["pool_mlp", "llava15_7b"], rows["cross_attention", "blip2_qformer"]
    assert missed["met"] is False and missed["status"].startswith("MISSED: 1.44x eager's peak")
    assert met["met"] is True and met["against"] == "sdpa_flash" and "0.97x sdpa_flash's peak" in met["status"]
    assert rows["cross_attention", "qwenvl_resampler"]["met"] is None
    assert "CUDA only" in rows["cross_attention", "qwenvl_resampler"]["status"]


def test_cpu_bar_reads_time_ratios():
    """The CPU path's targets: deco_ops' time within 1.1x of SDPA's (checked on CPU runs only)."""
    recs = []
    for shape, ms in (("blip2_qformer_cpu_b8", 1.05), ("blip2_qformer_cpu_b32", 1.2)):
        rec = {"op": "cross_attention", "shape": shape, "direction": "fwd",
               "impls": {"deco_ops": {"ms": ms}, "sdpa_flash": {"ms": 1.0}}}
        rec["speedup"] = report.speedups(rec)
        recs.append(rec)
    rows = {r["shape"]: r for r in report.check_bar(recs, {}, cpu=True) if r["direction"] == "fwd" and r["op"] == "cross_attention"}
    assert rows["blip2_qformer_cpu_b8"]["met"] is True and rows["blip2_qformer_cpu_b32"]["met"] is False
    assert "1.050x sdpa's time" in rows["blip2_qformer_cpu_b8"]["status"]
    assert not any(r["shape"] in shapes.CPU_PATH for r in report.check_bar(recs, {}, cpu=False))


def test_cpu_path_readme_table():
    rec = {"op": "pool_mlp", "shape": "llava15_cpu_b1", "direction": "fwd",
           "impls": {"deco_ops": {"ms": 100.0}, "deco_ops_composed": {"ms": 101.0}, "eager": {"ms": 105.0}}}
    rec["speedup"] = report.speedups(rec)
    data = {"meta": {"device": "CPU", "dtype": "float32", "torch": "2.x", "commit": "abc", "date": "2026-11-25T00:00",
                     "timer": "interleaved"}, "results": [rec]}
    data["bar"] = report.check_bar([rec], {}, cpu=True)
    text = readme_table.cpu_path_table(data, "results/cpu")
    assert "| pool_mlp | llava15_cpu_b1 | fwd | 100.00 | 105.00 (eager) | 0.952x | <= 1.05x: met | 101.00 | – |" in text
    assert text.count("\n| pool_mlp") == 1  # the rows not run are left out


def test_report_smoke(tmp_path):
    """``python -m benchmarks`` end to end on one tiny shape (CPU) or one real shape (CUDA)."""
    if torch.cuda.is_available():
        return  # the GPU run is benchmarks/run_gpu.sh's job
    assert report.main(["--quick", "--shapes", "infer_b1", "--directions", "fwd", "--out", str(tmp_path), "--no-plot"]) == 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.md").exists()
    text = (tmp_path / "results.md").read_text()
    assert "CPU smoke run" in text
    assert "| fwd | **deco_ops** (auto) |" in text and all(
        row.split("|")[4].strip() == "n/a" for row in text.splitlines() if row.startswith("| fwd |"))  # no GPU-only time
    assert cases.Env.default().device.type == "cpu"


def test_merge_counts():
    """Patch merger: first GEMM over M = tokens/4 merged rows of K = 4C; backward adds dZ, dW2 and,
    with the norm trained, dW1 and d(norm output) = dZ W1."""
    s = shapes.MERGE["qwen2vl_7b_merger"]
    M, K, hidden, out = 4 * 56 * 56 // 4, 5120, 5120, 3584
    assert (s.tokens, s.merged) == (4 * 3136, M)
    f, b = counts.merge_mlp_shape(s, 2, "fwd")
    assert f == 2 * M * hidden * K + 2 * M * hidden * out
    assert b == (M * K + 2 * 1280 + hidden * K + hidden + out * hidden + out + M * out) * 2
    fb, _ = counts.merge_mlp_shape(s, 2, "fwd_bwd")
    assert fb == f + 4 * M * hidden * out + 4 * M * hidden * K
