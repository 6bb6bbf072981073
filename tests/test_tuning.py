"""How a CUDA launch picks its tile config (deco_ops.kernels._tuning): bucketed keys, one timing per
bucket, DECO_OPS_AUTOTUNE=0, the per-GPU tuning tables and ``python -m deco_ops.tune --dry-run``.

Triton's interpreter cannot time configs, so the selection logic runs here on a stand-in kernel:
Triton's own ``Autotuner.run`` with its timer (``do_bench``) replaced by a fake clock."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
import triton

import deco_ops  # noqa: F401  (installs the tuning-table lookup)
from deco_ops import shapes, strategy, tune, tuning_tables
from deco_ops.kernels import _tuning

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=2) for b, w in [(128, 8), (64, 4), (32, 4), (16, 2)]]
FAST = CONFIGS[2]  # what the fake clock measures fastest


class StandIn:
    """A JIT function's face to ``Autotuner``: ``arg_names``, ``fn`` and ``run`` (records launches)."""

    arg_names = ["x_ptr", "M", "N", "FLAG"]

    def __init__(self):
        self.launched = []

        def stand_in_kernel(x_ptr, M, N, FLAG):
            pass

        self.fn = stand_in_kernel

    def run(self, *args, grid, warmup, **kwargs):
        self.launched.append({k: kwargs[k] for k in ("BLOCK", "num_warps")})


@pytest.fixture
def kernel(monkeypatch):
    """A TunedKernel keyed on (M bucketed, N exact, FLAG); FLAG=True prunes the first config.
    ``kernel.timed`` lists every config the fake clock timed."""
    monkeypatch.delenv(_tuning.AUTOTUNE_ENV, raising=False)

    def prune(configs, named_args, **constexprs):
        return configs[1:] if constexprs["FLAG"] else configs

    k = _tuning.TunedKernel(StandIn(), CONFIGS, CONFIGS, key=["M", "N", "FLAG"], buckets=("M",), prune=prune)
    monkeypatch.setattr(_tuning, "TUNED_KERNELS", [k])
    k.timed = []

    def fake_do_bench(kernel_call, quantiles):
        """Triton's timer: runs the config once (the stand-in records which) and reports a time."""
        kernel_call()
        ran = k.fn.launched.pop()  # a timing run, not a launch of the op
        config = next(c for c in CONFIGS if as_launched(c) == ran)
        k.timed.append(config)
        return [0.1 if config == FAST else 1.0 + config.kwargs["BLOCK"] / 1000] * 3

    k.__dict__["do_bench"] = fake_do_bench  # over the cached_property (reading it needs a GPU driver)
    return k


def launch(k, M, N=4096, flag=True):
    x = torch.empty(1, dtype=torch.float16)
    k.run(x, M, N, grid=(1,), warmup=False, FLAG=flag)
    return k.fn.launched[-1]


def as_launched(config):
    return {"BLOCK": config.kwargs["BLOCK"], "num_warps": config.num_warps}


def test_bucket():
    assert [_tuning.bucket(n) for n in (1, 2, 3, 17, 144, 577, 1024)] == [1, 2, 4, 32, 256, 1024, 1024]
    assert [_tuning.bucket(n) for n in (1025, 4608, 8192, 9216)] == [2048, 8192, 8192, 16384]


def test_bucket_is_timed_once_and_serves_other_sizes(kernel):
    assert launch(kernel, 100) == as_launched(FAST)
    assert kernel.timed == CONFIGS[1:]  # the pruned candidates, each timed once
    assert kernel.triton_key({"x_ptr": torch.empty(1, dtype=torch.float16), "M": 100, "N": 4096, "FLAG": True}) \
        in kernel.cache  # our key is the one Triton's Autotuner.run cached under
    assert launch(kernel, 120) == as_launched(FAST)  # another batch size, same bucket (128): not timed
    assert len(kernel.timed) == 3
    launch(kernel, 300)  # a new bucket (512) is timed
    assert len(kernel.timed) == 6
    launch(kernel, 120, N=1024)  # weight dims are exact: a new bucket
    assert len(kernel.timed) == 9
    kernel.settle()  # the last new key's outcome is recorded at the next new key, or here
    assert sorted(kernel.chosen) == ["M=128 N=1024 FLAG=True | float16", "M=128 N=4096 FLAG=True | float16",
                                     "M=512 N=4096 FLAG=True | float16"]


def test_a_bucket_s_config_is_never_launched_where_it_does_not_fit(kernel, monkeypatch):
    """Fit rules read the exact call (a size the bucket rounds, a stride): a config chosen earlier
    for the bucket that they drop for this launch is not launched; the fitting ones are timed."""
    monkeypatch.setattr(kernel, "early_config_prune",
                        lambda configs, named_args, **kw: [c for c in configs[1:] if c is not FAST or named_args["M"] <= 100])
    assert launch(kernel, 100) == as_launched(FAST)
    assert launch(kernel, 120) == as_launched(CONFIGS[3])  # bucket 128 chose FAST, which 120 rows cannot run
    assert kernel.timed == [*CONFIGS[1:], CONFIGS[1], CONFIGS[3]]
    assert launch(kernel, 90) == as_launched(FAST)  # the bucket keeps its first choice, untimed
    assert len(kernel.timed) == 5


