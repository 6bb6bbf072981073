"""How a CUDA launch picks its tile config (deco_ops.kernels._tuning): bucketed keys, one timing per
bucket, DECO_OPS_AUTOTUNE=0, the per-GPU tuning tables and ``python -m deco_ops.tune --dry-run``.

Triton's interpreter cannot time configs, so the selection logic runs here on a stand-in kernel:
Triton's own ``Autotuner.run`` with its timer (``do_bench``) replaced by a fake clock."""

from __future__ import annotations

import pytest
import torch
import triton

import deco_ops  # noqa: F401  (installs the tuning-table lookup)
from deco_ops import strategy, tune, tuning_tables
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


def test_autotune_off_launches_the_first_fitting_config_untimed(kernel, monkeypatch):
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "0")
    assert launch(kernel, 100, flag=True) == as_launched(CONFIGS[1])  # CONFIGS[0] pruned
    assert launch(kernel, 100, flag=False) == as_launched(CONFIGS[0])
    assert kernel.timed == []
    monkeypatch.setenv(_tuning.AUTOTUNE_ENV, "2")
    with pytest.raises(ValueError, match="DECO_OPS_AUTOTUNE must be 0 or 1"):
        launch(kernel, 2048)


def test_single_candidate_is_not_timed(kernel, monkeypatch):
    monkeypatch.setattr(kernel, "early_config_prune", lambda configs, named_args, **kw: configs[3:])
    assert launch(kernel, 100) == as_launched(CONFIGS[3])
    assert kernel.timed == []


def test_every_kernel_buckets_rows_and_key_lengths():
    kernels = {k.name: k for k in _tuning.TUNED_KERNELS if k.base_fn.__module__.startswith("deco_ops.kernels")}
    assert len(kernels) == 11
    for name, k in kernels.items():
        assert "M" in k.buckets, name
        assert k.buckets == ({"M", "N"} if name in (
            "cross_attention_fwd_kernel", "cross_attention_bwd_single_pass_kernel", "cross_attention_bwd_dkdv_kernel",
            "cross_attention_bwd_dq_kernel", "cross_attention_weights_kernel") else {"M"}), name


@pytest.fixture
def table_file(kernel, tmp_path, monkeypatch):
    """A table written from ``kernel``'s measurements and installed as the GPU's table, as a
    process on a (fake) GPU named 'Fake GPU' would read it; returns its path."""
    launch(kernel, 100)
    path = tmp_path / tuning_tables.file_name("Fake GPU")
    tuning_tables.write({"format": tuning_tables.FORMAT, "device": "Fake GPU", "kernels": tune.measured([kernel]),
                         "strategies": {}}, path)
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
    assert entry["config"] == _tuning.config_dict(FAST)
    assert entry["timings_ms"][_tuning.config_label(FAST)] == 0.1
    k = fresh(kernel, monkeypatch)
    assert launch(k, 77) == as_launched(FAST)  # bucket 128 is in the table
    assert k.timed == []
    launch(k, 1000)  # bucket 1024 is not: timed once
    assert len(k.timed) == 3


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
    assert tuning_tables.lookup("pool_gemm_kernel", torch.device("cuda", 0), "M=1") is None
    preloaded = []
    monkeypatch.setattr(strategy, "preload", preloaded.append)
    path = tmp_path / "t.json"
    key = "pool_mlp|Fake GPU|bfloat16|M=256,N=4096|grad|any"
    tuning_tables.write({"format": tuning_tables.FORMAT, "kernels": {}, "strategies": {key: "composed"}}, path)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(path))
    assert tuning_tables.lookup("pool_gemm_kernel", torch.device("cuda", 0), "M=1") is None
    tuning_tables.load(torch.device("cuda", 0))
    assert preloaded == [{key: "composed"}]  # once per process
    path.write_text('{"format": 0}')
    monkeypatch.setattr(tuning_tables, "_tables", {})
    with pytest.raises(ValueError, match="not a deco_ops tuning table"):
        tuning_tables.load(torch.device("cuda", 0))


def test_output_path_names_the_gpu(tmp_path):
    assert tuning_tables.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
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


def test_tune_dry_run_plans_every_kind_of_named_shape(capsys):
    """Each shape family of benchmarks/shapes.py has a workload (the merge projectors once had none,
    which a real tuning run would have met only on the GPU)."""
    from benchmarks import shapes

    kinds = {}
    for name in shapes.select(None):
        kinds.setdefault(type(shapes.ALL[name]), name)
    assert len(kinds) == 5, kinds
    assert tune.main(["--dry-run", "--shapes", *kinds.values()]) == 0
    out = capsys.readouterr().out
    for name in kinds.values():
        assert f"\n{name}  " in f"\n{out}", name
    assert "merge_gemm_kernel  [" in out
