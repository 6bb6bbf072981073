"""deco_ops.strategy: the env var and context manager, the selection rules, the measured choice
(fake candidates and a fake timer: nothing is timed for real), the decision cache."""

import json

import pytest
import torch

import deco_ops
from deco_ops import strategy


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh decision table and on-disk cache per test."""
    monkeypatch.setenv(strategy.CACHE_DIR_ENV, str(tmp_path))
    strategy.forget()
    yield tmp_path
    strategy.forget()


class FakeTimer:
    def __init__(self, ms):
        self.ms, self.calls = ms, []

    def __call__(self, run):
        name = run()
        self.calls.append(name)
        return self.ms[name]


def _candidates(composed_deterministic=True):
    return {
        "fused": strategy.Candidate(lambda: "fused"),
        "composed": strategy.Candidate(lambda: "composed", deterministic=composed_deterministic),
    }


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    assert strategy.selected() == "auto"
    monkeypatch.setenv(strategy.ENV_VAR, "Composed ")
    assert strategy.selected() == "composed"
    with deco_ops.use_strategy("fused"):
        assert strategy.selected() == "fused"
        with deco_ops.use_strategy("auto"):
            assert strategy.selected() == "auto"
        assert strategy.selected() == "fused"
    assert strategy.selected() == "composed"
    monkeypatch.setenv(strategy.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DECO_OPS_STRATEGY must be one of"):
        strategy.selected()
    with pytest.raises(ValueError, match="strategy must be one of"), deco_ops.use_strategy("cublas"):
        pass


def test_selection_rules(monkeypatch):
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: True)  # the same rules on a GPU machine
    both, only_fused = _candidates(), {"fused": strategy.Candidate(lambda: "fused")}
    no_key = lambda: pytest.fail("nothing may be measured here")  # noqa: E731
    assert strategy.choose(both, on_triton=True, key=no_key) == "fused"  # interpreter: the kernels stay tested
    assert strategy.choose(both, on_triton=False, key=no_key) == "composed"  # PyTorch backend: its fast kernels
    assert strategy.choose(only_fused, on_triton=False, key=no_key) == "fused"
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(both, on_triton=True, key=no_key) == "composed"
        assert strategy.choose(only_fused, on_triton=True, key=no_key) == "fused"  # nothing else can express it
    with deco_ops.use_strategy("fused"):
        assert strategy.choose(both, on_triton=False, key=no_key) == "fused"


def test_measured_once_then_remembered(cache_dir):
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    key = "pool_mlp|GPU|bfloat16|rows=256|grad|any"
    assert strategy.decide(key, _candidates(), timer) == "composed"
    assert sorted(timer.calls) == ["composed", "fused"]
    assert strategy.decide(key, _candidates(), timer) == "composed"
    assert len(timer.calls) == 2  # not timed again
    assert strategy.choices() == {key: "composed"}
    on_disk = json.loads((cache_dir / strategy.CACHE_FILE).read_text())
    assert on_disk == {key: "composed"}
    # a new process (simulated) finds the decision on disk and times nothing
    strategy.forget()
    assert strategy.choices() == {}
    assert strategy.decide(key, _candidates(), FakeTimer({})) == "composed"
    assert strategy.choices() == {key: "composed"}
    # a second decision keeps the first in the file
    other = "pool_mlp|GPU|bfloat16|rows=512|grad|any"
    assert strategy.decide(other, _candidates(), FakeTimer({"fused": 1.0, "composed": 3.0})) == "fused"
    assert json.loads((cache_dir / strategy.CACHE_FILE).read_text()) == {key: "composed", other: "fused"}
    assert not [p for p in cache_dir.iterdir() if p.name != strategy.CACHE_FILE]  # no temporary file left behind


def test_preload_is_used_as_is(cache_dir):
    key = "cross_attention|GPU|float16|M=32,N=512,H=12,D=64,lens=0|infer|any"
    strategy.preload({key: "fused"})
    assert strategy.decide(key, _candidates(), FakeTimer({})) == "fused"  # the timer would fail if called
    assert strategy.choices() == {key: "fused"}
    table = strategy.choices()
    strategy.forget()
    strategy.preload(table)
    assert strategy.choices() == table
    with pytest.raises(ValueError, match="must be one of"):
        strategy.preload({key: "cublas"})
    with pytest.raises(ValueError, match="not a strategy key string"):
        strategy.preload({"pool_mlp": "fused"})


def test_deterministic_mode_filters_candidates(cache_dir, monkeypatch):
    key_any = "cross_attention_backward|GPU|bfloat16|M=32|grad|any"
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    assert strategy.decide(key_any, _candidates(composed_deterministic=False), timer) == "composed"
    # torch.use_deterministic_algorithms(True) itself costs ~10 s on first use here: the flag it sets is what counts
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    assert strategy.decide(key_any, _candidates(composed_deterministic=False), timer) == "fused"  # the cached winner is not allowed
    assert timer.calls == []  # one candidate left: nothing to time
    key_det = key_any.replace("|any", "|deterministic")
    assert strategy.make_key("op", torch.device("cpu"), torch.float32, True).endswith("|grad|deterministic")
    assert strategy.decide(key_det, _candidates(composed_deterministic=True), timer) == "composed"
    assert sorted(timer.calls) == ["composed", "fused"]


def test_keys_and_buckets():
    assert [strategy.bucket(n) for n in (1, 2, 3, 144, 1024, 1025, 1152, 1153)] == [1, 2, 4, 256, 1024, 2048, 2048, 2048]
    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=strategy.bucket(144), C=1024,
                            grid=(24, 24), act="gelu")
    assert key == "pool_mlp|cpu|bfloat16|rows=256,C=1024,grid=24x24,act=gelu|grad|any"
    strategy.preload({key: "composed"})  # a key make_key writes is one preload reads
    strategy.forget()


def test_unreadable_cache_is_ignored(cache_dir):
    (cache_dir / strategy.CACHE_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable strategy cache"):
        assert strategy.decide("k|d|t|s|grad|any", _candidates(), FakeTimer({"fused": 1.0, "composed": 2.0})) == "fused"
    assert json.loads((cache_dir / strategy.CACHE_FILE).read_text()) == {"k|d|t|s|grad|any": "fused"}


@pytest.mark.skipif(not deco_ops._backend.interpreting(), reason="runs the Triton kernels on CPU tensors (interpreter)")
def test_ops_measure_once_per_key(cache_dir, monkeypatch):
    """The ops' wiring of the measured path, as on CUDA: the first call of a key times both
    candidates (a fake timer here), the winner runs and is remembered under the op's key string;
    a batch size in the same bucket is not timed again."""
    from types import SimpleNamespace
    from unittest import mock

    from deco_ops import composed
    from deco_ops.kernels import pool_gemm
    from harness import randn

    monkeypatch.setattr(strategy, "_backend", SimpleNamespace(interpreting=lambda: False))
    timed = []

    def fake_timer(run):
        timed.append(run)
        run()
        return 1.0 if len(timed) % 2 == 0 else 2.0  # the second candidate timed (composed) wins

    monkeypatch.setattr(strategy, "_time_cuda", fake_timer)
    w1, w2 = randn(6, 8), randn(5, 6)
    with deco_ops.use_backend("triton"), deco_ops.use_strategy("auto"):
        with mock.patch.object(composed, "pool_mlp", wraps=composed.pool_mlp) as twin:
            deco_ops.pool_mlp(randn(3, 16, 8), w1, None, w2, None, grid=(4, 4), out_grid=(2, 2))
        assert len(timed) == 2 and twin.call_count == 2  # timed once (the fake timer runs once), then run
        assert strategy.choices() == {
            "pool_mlp|cpu|float32|rows=16,C=8,grid=4x4,out_grid=2x2,hidden=6,out=5,act=gelu|infer|any": "composed"
        }
        with mock.patch.object(pool_gemm, "pool_gemm", wraps=pool_gemm.pool_gemm) as kernel:
            deco_ops.pool_mlp(randn(4, 16, 8), w1, None, w2, None, grid=(4, 4), out_grid=(2, 2))  # 16 rows: same bucket
        assert len(timed) == 2 and not kernel.called
        q, k = randn(1, 5, 2, 16), randn(3, 9, 2, 16)
        deco_ops.cross_attention(q, k, k, kv_lens=torch.tensor([9, 0, 4]))
        assert len(timed) == 4
        assert strategy.choices()["cross_attention|cpu|float32|batch=4,M=8,N=16,H=2,D=16,q=shared,mask=lens|infer|any"] == "composed"


def test_shipped_table_decides_before_anything_is_timed(cache_dir, tmp_path, monkeypatch):
    """On CUDA a key's first measurement consults the GPU's tuning table first: its decision is
    used as it is, even when no kernel has launched yet (which is when kernels read the table)."""
    from deco_ops import tuning_tables

    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=256, C=1024)
    table = tmp_path / "table.json"
    tuning_tables.write({"format": tuning_tables.FORMAT, "kernels": {}, "strategies": {key: "composed"}}, table)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(table))
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "_time_cuda", lambda run: pytest.fail("a table decision must not be timed"))
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    assert strategy.choose(_candidates(), on_triton=True, key=lambda: key) == "composed"