def test_autotune_off_launches_the_first_fitting_config_untimed(kernel, monkeypatch):
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, " 0\n")  # spaces around it (an env file) are free, as in every setting
    assert launch(kernel, 100, flag=True) == as_launched(CONFIGS[1])  # CONFIGS[0] pruned
    assert launch(kernel, 100, flag=False) == as_launched(CONFIGS[0])
    assert kernel.timed == []
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "2")
    with pytest.raises(ValueError, match="DECO_OPS_AUTOTUNE must be 0 or 1"):
        launch(kernel, 2048)
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, " ")  # set but empty: the default (on), as every deco_ops switch reads it
    assert launch(kernel, 2048) == as_launched(FAST) and kernel.timed  # timed, the fastest launched


def test_single_candidate_is_not_timed(kernel, monkeypatch):
    monkeypatch.setattr(kernel, "early_config_prune", lambda configs, named_args, **kw: configs[3:])
    assert launch(kernel, 100) == as_launched(CONFIGS[3])
    assert kernel.timed == []


def test_every_kernel_buckets_rows_and_key_lengths():
    with pytest.raises(ValueError, match=r"buckets \['rows'\] are not in the autotune key \['M', 'N', 'FLAG'\]"):
        _tuning.TunedKernel(StandIn(), CONFIGS, CONFIGS, key=["M", "N", "FLAG"], buckets=("rows",))  # M unbucketed
    kernels = {k.name: k for k in _tuning.TUNED_KERNELS if k.base_fn.__module__.startswith("deco_ops.kernels")}
    assert len(kernels) == 12  # 9 + the attention weights kernel + the TMA GEMM + the TMA attention forward
    for name, k in kernels.items():
        assert "M" in k.buckets, name
        assert k.buckets == ({"M", "N"} if name in (
            "cross_attention_fwd_kernel", "cross_attention_bwd_single_pass_kernel", "cross_attention_bwd_dkdv_kernel",
            "cross_attention_bwd_dq_kernel", "cross_attention_weights_kernel", "cross_attention_tma_kernel") else {"M"}), name


@pytest.fixture
def table_file(kernel, tmp_path, monkeypatch):
    """A table written from ``kernel``'s measurements and installed as the GPU's table, as a
    process on a (fake) GPU named 'Fake GPU' would read it; returns its path."""
    launch(kernel, 100)
    path = tmp_path / tuning_tables.file_name("Fake GPU")
    tuning_tables.write({"format": tuning_tables.FORMAT, "device": "Fake GPU", "triton": triton.__version__,
                         "kernels": tune.measured([kernel]), "strategies": {}}, path)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(path))
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    # our stand-in's tensors live on the CPU: look the table up as for cuda:0
    monkeypatch.setattr(_tuning, "table_lookup",
                        lambda name, device, label: tuning_tables.lookup(name, torch.device("cuda", 0), label))
    return path


def fresh(kernel, monkeypatch):
    """The same kernel in a new process: no key cached, no bucket chosen."""
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "chosen", {})
    kernel.timed.clear()
    return kernel


def test_table_round_trip_launches_its_config_untimed(kernel, table_file, monkeypatch):
    table = tuning_tables.read(table_file)
    entry = table["kernels"]["stand_in_kernel"]["M=128 N=4096 FLAG=True | float16"]
    assert entry["config"] == _tuning.config_dict(FAST) == {"kwargs": {"BLOCK": 32}, "num_warps": 4, "num_stages": 2}
    assert entry["timings_ms"][_tuning.config_label(FAST)] == 0.1
    k = fresh(kernel, monkeypatch)
    assert launch(k, 77) == as_launched(FAST)  # bucket 128 is in the table
    assert k.timed == []
    launch(k, 1000)  # bucket 1024 is not: timed once
    assert len(k.timed) == 3


def test_table_from_another_triton_minor_is_ignored(kernel, table_file, monkeypatch):
    """Configs are compiled and timed by triton: a table recorded under another major.minor (or
    without a record) is ignored as a whole, with a warning, and the bucket is timed."""
    table = tuning_tables.read(table_file)
    major, minor, *_ = triton.__version__.split(".")
    table["triton"] = f"{major}.{minor}.99"  # another patch release: still used
    tuning_tables.write(table, table_file)
    k = fresh(kernel, monkeypatch)
    assert launch(k, 77) == as_launched(FAST) and k.timed == []
    for recorded in (f"{major}.{int(minor) + 1}.0", f"{int(major) - 1}.{minor}.0", None):
        table["triton"] = recorded
        tuning_tables.write(table, table_file)
        monkeypatch.setattr(tuning_tables, "_tables", {})
        k = fresh(kernel, monkeypatch)
        with pytest.warns(UserWarning, match=f"ignoring the tuning table .* recorded under triton {recorded}, this is triton"):
            launch(k, 77)
        assert len(k.timed) == 3, recorded


def test_shipped_table_records_its_triton():
    """Every shipped table says which triton measured it (the H200 one: 3.6.0, as its run's env.txt)."""
    for path in tuning_tables.TABLE_DIR.glob("*.json"):
        assert tuning_tables.major_minor(tuning_tables.read(path)["triton"]) >= ("3", "4"), path


def test_no_timing_inside_a_cuda_graph_capture(kernel, monkeypatch):
    """A new bucket met while a CUDA graph is captured launches its first candidate untimed."""
    monkeypatch.setattr(_tuning, "capturing", lambda device: True)
    assert launch(kernel, 100) == as_launched(CONFIGS[1])  # CONFIGS[0] is pruned for FLAG=True
    assert kernel.timed == []


def test_stale_table_entry_is_never_launched(kernel, table_file, monkeypatch):
    table = tuning_tables.read(table_file)
    table["kernels"]["stand_in_kernel"]["M=128 N=4096 FLAG=True | float16"]["config"] = _tuning.config_dict(CONFIGS[0])
    tuning_tables.write(table, table_file)  # CONFIGS[0] is pruned for FLAG=True
    k = fresh(kernel, monkeypatch)
    assert launch(k, 77) == as_launched(FAST)
    assert len(k.timed) == 3


def test_no_table_and_table_strategies_preloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setenv(tuning_tables.ENV_VAR, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no table is no table of another triton: nothing to warn about
        assert tuning_tables.lookup("pool_gemm_kernel", torch.device("cuda", 0), "M=1") is None
    monkeypatch.setenv(tuning_tables.ENV_VAR, " None ")  # the setting's spelling, as every variable's, is free
    assert tuning_tables.table_path("Fake GPU") is None
    preloaded = []
    monkeypatch.setattr(strategy, "preload", lambda table, keep_agreed: preloaded.append(table))
    path = tmp_path / "t.json"
    key = "pool_mlp|Fake GPU|bfloat16|M=256,N=4096|grad|any"
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {},
                         "strategies": {key: "composed"}}, path)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(path))
    assert tuning_tables.lookup("pool_gemm_kernel", torch.device("cuda", 0), "M=1") is None
    tuning_tables.load(torch.device("cuda", 0))
    assert preloaded == [{key: "composed"}]  # once per process
    path.write_text('{"format": 0}')
    monkeypatch.setattr(tuning_tables, "_tables", {})
    with pytest.raises(ValueError, match="not a deco_ops tuning table"):
        tuning_tables.load(torch.device("cuda", 0))
    monkeypatch.delenv(tuning_tables.ENV_VAR)  # a GPU no table was shipped for: no table, no error
    monkeypatch.setattr(tuning_tables, "TABLE_DIR", tmp_path / "shipped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning_tables.load_named("Fake GPU") == {} and tuning_tables.read(tmp_path / "t2.json") == {}


def test_output_path_names_the_gpu(tmp_path):
    assert tuning_tables.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert tuning_tables.file_name(" Fake GPU 1.5 (PCIe) ") == "Fake_GPU_1.5_PCIe.json"
    assert tune.output_path(tmp_path, "NVIDIA H100 80GB HBM3") == tmp_path / "NVIDIA_H100_80GB_HBM3.json"
    assert tune.output_path(tmp_path / "t.json", "x") == tmp_path / "t.json"
    assert tune.output_path(None, "A100").parent == tuning_tables.TABLE_DIR


def test_tune_dry_run_lists_ops_buckets_and_candidates(capsys):
    assert tune.main(["--dry-run", "--shapes", "infer_b1", "blip2_qformer"]) == 0
    out = capsys.readouterr().out
    assert "infer_b1  pool_mlp  bf16" in out and "blip2_qformer  cross_attention  bf16" in out
    # LLaVA-1.5 at batch 1: 144 pooled rows -> bucket 256; BLIP-2's 257 keys -> bucket 512
    assert "pool_gemm_kernel  [M=256 N=4096 K=1024 WT=1 WH=2 WW=2 STORE_PRE=False" in out
    assert "gemm_act_grad_kernel  [M=256 N=4096 K=4096 | bfloat16" in out
    assert "cross_attention_fwd_kernel  [M=32 N=512 BLOCK_D=64" in out
    assert "cross_attention_bwd_single_pass_kernel  [M=32 N=512" in out
    assert "5 candidates (timed):\n      BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,w8,s2" in out
    # pruned as for an H100 on a CPU: BLIP-2's forward keeps its 64x128 tile, which an A100 (sm_80) cannot fit
    forward = out.split("  cross_attention_fwd_kernel  [M=32 N=512")[1].split("  cross_attention_bwd")[0]
    assert "]  7 candidates (timed):" in forward and "      BLOCK_M=64,BLOCK_N=128,w4,s3\n" in forward


def test_tune_dry_run_plans_every_kind_of_named_shape(capsys):
    """Each shape family of deco_ops/shapes.py has a workload (the merge projectors once had none,
    which a real tuning run would have met only on the GPU)."""
    from deco_ops import shapes

    kinds = {}
    for name in shapes.select(None):
        kinds.setdefault(type(shapes.ALL[name]), name)
    assert len(kinds) == 5, kinds
    assert tune.main(["--dry-run", "--shapes", *kinds.values()]) == 0
    out = capsys.readouterr().out
    for name in kinds.values():
        assert f"\n{name}  " in f"\n{out}", name
    assert "merge_gemm_kernel  [" in out
    assert "PACKED=True MODE=0 INPUT_PRECISION=tf32 | bfloat16" in out and "]  1 candidates (single candidate, not timed):" in out


@pytest.mark.parametrize("spec, inference_gemms", [
    ("pool_mlp:batch=2,grid=8x8,out_grid=4x4,in_features=64,hidden=96,out_features=32", 1),
    ("mlp_pool:batch=2,grid=8x8,out_grid=4x4,in_features=64,hidden=96,out_features=32", 0),
    ("merge_mlp:batch=2,grid=8x8,in_features=32,hidden=96,out_features=32,order=grid,norm=layernorm,"
     "norm_position=pre,eps=1e-6,merge=2", 1),
])
def test_tune_dry_run_skips_the_gemms_inside_the_ops(spec, inference_gemms):
    """--dry-run launches nothing, host GEMMs included: the ones inside a deco op's body (which
    runs below the dispatcher, where a dispatch mode is off the stack) reach ``SkipHostWork``
    too, in the forward as in every backward. Before, a forward's did not (nor ``aten.linear``,
    which arrives undecomposed there): llava15_7b's dry run spent 22 s in three real ``F.linear``
    calls on the host, all 18 named shapes in bf16 and fp16 14 min of CPU time (now 13 s)."""
    aten = torch.ops.aten
    gemms, skipped = {aten.linear, aten.matmul, aten.mm, aten.addmm, aten.bmm, aten.baddbmm}, []

    class Counting(tune.SkipHostWork):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in gemms:
                skipped.append(func)
            return super().__torch_dispatch__(func, types, args, kwargs)

    work = tune.workload(shapes.parse(spec), torch.device("cpu"), torch.float32)
    counts = []
    with deco_ops.use_backend("triton"), _tuning.planning():
        for leaves in work.grad_sets:
            one = tune.Workload(work.op, work.forward, [leaves])
            one.leaves = work.leaves
            with Counting():
                one.run()
            counts.append(len(skipped))
            skipped.clear()
    # inference: the GEMMs inside the op's body not fused into a kernel (the second Linear after a
    # fused pool_mlp or merge kernel; composed, both; mlp_pool's fused forward has none); with
    # trained weights their gradients' GEMMs besides (at least dW1 and dW2), then the tokens' too
    assert counts[0] >= inference_gemms and counts[1] >= counts[0] + 2 and counts[2] >= counts[1], counts


def test_shape_spec_gives_each_kind_and_names_what_is_wrong():
    from deco_ops import shapes

    pool = shapes.parse("pool_mlp:batch=8,grid=27x27,out_grid=12x12,in_features=1152,hidden=3584,out_features=3584")
    assert pool == shapes.PoolMLPShape(pool.name, 8, (27, 27), (12, 12), 1152, 3584, 3584)
    assert pool.name.startswith("pool_mlp:batch=8")
    attention = shapes.parse("cross_attention:name= mine ,batch=3,M=64,N=700,heads=8,head_dim=80,shared_q=false,kv_lens=700x650x3")
    assert attention == shapes.AttentionShape("mine", 3, 64, 700, 8, 80, shared_q=False, kv_lens=(700, 650, 3))
    assert shapes.parse("cross_attention:batch=3,M=64,N=700,heads=8,head_dim=80").shared_q  # the default: one query set
    merge = shapes.parse("merge_mlp:batch=2,grid=32x32,in_features=1024,hidden=4096,out_features=4096,order=grid,"
                         "norm=layernorm,norm_position=post,eps=1e-5,merge=4")
    assert (merge.merge, merge.eps, merge.order) == (4, 1e-5, "grid")
    assert shapes.parse("mlp_pool:batch=1,grid=8x27x27,out_grid=8x14x14,in_features=1152,hidden=3584,"
                        "out_features=3584,mode=bilinear").mode == "bilinear"
    assert shapes.parse("mlp_pool:batch=1,grid=8x8,out_grid=4x4,in_features=8,hidden=8,out_features=8").mode == "average"
    for spec, message in [("pool_mlp", "must be KIND:field=value"), ("resampler:batch=1", "KIND one of"),
                          ("pool_mlp:batch=8", r"lacks \['grid', 'out_grid', 'in_features', 'hidden', 'out_features'\]"),
                          ("pool_mlp:batch=8,heads=2", "'heads=2' is not field=value with a field of pool_mlp"),
                          ("pool_mlp:batch=8,tiny=1", "'tiny=1' is not field=value"),
                          ("cross_attention:batch=two", "batch='two' does not parse as int"),
                          ("cross_attention:shared_q=maybe", "shared_q='maybe' does not parse as bool"),
                          ("pool_mlp:grid=24,24", "'24' is not field=value")]:
        with pytest.raises(ValueError, match=message):
            shapes.parse(spec)
    with pytest.raises(ValueError, match=r"unknown shape\(s\) \['llava15'\]"):  # a misspelt --shapes name, not an empty run
        shapes.select(["llava15", "infer_b1"])


def test_shape_spec_booleans_anyres_grids_and_device_choice():
    """A spec's booleans are true/false (any case) or 1/0; the AnyRes benchmark's unpadded grids
    are LLaVA-NeXT's own ``unpad_image`` crops of the 48x48 tile grid; a GPU (a torch.device or its
    name) gets the real shape, anything else its tiny twin."""
    real = shapes.ALL["llava15_7b"]
    assert [shapes.for_device(real, d) for d in (torch.device("cuda", 0), "cuda", torch.device("cpu"))] == [real, real, real.tiny]
    assert all(shapes.for_device(s, "cpu") is s for s in shapes.CPU_PATH.values())  # no twin: the real shape everywhere
    spec = "cross_attention:batch=1,M=2,N=3,heads=1,head_dim=8,shared_q="
    assert [shapes.parse(spec + v).shared_q for v in ("1", "0", "True", "false")] == [True, False, True, False]
    anyres = shapes.PACKED["anyres_5tiles"]  # each image's base grid, then its own crop (width x height, not transposed)
    assert anyres.grids[1::2] == tuple(shapes.llava_next_unpadded_grid(w, h) for w, h in shapes._ANYRES_IMAGES)
    unpad_image = pytest.importorskip("transformers.models.llava_next.modeling_llava_next").unpad_image
    for width, height in shapes._ANYRES_IMAGES:
        assert shapes.llava_next_unpadded_grid(width, height) == tuple(unpad_image(torch.empty(1, 48, 48), (height, width)).shape[1:])


def test_tune_dry_run_of_own_shape_only(capsys):
    """--shape alone plans that shape and no named one; a bad spec is a usage error naming it."""
    assert tune.main(["--dry-run", "--shape", "pool_mlp:name=mine,batch=3,grid=20x20,out_grid=10x10,"
                                              "in_features=64,hidden=96,out_features=32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mine  pool_mlp  bf16") and "infer_b1" not in out
    assert "pool_gemm_kernel  [M=512 N=96 K=64 WT=1 WH=2 WW=2" in out  # 300 pooled rows -> bucket 512
    with pytest.raises(SystemExit):
        tune.main(["--dry-run", "--shape", "pool_mlp:batch=3"])
    assert "lacks ['grid'" in capsys.readouterr().err


def test_a_tuned_shape_runs_inference_then_trained_weights_then_its_tokens_too():
    """Each shape runs with no gradient, then with the weights needing one, then with the tokens
    too, so every kernel variant of the op launches; only the current set requires a gradient."""
    shape = shapes.parse("pool_mlp:name=mine,batch=1,grid=4x4,out_grid=2x2,in_features=8,hidden=16,out_features=8")
    work = tune.workload(shape, torch.device("cpu"), torch.float32)
    forward, seen = work.forward, []

    def recorded():
        seen.append((torch.is_grad_enabled(), [t.requires_grad for t in work.leaves]))
        return forward()

    work.forward = recorded
    work.run()
    w, x = [False] * 4, [False]  # leaves: the weights first (w1, b1, w2, b2), then the tokens
    assert [t.shape for t in work.leaves] == [(16, 8), (16,), (8, 16), (8,), (1, 16, 8)]
    assert seen == [(False, w + x), (True, [True] * 4 + x), (True, [True] * 5)]
    assert all(t.grad is not None and t.grad.isfinite().all() for t in work.leaves)


def test_tuned_attention_and_merge_shapes_run_as_their_models_do():
    """An attention shape runs its shared queries (one set for the batch) over its ``kv_lens``, then
    with q, k and v all needing a gradient; a merge shape with a pre-merge LayerNorm runs its norm's
    weight and bias, trained beside the MLP's weights, then its tokens too."""
    from harness import assert_close

    from deco_ops import reference_attention

    spec = "cross_attention:name=a,batch=2,M=3,N=5,heads=1,head_dim=8,shared_q=true,kv_lens=5x2"
    attention = tune.workload(shapes.parse(spec), torch.device("cpu"), torch.float32)
    q, k, v = attention.leaves
    assert q.shape == (1, 3, 1, 8) and k.shape == v.shape == (2, 5, 1, 8)
    ref = reference_attention.attention_dense(q.double().expand(2, -1, -1, -1), k.double(), v.double(),
                                              kv_lens=torch.tensor([5, 2]))
    assert_close(attention.forward(), ref, torch.float32)
    spec = ("merge_mlp:name=m,batch=1,grid=4x4,in_features=3,hidden=8,out_features=5,order=block,norm=layernorm,"
            "norm_position=pre,eps=1e-5")
    merge = tune.workload(shapes.parse(spec), torch.device("cpu"), torch.float32)
    assert [tuple(t.shape) for t in merge.leaves] == [(8, 12), (8,), (5, 8), (5,), (3,), (3,), (16, 3)]
    for work, trained in ((attention, 3), (merge, 6)):
        forward, seen = work.forward, []
        work.forward = lambda forward=forward, work=work: seen.append([t.requires_grad for t in work.leaves]) or forward()
        work.run()
        n = len(work.leaves)
        assert seen == [[False] * n, [True] * trained + [False] * (n - trained), [True] * n][:len(work.grad_sets)], work.op
        assert all(t.grad is not None and t.grad.isfinite().all() for t in work.leaves), work.op


def test_a_named_table_may_start_with_a_tilde(tmp_path, monkeypatch):
    """``DECO_OPS_TUNING_TABLE=~/t.json`` (quoted in a launcher's env file, so no shell expanded
    it) is the home's ``t.json``, as ``DECO_OPS_CACHE_DIR``'s ``~`` is; until 2026-12-07 every op
    call raised that it is not a file."""
    monkeypatch.setenv("HOME", str(tmp_path))
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {}}, tmp_path / "t.json")
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setenv(tuning_tables.ENV_VAR, "~/t.json")
    assert tuning_tables.table_path("Fake GPU") == tmp_path / "t.json"
    assert tuning_tables.load_named("Fake GPU")["format"] == tuning_tables.FORMAT


@pytest.mark.parametrize("where", ["missing.json", "."])
def test_a_table_named_but_not_there_raises_naming_the_variable(where, tmp_path, monkeypatch):
    """``DECO_OPS_TUNING_TABLE`` naming no file (a typo, a directory) raises where the table is
    loaded, naming the variable, instead of running without the table the user asked for."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(tmp_path / where))
    with pytest.raises(ValueError, match="DECO_OPS_TUNING_TABLE=.* is not a file"):
        tuning_tables.load_named("Fake GPU")


def test_extending_a_table_of_another_gpu_drops_its_entries_with_a_warning(tmp_path, capsys):
    """``--out t.json`` naming a table measured on another GPU: its entries are dropped, with a
    printed warning, as docs/strategy.md says (until 2026-12-07 silently, unlike another triton's);
    no table at the path drops nothing and says nothing."""
    path = tmp_path / "t.json"
    old = {"format": tuning_tables.FORMAT, "device": "Other GPU", "triton": triton.__version__, "kernels": {}}
    assert tune.extendable(old, "Fake GPU", path) == {}
    assert f"{path} was measured on Other GPU, this is Fake GPU" in capsys.readouterr().out
    assert tune.extendable({}, "Fake GPU", path) == {}
    assert capsys.readouterr().out == ""


def test_extending_a_table_of_another_triton_drops_its_entries(tmp_path, monkeypatch, capsys):
    """``python -m deco_ops.tune`` extends an existing table only where this GPU measured it under
    this triton's major.minor: another triton's configs and timings would otherwise be written on
    under the new version, which then serves them as its own."""
    major, minor, *_ = triton.__version__.split(".")
    path = tmp_path / "t.json"
    old = {"format": tuning_tables.FORMAT, "device": "Fake GPU", "triton": f"{major}.{int(minor) + 1}.0",
           "shapes": ["old"], "kernels": {"k": {"M=1 | float16": {"config": {}, "timings_ms": {}}}},
           "strategies": {"pool_mlp|Fake GPU|bfloat16|rows=1|grad|any|v": "composed"}}
    assert tune.extendable(old, "Fake GPU", path) == {}
    assert f"{path} was measured under triton {major}.{int(minor) + 1}.0" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_tuning, "TUNED_KERNELS", [])
    monkeypatch.setattr(strategy, "_decisions", {})
    written = tune.table(torch.device("cuda", 0), ["new"], tune.extendable(old, "Fake GPU", path))
    assert (written["kernels"], written["strategies"], written["shapes"]) == ({}, {}, ["new"])
    same = {**old, "triton": f"{major}.{minor}.99"}  # another patch release: extended
    assert tune.extendable(same, "Fake GPU", path) is same
    assert tune.extendable(same, "Other GPU", path) == {}


def test_extending_a_table_keeps_its_entries_and_replaces_what_was_measured_again(kernel, monkeypatch):
    """A table of this GPU and triton is extended: its other buckets (of a re-measured kernel too),
    kernels, strategy decisions and shapes stay; a bucket or decision measured again takes the new
    winner. Timings are Triton's medians (the first of median, p20, p80), None for a config that failed."""
    launch(kernel, 100)  # times the bucket M=128 N=4096 FLAG=True
    label = "M=128 N=4096 FLAG=True | float16"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    old = {"config": _tuning.config_dict(CONFIGS[0]), "timings_ms": {"BLOCK=128,w8,s2": 2.0}}
    other = {"config": _tuning.config_dict(CONFIGS[3]), "timings_ms": {"BLOCK=16,w2,s2": 0.5}}
    key = "pool_mlp|Fake GPU|bfloat16|rows=1|grad|any|v"
    previous = {"format": tuning_tables.FORMAT, "device": "Fake GPU", "triton": triton.__version__, "shapes": ["old"],
                "kernels": {kernel.name: {label: old, "M=1 N=8 FLAG=True | float16": other}, "other_kernel": {"M=1 | float16": other}},
                "strategies": {key: "composed", key.replace("rows=1", "rows=2"): "fused"}}
    monkeypatch.setattr(strategy, "_decisions", {key: "fused"})
    written = tune.table(torch.device("cuda", 0), ["new"], previous)
    measured = {"config": _tuning.config_dict(FAST),
                "timings_ms": {"BLOCK=64,w4,s2": 1.064, "BLOCK=32,w4,s2": 0.1, "BLOCK=16,w2,s2": 1.016}}
    assert written["kernels"] == {kernel.name: {label: measured, "M=1 N=8 FLAG=True | float16": other},
                                  "other_kernel": {"M=1 | float16": other}}
    assert written["strategies"] == {key: "fused", key.replace("rows=1", "rows=2"): "fused"}
    assert written["shapes"] == ["new", "old"]
    assert (written["device"], written["capability"], written["triton"]) == ("Fake GPU", [9, 0], triton.__version__)
    assert tune._ms([0.4, 0.3, 0.6]) == 0.4 and tune._ms(0.25) == 0.25 and tune._ms([math.inf] * 3) is None


@pytest.mark.parametrize("text,problem", [
    ('{"format": 1, "triton": "3.6.0", ', "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),  # nested past Python's stack: raised RecursionError until 2026-12-07
    ('["format", 1]', "not a deco_ops tuning table of format 1"),
    ('{"kernels": {}, "strategies": {}}', "not a deco_ops tuning table of format 1"),
    ('{"format": 1, "strategies": ["x"]}', "its 'strategies' must be an object"),
    ('{"format": 1, "kernels": 3}', "its 'kernels' must be an object"),
    ('{"format": 1, "triton": 3.9}', "its 'triton' must be a string, got 3.9"),
    ('{"format": 1, "kernels": {"pool_gemm_kernel": []}}', "its kernels['pool_gemm_kernel'] must map bucket labels"),
    ('{"format": 1, "kernels": {"k": {"M=1 | float16": "x"}}}', "its kernels['k'] must map bucket labels"),
    ('{"format": 1, "kernels": {"k": {"M=1 | float16": {"ms": 1.0}}}}', "its kernels['k'] must map bucket labels"),
    ('{"format": 1, "triton": "%s", "strategies": {"a|b": "fused"}}' % triton.__version__, "'a|b' is not a strategy key"),
])
@pytest.mark.parametrize("named", [True, False, None], ids=["named", "unset", "blank"])
def test_a_bad_table_raises_naming_the_file_and_the_variable(text, problem, named, tmp_path, monkeypatch):
    """A table that is no deco_ops table raises a ValueError that names the file, and
    ``DECO_OPS_TUNING_TABLE`` where the variable named it (not where it is unset or blank: the
    shipped table), with what is wrong."""
    path = tmp_path / tuning_tables.file_name("Fake GPU")
    path.write_text(text)
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setattr(tuning_tables, "TABLE_DIR", tmp_path)
    if named is None:
        monkeypatch.setenv(tuning_tables.ENV_VAR, " ")
    elif named:
        monkeypatch.setenv(tuning_tables.ENV_VAR, str(path))
    else:
        monkeypatch.delenv(tuning_tables.ENV_VAR, raising=False)
    with pytest.raises(ValueError) as raised:
        tuning_tables.load_named("Fake GPU")
    message = str(raised.value)
    assert str(path) in message and problem in message
    assert message.startswith(f"{tuning_tables.ENV_VAR}: ") is bool(named)


def test_interpreter_switch_is_read_as_triton_reads_it(monkeypatch):
    """``TRITON_INTERPRET`` is true for deco_ops exactly where it is for triton (any case of 1,
    true, on, yes, y; nothing stripped): where they disagreed, deco_ops would launch interpreter
    configs on a GPU or compiled ones in the interpreter."""
    from triton._C.libtriton import getenv_bool

    for value in ("1", "true", "TRUE", "On", "yes", "Y", "0", "", "off", "no", " 1", "1 ", "2", "t"):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        expected = getenv_bool("TRITON_INTERPRET", False)
        assert deco_ops._backend.interpreting() is expected, value
        assert _tuning.env_true(value) is expected and _tuning.env_true(value.encode()) is expected, value
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not deco_ops._backend.interpreting() and not _tuning.env_true(None)


def test_interpreter_switch_keeps_a_triton_interpret_the_caller_set(monkeypatch):
    """``DECO_OPS_BACKEND=triton`` without a GPU switches the interpreter on where
    ``TRITON_INTERPRET`` is unset; a value the caller set (``0``: the op then says why it cannot
    run) is left as it is. Run in this process as at import, before triton is (no GPU, no triton)."""
    import sys

    monkeypatch.setenv("DECO_OPS_BACKEND", " Triton ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    deco_ops._backend._switch_on_interpreter()
    assert os.environ["TRITON_INTERPRET"] == "0"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # never with a GPU: its tensors run compiled
    deco_ops._backend._switch_on_interpreter()
    assert "TRITON_INTERPRET" not in os.environ
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    deco_ops._backend._switch_on_interpreter()
    assert os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("DECO_OPS_BACKEND")  # the default backend (auto) asks for no interpreter
    deco_ops._backend._switch_on_interpreter()
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only without a GPU")
@pytest.mark.parametrize("first", ["deco_ops", "triton"])
def test_backend_variable_switches_the_interpreter_on_only_before_triton(first):
    """``DECO_OPS_BACKEND=triton`` on a CPU-only machine switches Triton's interpreter on at
    ``import deco_ops``; where triton was imported first (``import transformers`` does it), its
    own jit functions are compiled-mode already and every kernel failed inside the interpreter
    (``InterpretedFunction`` calling a ``JITFunction``). Then the switch stays off and the op says why."""
    import subprocess
    import sys

    script = ("import triton\n" if first == "triton" else "") + (
        "import torch, deco_ops\n"
        "try:\n"
        "    print(tuple(deco_ops.adaptive_avg_pool_tokens(torch.randn(2, 16, 8), (4, 4), (2, 2)).shape))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n")
    spelling = " Triton " if first == "deco_ops" else "triton"  # case and spaces are free, as in every setting
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DECO_OPS_BACKEND": spelling}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(deco_ops.__file__)), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    if first == "deco_ops":
        assert run.stdout.strip() == "(2, 4, 8)", run.stdout
    else:
        assert "needs Triton's interpreter" in run.stdout and "before anything imports triton" in run.stdout, run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only without a GPU")
def test_interpreter_switched_on_after_import_is_refused_by_name():
    """``TRITON_INTERPRET=1`` (and ``DECO_OPS_BACKEND=triton``) set after ``import deco_ops`` come too
    late: the kernels were decorated compiled. The op says so, as where triton was imported first,
    instead of Triton's "0 active drivers" from inside the launch."""
    import subprocess
    import sys

    script = ("import os, torch, deco_ops\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "os.environ['DECO_OPS_BACKEND'] = 'triton'\n"
              "for call in (lambda: deco_ops.adaptive_avg_pool_tokens(torch.randn(2, 16, 8), (4, 4), (2, 2)),\n"
              "             lambda: deco_ops.cross_attention(*(torch.randn(1, 3, 2, 8) for _ in range(3)))):\n"
              "    try:\n"
              "        print(tuple(call().shape))\n"
              "    except RuntimeError as e:\n"
              "        print(e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DECO_OPS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(deco_ops.__file__)), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 2 and all("needs Triton's interpreter" in line and "too late" in line for line in lines), run.stdout


def test_a_launch_no_config_fits_raises_naming_the_kernel(kernel, monkeypatch):
    """A launch whose fit rules leave no config (its op's dispatch should have refused it) raises
    an error naming the kernel and the bucket, not an IndexError or Triton's ``min()`` of nothing."""
    monkeypatch.setattr(kernel, "early_config_prune", lambda configs, named_args, **constexprs: [])
    with pytest.raises(RuntimeError, match=r"no config of stand_in_kernel fits the launch M=128 N=4096 FLAG=True"):
        launch(kernel, 100)


def test_a_table_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """``tuning_tables.write`` replaces the file atomically: a write that fails half-way (a tuning
    run killed) leaves the previous table readable and no temporary file beside it. A rewrite keeps
    the file's mode; a new file, in a folder made for it, gets the mode ``open()`` gives (``_files``)."""
    path = tmp_path / "table.json"
    table = {"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {}, "strategies": {}}
    tuning_tables.write(table, path)

    def dump_half(obj, f, **kwargs):
        f.write('{"format": 1, "kern')
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning_tables.json, "dump", dump_half)
    with pytest.raises(KeyboardInterrupt):
        tuning_tables.write({**table, "kernels": {"k": {}}}, path)
    monkeypatch.undo()
    assert tuning_tables.read(path) == table and [p.name for p in tmp_path.iterdir()] == ["table.json"]
    for mode in (0o644, 0o600):  # a table shared between users stays readable to them once rewritten, a private one private
        path.chmod(mode)
        tuning_tables.write(table, path)
        assert path.stat().st_mode & 0o777 == mode
    assert path.read_text() == json.dumps(table, indent=1, sort_keys=True) + "\n"
    new = tmp_path / "new" / "table.json"  # a new file in a new folder (``tune --output``) gets open()'s mode
    tuning_tables.write(table, new)
    (tmp_path / "plain").open("w").close()
    assert new.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
