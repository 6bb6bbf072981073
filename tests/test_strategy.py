"""deco_ops.strategy: the env var and context manager, the selection rules, the measured choice
(fake candidates and a fake timer: nothing is timed for real), the decision cache."""

import functools
import json
import os
import threading

import pytest
import torch
import triton

import deco_ops
from deco_ops import _setting, strategy


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
        with deco_ops.use_strategy(" AUTO "):  # spelled as the variable may be
            assert strategy.selected() == "auto"
        assert strategy.selected() == "fused"
    assert strategy.selected() == "composed"
    monkeypatch.setenv(strategy.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="DECO_OPS_STRATEGY must be one of"):
        strategy.selected()
    with pytest.raises(ValueError, match="strategy must be one of"), deco_ops.use_strategy("cublas"):
        pass
    with pytest.raises(ValueError, match="a setting named 'strategy' exists already"):  # its blocks would replace use_strategy's
        _setting.Setting("DECO_OPS_OTHER", ("auto",), "strategy")


@pytest.mark.parametrize("env", [None, "auto"])
def test_first_call_of_a_process_may_be_compiled(monkeypatch, env):
    """A process whose first deco_ops call is a compiled one: the settings have read nothing yet
    (their caches empty, as after import) when Dynamo traces the ops' checks, and AOTAutograd
    (``aot_eager``, as Inductor) then traces the ops' bodies, which read them too."""
    if env is None:
        monkeypatch.delenv(deco_ops._backend.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(deco_ops._backend.ENV_VAR, env)
    for setting in (deco_ops._backend.SETTING, strategy.SETTING):
        monkeypatch.setattr(setting, "_parsed", {})
    torch._dynamo.reset()
    proj = deco_ops.DeCoProjector(8, 6, grid=(4, 4), out_grid=(2, 2))
    x = torch.randn(2, 16, 8)
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager")
    first = compiled(x)
    assert torch.equal(first, proj(x))
    assert torch.equal(compiled(x), first)


def test_a_setting_read_while_a_compile_runs_is_not_remembered(monkeypatch):
    """On torch 2.10 and 2.11 ``torch.compiler.is_compiling()`` is False while AOTAutograd runs the
    traced graph (its metadata pass), which reads the settings again: remembering the value there
    failed the guard Dynamo had just built on the cache (the test above, on torch 2.10 and 2.11).
    Any read inside a compile's context leaves the cache as it was; outside, it is remembered."""
    monkeypatch.delenv(deco_ops._backend.ENV_VAR, raising=False)
    setting = deco_ops._backend.SETTING
    monkeypatch.setattr(setting, "_parsed", {})
    assert not torch.compiler.is_compiling()
    with torch._guards.compile_context(torch._guards.CompileContext(None)):
        assert setting.selected() == "auto"
    assert setting._parsed == {}
    assert setting.selected() == "auto"
    assert setting._parsed == {None: "auto"}


def test_a_process_whose_first_call_is_compiled_compiles_it_once(tmp_path):
    """The settings know the environment's values from import: the first compiled frame guards on
    them being known, so the eager calls inside it change nothing and the next identical call
    reuses the graph (it used to fail that guard and recompile once). A fresh process."""
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(
        "import torch, deco_ops\n"
        "from torch._dynamo.testing import CompileCounterWithBackend\n"
        "counter = CompileCounterWithBackend('aot_eager')\n"
        "proj = torch.compile(deco_ops.DeCoProjector(8, 6, grid=(4, 4), out_grid=(2, 2)), backend=counter, fullgraph=True)\n"
        "x = torch.randn(2, 16, 8)\n"
        "for _ in range(3):\n"
        "    proj(x)\n"
        "print(counter.frame_count)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DECO_OPS_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(deco_ops.__file__)), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "1"


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
    leftover = [p.name for p in cache_dir.iterdir() if p.name != strategy.CACHE_FILE]
    assert leftover == [strategy.CACHE_FILE + strategy.LOCK_SUFFIX]  # its lock file, no temporary file


class FakeStream:
    """A host clock and one GPU stream, in milliseconds: a call spends its host time, then queues its
    GPU time behind the stream's earlier work; a synchronisation waits for the stream. What
    ``_time_cuda`` measures, without a GPU or a real clock."""

    def __init__(self, host_ms, gpu_ms):
        self.now = self.gpu_done = 0.0
        self.host_ms, self.gpu_ms, self.calls = host_ms, gpu_ms, 0

    def candidates(self):
        return {name: strategy.Candidate(lambda name=name: self.call(name)) for name in self.host_ms}

    def call(self, name):
        self.now += self.host_ms[name]
        self.gpu_done = max(self.gpu_done, self.now) + self.gpu_ms[name]
        self.calls += 1
        return name

    def synchronize(self):
        self.now = max(self.now, self.gpu_done)

    def clock(self):
        return self.now / 1e3  # seconds, as time.perf_counter


def test_host_time_counts_where_it_outlasts_the_gpu(cache_dir, monkeypatch):
    """``auto`` times a call as a model's stream of calls pays it: the larger of its GPU time and
    its host time per call. A candidate with the faster kernels but 0.2 ms of host work per call
    loses to one whose kernels take 0.1 ms behind 0.02 ms of host work (GPU time alone, what
    ``do_bench`` sees behind its L2 flush, would pick the first); where the GPU work outlasts the
    host work, the GPU time decides."""
    fake = FakeStream(host_ms={"fused": 0.2, "composed": 0.02}, gpu_ms={"fused": 0.05, "composed": 0.1})
    monkeypatch.setattr(strategy, "_gpu_ms", lambda run: fake.gpu_ms[run()])
    monkeypatch.setattr(strategy.torch.cuda, "synchronize", fake.synchronize)
    monkeypatch.setattr(strategy, "_back_to_back_ms", functools.partial(strategy._back_to_back_ms, clock=fake.clock))
    assert strategy._time_cuda(fake.candidates()["fused"].run) == pytest.approx(0.2, rel=0.06)  # + the last kernel's tail
    assert strategy.decide("pool_mlp|GPU|bfloat16|rows=1|grad|any", fake.candidates(), strategy._time_cuda) == "composed"
    fake.gpu_ms = {"fused": 0.5, "composed": 0.6}  # GPU-bound: the host work hides behind the kernels
    assert strategy._time_cuda(fake.candidates()["composed"].run) == pytest.approx(0.6, rel=0.06)
    assert strategy.decide("pool_mlp|GPU|bfloat16|rows=4096|grad|any", fake.candidates(), strategy._time_cuda) == "fused"


@pytest.mark.parametrize("host_ms,gpu_ms,calls", [(0.002, 0.01, 203), (0.01, 0.3, 19), (1.0, 0.01, 6), (0.01, 100.0, 3)],
                         ids=["10us-call", "gpu-bound", "host-bound", "100ms-call"])
def test_back_to_back_rounds_stay_within_their_budget(host_ms, gpu_ms, calls):
    """A first round of 3 calls, then rounds of about a millisecond (3 to 50 calls), until 5 rounds
    or about 5 ms of calls: a slow call is run a few more times, host-bound or GPU-bound alike; the
    result is the larger of host and GPU time (plus a small tail of the round's last call)."""
    fake = FakeStream(host_ms={"fused": host_ms}, gpu_ms={"fused": gpu_ms})
    run = fake.candidates()["fused"].run
    ms = strategy._back_to_back_ms(run, fake.synchronize, gpu_ms, clock=fake.clock)
    assert fake.calls == calls
    assert max(host_ms, gpu_ms) <= ms <= max(host_ms, gpu_ms) * 1.05 + min(host_ms, gpu_ms)


def test_back_to_back_rounds_keep_the_best():
    """A round slowed by a busy host (its first call taking 10x) does not count against the
    candidate: the best round is the measurement."""
    fake = FakeStream(host_ms={}, gpu_ms={})
    slow = iter([1.0] + [0.1] * 300)

    def run():
        fake.now += next(slow)

    assert strategy._back_to_back_ms(run, fake.synchronize, 0.0, clock=fake.clock) == pytest.approx(0.1)


def test_decisions_are_timed_on_the_call_s_device(cache_dir, monkeypatch):
    """The candidates' kernels run on their inputs' device (the launchers' device guard); the
    timer's events and synchronisations, and the capture check, must act on that device too, not
    on the current one (inputs on ``cuda:1`` while ``cuda:0`` is current would time nothing of the
    GPU work). ``implementation`` passes the device of its arguments' first tensor."""
    import contextlib
    from unittest import mock

    current = ["cuda:0"]

    @contextlib.contextmanager
    def fake_device(device):  # torch.cuda.device, without a GPU
        before, current[0] = current[0], str(device)
        try:
            yield
        finally:
            current[0] = before

    timed_on = []
    monkeypatch.setattr(strategy.torch.cuda, "device", fake_device)
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "_time_cuda", lambda run: timed_on.append(current[0]) or {"fused": 2.0, "composed": 1.0}[run()])
    key = f"pool_mlp|GPU|bfloat16|rows=64|infer|any|{strategy.versions()}"
    assert strategy.choose(_candidates(), on_triton=True, key=lambda: key, device=torch.device("cuda", 1)) == "composed"
    assert timed_on == ["cuda:1", "cuda:1"] and current == ["cuda:0"]
    x = torch.randn(3)
    with mock.patch.object(strategy, "choose", return_value="fused") as choose:
        strategy.implementation((2, x), on_triton=True, key=lambda: key, fused=lambda *args: None)
    assert choose.call_args.kwargs["device"] == x.device


def test_opt_in_candidates_run_only_when_selected_by_name(cache_dir, monkeypatch):
    """A candidate no GPU has verified (``fused_tma``) never competes under ``auto``, even when it
    would time fastest or a cached decision names it; selected by name it runs."""
    with_tma = {**_candidates(), "fused_tma": strategy.Candidate(lambda: "fused_tma", opt_in=True)}
    timer = FakeTimer({"fused": 2.0, "composed": 3.0, "fused_tma": 0.1})
    key = f"cross_attention|GPU|float16|M=256,N=1024|infer|any|{strategy.versions()}"
    assert strategy.decide(key, with_tma, timer) == "fused"
    assert "fused_tma" not in timer.calls
    strategy.forget()
    strategy.preload({key: "fused_tma"})
    assert strategy._traced_choice(with_tma, lambda: key) == "fused"  # nor in a torch.compile trace
    assert strategy.decide(key, with_tma, FakeTimer({"fused": 2.0, "composed": 3.0})) == "fused"
    # an op offering it (``implementation``, as attention and the projectors do) never times it either
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "_time_cuda", FakeTimer({"fused": 2.0, "composed": 3.0, "fused_tma": 0.1}))
    run = strategy.implementation((), on_triton=True, key=lambda: key.replace("M=256", "M=512"), fused=lambda: "fused",
                                  composed=lambda: "composed", composed_kernels={"fused_tma": with_tma["fused_tma"]})
    assert run() == "fused"
    with deco_ops.use_strategy("fused_tma"):
        assert strategy.choose(with_tma, on_triton=True, key=lambda: key) == "fused_tma"
        assert strategy.choose(_candidates(), on_triton=True, key=lambda: key) == "fused"  # an op without it


def test_preload_is_used_as_is(cache_dir):
    key = f"cross_attention|GPU|float16|M=32,N=512,H=12,D=64,lens=0|infer|any|{strategy.versions()}"
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
    with pytest.raises(ValueError, match="not a strategy key string"):  # a key from before versions were recorded
        strategy.preload({key.rsplit("|", 1)[0]: "fused"})
    with pytest.raises(ValueError, match="not a strategy key string"):  # a field too many
        strategy.preload({f"{key}|extra": "fused"})
    with pytest.raises(TypeError, match=r"preload: table must be a mapping .*, got list"):  # was AttributeError: .items
        strategy.preload([(key, "fused")])


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
    assert strategy.make_key("op", torch.device("cpu"), torch.float32, True).endswith(f"|grad|deterministic|{strategy.versions()}")
    assert strategy.decide(key_det, _candidates(composed_deterministic=True), timer) == "composed"
    assert sorted(timer.calls) == ["composed", "fused"]
    # deterministic mode wins over a forced name: a non-deterministic twin (ATen's CUDA pooling
    # backward) never runs, forced by name or as ``composed``; the default runs instead
    no_key = lambda: pytest.fail("one deterministic candidate: nothing to look up")  # noqa: E731
    for forced in ("composed", "composed_aten"):
        with deco_ops.use_strategy(forced):
            assert strategy.choose(_candidates(composed_deterministic=False), on_triton=True, key=no_key) == "fused"
            assert strategy.choose(_candidates(composed_deterministic=True), on_triton=True, key=no_key) == "composed"
    named = {**_candidates(composed_deterministic=False), "composed_aten": strategy.Candidate(lambda: "composed_aten")}
    with deco_ops.use_strategy("composed_aten"):
        assert strategy.choose(named, on_triton=True, key=no_key) == "composed_aten"  # deterministic: it runs
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(named, on_triton=True, key=no_key) == "composed_aten"  # the only deterministic twin
    # no deterministic candidate at all: the first (the op's default) runs, as without a choice
    nondeterministic = {name: strategy.Candidate(c.run, deterministic=False) for name, c in _candidates().items()}
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    assert strategy.decide(key_det, nondeterministic, timer) == "fused" and timer.calls == []


def test_keys_and_buckets():
    assert [strategy.bucket(n) for n in (1, 2, 3, 144, 1024, 1025, 1152, 1153)] == [1, 2, 4, 256, 1024, 2048, 2048, 2048]
    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=strategy.bucket(144), C=1024,
                            grid=(24, 24), act="gelu")
    assert key == f"pool_mlp|cpu|bfloat16|rows=256,C=1024,grid=24x24,act=gelu|grad|any|{strategy.versions()}"
    strategy.preload({key: "composed"})  # a key make_key writes is one preload reads
    strategy.forget()


def test_unreadable_cache_is_ignored(cache_dir):
    (cache_dir / strategy.CACHE_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable strategy cache"):
        assert strategy.decide("k|d|t|s|grad|any", _candidates(), FakeTimer({"fused": 1.0, "composed": 2.0})) == "fused"
    assert json.loads((cache_dir / strategy.CACHE_FILE).read_text()) == {"k|d|t|s|grad|any": "fused"}
    (cache_dir / strategy.CACHE_FILE).unlink()
    (cache_dir / strategy.CACHE_FILE).mkdir()  # not a file at all: read and written with a warning each
    strategy.forget()
    with pytest.warns(UserWarning, match="unreadable strategy cache"), pytest.warns(UserWarning, match="could not write the strategy cache"):
        assert strategy.decide("k|d|t|s|grad|any", _candidates(), FakeTimer({"fused": 2.0, "composed": 1.0})) == "composed"


@pytest.mark.skipif(not deco_ops._backend.interpreting(), reason="runs the Triton kernels on CPU tensors (interpreter)")
def test_ops_measure_once_per_key(cache_dir, monkeypatch):
    """The ops' wiring of the measured path, as on CUDA: the first call of a key times both
    candidates (a fake timer here), the winner runs and is remembered under the op's key string;
    a batch size in the same bucket is not timed again. ``pool_mlp``'s composed twin pools with
    the pooling op's own choice, measured first under its own key."""
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
        assert len(timed) == 4 and twin.call_count == 2  # timed once (the fake timer runs once), then run
        assert strategy.choices() == {
            f"adaptive_avg_pool_tokens|cpu|float32|rows=16,C=8,grid=4x4,out_grid=2x2|infer|any|{strategy.versions()}": "composed",
            f"pool_mlp|cpu|float32|rows=16,C=8,grid=4x4,out_grid=2x2,hidden=6,out=5,act=gelu|infer|any|{strategy.versions()}": "composed",
        }
        with mock.patch.object(pool_gemm, "pool_gemm", wraps=pool_gemm.pool_gemm) as kernel:
            deco_ops.pool_mlp(randn(4, 16, 8), w1, None, w2, None, grid=(4, 4), out_grid=(2, 2))  # 16 rows: same bucket
        assert len(timed) == 4 and not kernel.called
        q, k = randn(1, 5, 2, 16), randn(3, 9, 2, 16)
        deco_ops.cross_attention(q, k, k, kv_lens=torch.tensor([9, 0, 4]))
        assert len(timed) == 6
        key = f"cross_attention|cpu|float32|batch=4,M=8,N=16,H=2,D=16,q=shared,mask=lens|infer|any|{strategy.versions()}"
        assert strategy.choices()[key] == "composed"
        deco_ops.cross_attention(q, k, k, kv_lens=torch.tensor([9, 0, 4]), attn_mask=torch.ones(9, dtype=torch.bool))
        assert len(timed) == 8  # a mask is another key
        assert strategy.choices()[key.replace("mask=lens", "mask=lens+bias")] == "composed"
        deco_ops.pool_mlp_packed(randn(24, 8), torch.tensor([[4, 4], [2, 4]]), w1, None, w2, None,
                                 out_grids=torch.tensor([[2, 2], [1, 3]]))
        assert len(timed) == 10
        key = f"pool_mlp_packed|cpu|float32|tokens=32,rows=8,C=8,hidden=6,out=5,act=gelu,mode=average|infer|any|{strategy.versions()}"
        assert strategy.choices()[key] == "composed"
        w1m = randn(6, 32)
        deco_ops.merge_mlp(randn(1, 16, 8), None, None, w1m, None, w2, None, grid=(4, 4), order="grid")
        assert len(timed) == 12
        key = (f"merge_mlp|cpu|float32|rows=4,C=8,hidden=6,out=5,merge=2,order=grid,packed=False,norm=layernorm,pre=True,"
               f"activation=gelu|infer|any|{strategy.versions()}")
        assert strategy.choices()[key] == "composed"
        deco_ops.merge_mlp(randn(1, 16, 8), None, None, w1m, None, w2, None)
        assert len(timed) == 14  # block order is another key
        assert strategy.choices()[key.replace("order=grid", "order=block")] == "composed"
        deco_ops.merge_mlp(randn(1, 16, 8), None, None, w1m.half(), None, w2.half(), None)
        assert len(timed) == 16  # so is a 16-bit MLP after a float32 norm
        assert strategy.choices()[key.replace("order=grid", "order=block").replace("gelu|", "gelu,mlp_dtype=float16|")] == "composed"


def test_cuda_unpooling_by_aten_is_not_deterministic(monkeypatch):
    """ATen's CUDA adaptive-pooling backward adds with float atomics where windows overlap
    (``torch.use_deterministic_algorithms`` rejects it), so on CUDA the composed unpooling is
    declared non-deterministic and deterministic mode keeps our kernel; on the CPU it is
    deterministic. The pooling forward is deterministic on both."""
    from types import SimpleNamespace

    from deco_ops import pooling

    offered = []
    monkeypatch.setattr(pooling.strategy, "implementation", lambda args, **kw: offered.append(kw))
    for device, deterministic in (("cuda", False), ("cpu", True)):
        tokens = SimpleNamespace(device=torch.device(device))
        with deco_ops.use_backend("auto"):
            pooling._unpool_implementation(tokens, [4, 4], [3, 3])
            pooling.pool_implementation(tokens, [4, 4], [3, 3])
        unpool, pool = offered[-2:]
        assert unpool.get("composed_deterministic", True) is deterministic, device
        assert pool.get("composed_deterministic", True) is True, device


@pytest.mark.parametrize("named", [True, False], ids=["variable", "shipped"])
def test_shipped_table_decides_before_anything_is_timed(named, cache_dir, tmp_path, monkeypatch):
    """On CUDA a key's first measurement, or a torch.compile trace's first choice, consults the
    GPU's tuning table first (``DECO_OPS_TUNING_TABLE``'s, or the one shipped for the GPU the key
    names): its decision is used as it is, even when no kernel has launched yet (which is when
    kernels read the table)."""
    from deco_ops import tuning_tables

    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=256, C=1024)
    table = tmp_path / ("table.json" if named else tuning_tables.file_name("cpu"))  # the key's device: cpu
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {}, "strategies": {key: "composed"}}, table)
    if named:
        monkeypatch.setenv(tuning_tables.ENV_VAR, str(table))
    else:
        monkeypatch.delenv(tuning_tables.ENV_VAR, raising=False)
        monkeypatch.setattr(tuning_tables, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "_time_cuda", lambda run: pytest.fail("a table decision must not be timed"))
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    assert strategy._traced_choice(_candidates(), lambda: key) == "composed"
    strategy.forget()
    assert strategy.choose(_candidates(), on_triton=True, key=lambda: key) == "composed"


def test_a_table_loaded_later_keeps_the_user_s_preloaded_decisions(cache_dir, tmp_path, monkeypatch):
    """A decision the user preloaded before the first call keeps its winner when the GPU's tuning
    table, read at that call, holds another for the key (until 2026-12-07 the table's replaced
    it, silently: ``preload`` then the first op call ran the table's choice). A key the user did
    not preload still takes the table's."""
    from deco_ops import tuning_tables

    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=256, C=1024)
    other = key.replace("rows=256", "rows=512")
    table = tmp_path / "table.json"
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {},
                         "strategies": {key: "fused", other: "composed"}}, table)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(table))
    monkeypatch.setattr(tuning_tables, "_tables", {})
    monkeypatch.setattr(strategy._backend, "interpreting", lambda: False)
    monkeypatch.setattr(strategy, "_time_cuda", lambda run: pytest.fail("a preloaded decision must not be timed"))
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    strategy.preload({key: "composed"})
    assert strategy.choose(_candidates(), on_triton=True, key=lambda: key) == "composed"
    assert strategy.choices() == {key: "composed", other: "composed"}


def test_a_forced_composed_reads_the_table_as_auto_would(cache_dir, tmp_path, monkeypatch):
    """A forced ``composed`` among several composed twins takes the GPU table's choice for the key
    from its first call, not only after an auto decision happened to load the table (the choice
    would depend on the calls' order, and differ between ranks)."""
    from deco_ops import tuning_tables

    key = strategy.make_key("cross_attention_backward", torch.device("cpu"), torch.bfloat16, True, M=48)
    table = tmp_path / "table.json"
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "kernels": {},
                         "strategies": {key: "composed_flash"}}, table)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(table))
    monkeypatch.setattr(tuning_tables, "_tables", {})
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: key) == "composed_flash"


def test_a_forced_composed_never_runs_fused_and_a_failing_default_raises(cache_dir):
    """A forced ``composed`` among several twins runs a composed one where the key's decision (an
    auto measurement) is ``fused``. While timing, the default candidate's error propagates (the
    op's own error); another candidate's only drops it, with a warning."""
    key = strategy.make_key("cross_attention_backward", torch.device("cpu"), torch.bfloat16, True, M=96)
    strategy.preload({key: "fused"})
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: key) == "composed_efficient"

    def broken():
        raise RuntimeError("this candidate cannot run")

    other = key.replace("M=96", "M=192")
    with pytest.raises(RuntimeError, match="this candidate cannot run"):
        strategy.decide(other, {"fused": strategy.Candidate(broken), "composed": strategy.Candidate(lambda: "composed")},
                        FakeTimer({"composed": 1.0}))
    with pytest.warns(UserWarning, match="the composed candidate failed"):
        assert strategy.decide(other, {"fused": strategy.Candidate(lambda: "fused"), "composed": strategy.Candidate(broken)},
                               FakeTimer({"fused": 1.0})) == "fused"


@pytest.mark.parametrize("text,warning", [
    ('["fused"]', "not a JSON object"),
    ('{"op|GPU|bfloat16|rows=1|grad|any|v": "Fused", "op|GPU|bfloat16|rows=2|grad|any|v": "fused"}',
     "ignoring 1 entries of the strategy cache .* 'Fused'"),
    ("[" * 100_000, "unreadable strategy cache .* maximum recursion depth"),  # raised RecursionError until 2026-12-07
])
def test_a_hand_edited_cache_warns_before_it_is_rewritten(text, warning, cache_dir):
    """A cache file that is not ``{key: winner}``, or an entry whose winner is not a candidate's
    name, is ignored with a warning (the next decision rewrites the file without it), never silently."""
    (cache_dir / strategy.CACHE_FILE).write_text(text)
    with pytest.warns(UserWarning, match=warning):
        strategy.decide("k|d|t|s|grad|any|v", _candidates(), FakeTimer({"fused": 1.0, "composed": 2.0}))


def test_keys_carry_the_versions_and_the_cache_serves_only_its_own(cache_dir):
    """A decision measured under other deco_ops / torch / triton versions is never served: the
    versions end every key, so an older key in the cache file simply does not match."""
    own, rest = strategy.versions().split(",", 1)
    assert own == f"deco_ops={deco_ops.__version__}"  # a source checkout's too: its pyproject.toml's version
    assert rest == f"torch={torch.__version__},triton={triton.__version__}"
    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=256)
    assert key.endswith(f"|{strategy.versions()}") and key.count("|") == strategy.KEY_FIELDS - 1
    older = key.replace(f"torch={torch.__version__}", "torch=2.0.0")
    (cache_dir / strategy.CACHE_FILE).write_text(json.dumps({older: "composed"}))
    timer = FakeTimer({"fused": 1.0, "composed": 2.0})
    assert strategy.decide(key, _candidates(), timer) == "fused"
    assert sorted(timer.calls) == ["composed", "fused"]  # measured anew
    assert json.loads((cache_dir / strategy.CACHE_FILE).read_text()) == {older: "composed", key: "fused"}


def test_capture_is_asked_only_where_cuda_is_initialised(monkeypatch):
    """A process that has not initialised CUDA cannot be capturing, and asking would initialise it,
    which fails in a worker forked from one that has (a gloo rank on the H200): neither the strategy
    nor a host-table copy asks there."""
    from deco_ops import _transfer

    def initialises(*_):
        raise AssertionError("asked whether the stream captures, initialising CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine's forked worker
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", initialises)
    assert not strategy.capturing()
    _transfer.refuse_capture()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert strategy.capturing()
    with pytest.raises(RuntimeError, match="moves a table between the host and the GPU.*CUDA graph cannot capture"):
        _transfer.to_device(torch.arange(3), torch.device("cuda"))  # refused before any copy


def test_host_tables_go_to_the_gpu_pinned_and_non_blocking(monkeypatch):
    """A host table bound for a GPU is staged in pinned memory and copied with ``non_blocking``
    (a pageable or blocking copy makes the host wait for the stream, every call); one that stays
    on the CPU is not copied at all. Without a GPU: the pinned buffer stands in."""
    from deco_ops import _transfer

    copies = []

    class Pinned:
        def to(self, device, non_blocking=False):
            copies.append((device, non_blocking))
            return self

    pinned = Pinned()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned)
    table, cuda = torch.arange(3), torch.device("cuda")
    assert _transfer.to_device(table, cuda) is pinned and copies == [(cuda, True)]
    assert _transfer.to_device(table, torch.device("cpu")) is table


def test_nothing_is_timed_inside_a_cuda_graph_capture(cache_dir, monkeypatch):
    """While the current stream captures: a decision this process holds, else the on-disk one, else
    the first candidate (fused), never timed and not remembered; after the capture the key is measured."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert strategy.capturing()
    never = FakeTimer({})  # a call fails: no timing allowed
    key, on_disk, held = "op|GPU|bfloat16|rows=1|grad|any|v", "op|GPU|bfloat16|rows=2|grad|any|v", "op|GPU|bfloat16|rows=4|grad|any|v"
    (cache_dir / strategy.CACHE_FILE).write_text(json.dumps({on_disk: "composed"}))
    strategy.preload({held: "composed"})
    assert strategy.decide(key, _candidates(), never) == "fused"
    assert strategy.decide(on_disk, _candidates(), never) == "composed"
    assert strategy.decide(held, _candidates(), never) == "composed"
    assert key not in strategy.choices() and on_disk not in strategy.choices() and never.calls == []
    capturing[0] = False
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    assert strategy.decide(key, _candidates(), timer) == "composed"
    assert sorted(timer.calls) == ["composed", "fused"]


def test_a_cached_winner_the_call_cannot_offer_is_not_used(cache_dir, monkeypatch):
    """A winner in the on-disk cache that is not among the call's candidates (an SDPA kernel
    switched off since it was measured) never runs: inside a capture the first candidate does,
    outside one the key is measured anew."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    key = "op|GPU|bfloat16|rows=1|grad|any|v"
    (cache_dir / strategy.CACHE_FILE).write_text(json.dumps({key: "composed_flash"}))
    assert strategy.decide(key, _candidates(), FakeTimer({})) == "fused"
    capturing[0] = False
    timer = FakeTimer({"fused": 2.0, "composed": 1.0})
    assert strategy.decide(key, _candidates(), timer) == "composed" and sorted(timer.calls) == ["composed", "fused"]


@pytest.mark.skipif(not deco_ops._backend.interpreting(), reason="runs the Triton kernels on CPU tensors (interpreter)")
def test_a_call_inside_a_capture_leaves_no_plan(cache_dir, monkeypatch):
    """An op called inside a capture runs the untimed default, and its per-signature plan is not
    kept: the same call after the capture measures (a kept plan would run the default for good)."""
    from types import SimpleNamespace

    from harness import randn

    capturing, timed = [True], []
    monkeypatch.setattr(strategy, "_backend", SimpleNamespace(interpreting=lambda: False))
    monkeypatch.setattr(strategy, "_time_cuda", lambda run: (timed.append(run), run(), 1.0 + len(timed) % 2)[-1])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    x, w1, w2 = randn(3, 16, 8), randn(6, 8), randn(5, 6)
    with deco_ops.use_backend("triton"), deco_ops.use_strategy("auto"):
        deco_ops.pool_mlp(x, w1, None, w2, None, grid=(4, 4), out_grid=(2, 2))
        assert timed == [] and strategy.choices() == {}
        capturing[0] = False
        deco_ops.pool_mlp(x, w1, None, w2, None, grid=(4, 4), out_grid=(2, 2))
    assert len(timed) == 4 and len(strategy.choices()) == 2  # pooling's key and pool_mlp's, measured


def _named_candidates(flash_deterministic=False):
    return {
        "fused": strategy.Candidate(lambda: "fused"),
        "composed_efficient": strategy.Candidate(lambda: "composed_efficient", deterministic=False),
        "composed_flash": strategy.Candidate(lambda: "composed_flash", deterministic=flash_deterministic),
        "composed_cudnn": strategy.Candidate(lambda: "composed_cudnn", deterministic=False),
    }


def test_named_composed_candidates(cache_dir, monkeypatch):
    """Several composed twins (attention's SDPA kernels): auto times all that apply; a forced
    ``composed`` runs the one measured for the key, else the first; a forced kernel name runs that
    kernel where it applies, else as ``composed``; deterministic mode admits only deterministic ones."""
    monkeypatch.delenv(strategy.ENV_VAR, raising=False)
    key = strategy.make_key("cross_attention_backward", torch.device("cpu"), torch.bfloat16, True, M=32)
    timer = FakeTimer({"fused": 3.0, "composed_efficient": 2.0, "composed_flash": 1.5, "composed_cudnn": 1.0})
    assert strategy.decide(key, _named_candidates(), timer) == "composed_cudnn"
    assert sorted(timer.calls) == sorted(_named_candidates())
    other = key.replace("M=32", "M=64")
    no_key = lambda: pytest.fail("one composed candidate: nothing to look up")  # noqa: E731
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: key) == "composed_cudnn"  # measured
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: other) == "composed_efficient"  # first
        only_efficient = {n: c for n, c in _named_candidates().items() if n in ("fused", "composed_efficient")}
        assert strategy.choose(only_efficient, on_triton=True, key=no_key) == "composed_efficient"
    with deco_ops.use_strategy("composed_flash"):
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: key) == "composed_flash"
        assert strategy.choose(only_efficient, on_triton=True, key=no_key) == "composed_efficient"  # flash cannot express it
        assert strategy.choose({"fused": strategy.Candidate(lambda: "fused")}, on_triton=True, key=no_key) == "fused"
    with deco_ops.use_strategy("fused"):
        assert strategy.choose(_named_candidates(), on_triton=True, key=lambda: key) == "fused"
    strategy.preload({key: "composed_flash"})  # a named winner is a valid table entry
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    det = key.replace("|any|", "|deterministic|")
    timer = FakeTimer({"fused": 3.0, "composed_flash": 1.0})
    assert strategy.decide(det, _named_candidates(flash_deterministic=True), timer) == "composed_flash"
    assert sorted(timer.calls) == ["composed_flash", "fused"]  # the nondeterministic kernels never compete
    assert strategy.decide(det.replace("M=32", "M=128"), _named_candidates(), FakeTimer({})) == "fused"
    with deco_ops.use_strategy("composed"):
        assert strategy.choose(_named_candidates(flash_deterministic=True), on_triton=True, key=lambda: other) == "composed_flash"


def test_overrides_hold_per_thread():
    """use_backend / use_strategy live in a contextvars context: two threads forcing different
    choices at the same time each see their own, and a new thread sees none."""
    barrier = threading.Barrier(2)
    seen = {}

    def worker(name, backend):
        with deco_ops.use_strategy(name), deco_ops.use_backend(backend):
            barrier.wait()  # both blocks are open now
            seen[name] = (strategy.selected(), deco_ops._backend.selected())
            barrier.wait()

    threads = [threading.Thread(target=worker, args=args) for args in (("fused", "torch"), ("composed", "triton"))]
    with deco_ops.use_strategy("composed_cudnn"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fresh = {}
        probe = threading.Thread(target=lambda: fresh.update(overridden=_setting._override(strategy.SETTING.what)))
        probe.start()
        probe.join()
        assert strategy.selected() == "composed_cudnn"
    assert seen == {"fused": ("fused", "torch"), "composed": ("composed", "triton")}
    assert fresh == {"overridden": None}


def test_backward_runs_under_the_forward_s_overrides():
    """Autograd runs the backward of CUDA tensors on its own thread, outside the caller's context:
    the forward's context goes with it (here: a backward started from a thread with no override)."""
    from unittest import mock

    from deco_ops import composed_attention, reference_attention

    leaves = [torch.randn(s, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, s in
              enumerate([(1, 3, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8)])]
    with deco_ops.use_backend("torch"), deco_ops.use_strategy("fused"):
        out = deco_ops.cross_attention(*leaves)
    with mock.patch.object(composed_attention, "backward", wraps=composed_attention.backward) as sdpa, \
            mock.patch.object(reference_attention, "attention_bwd", wraps=reference_attention.attention_bwd) as chunked:
        worker = threading.Thread(target=lambda: out.sum().backward())
        worker.start()
        worker.join()
    assert chunked.called and not sdpa.called  # "fused" on the torch backend, not the default composed
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("path", ["direct", "dispatcher"])
def test_direct_backward_runs_under_the_forward_s_backend_not_the_caller_s(monkeypatch, path):
    """The same for the ops' direct path (``deco.<name>``'s Function, which keeps the context in
    its forward): a ``pool_linear`` run under ``use_backend("torch")`` un-pools with PyTorch even
    when its backward is started under another override, on the calling thread (CPU autograd), and
    with the environment asking for Triton (what an empty context would see). ``dispatcher``: the
    forward under a dispatch mode, through ``torch.ops.deco`` (its autograd formula's setup keeps
    the context)."""
    import contextlib
    from unittest import mock

    from deco_ops import _backend, reference
    from deco_ops.kernels import adaptive_pool
    from harness import PassThrough

    monkeypatch.setenv(_backend.SETTING.var, "triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, generator=g).requires_grad_()
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    with deco_ops.use_backend("torch"), PassThrough() if path == "dispatcher" else contextlib.nullcontext():
        out = deco_ops.pool_linear(x, w, b, grid=(4, 4), out_grid=(2, 2))
    # the direct path's Function, or the op's own autograd node
    assert (type(out.grad_fn).__name__ == "deco_pool_linearBackward") == (path == "direct")
    with deco_ops.use_backend("triton"), \
            mock.patch.object(adaptive_pool, "unpool_tokens", wraps=adaptive_pool.unpool_tokens) as kernel, \
            mock.patch.object(reference, "unpool_tokens", wraps=reference.unpool_tokens) as pytorch:
        out.sum().backward()
    assert pytorch.call_count == 1 and not kernel.called
    torch.testing.assert_close(x.grad, w.sum(0).expand_as(x) / 4)


def _rank_decides(rank: int, world: int, init_file: str, cache_root: str, results) -> None:
    """One gloo rank (a 10 s timeout: a rank left waiting fails the test instead of hanging it):
    a key rank 0 decides first, a key only rank 1 meets before the next collective, a key both
    decide at once; each rank's clock prefers another candidate."""
    import datetime

    import torch.distributed as dist

    os.environ[strategy.CACHE_DIR_ENV] = os.path.join(cache_root, str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))
    try:
        first, only_one, both = (f"pool_mlp|GPU|bfloat16|rows={rows}|grad|any|v" for rows in (256, 512, 1024))
        timed = {}

        class BarrierTimer(FakeTimer):  # both ranks past the store's lookup before either publishes
            def __call__(self, run):
                if not self.calls:
                    dist.barrier()
                return super().__call__(run)

        def decide(key, timer_type=FakeTimer):  # rank 0's clock finds composed faster, rank 1's fused
            timer = timer_type({"fused": 2.0, "composed": 1.0} if rank == 0 else {"fused": 1.0, "composed": 2.0})
            strategy.decide(key, _candidates(), timer)
            timed[key] = bool(timer.calls)

        if rank == 0:
            decide(first)
        dist.barrier()
        if rank == 1:
            decide(first)  # rank 0's decision, untimed
            decide(only_one)  # no other rank meets it: nobody waits
        dist.barrier()  # the next step's collective
        if rank == 0:
            decide(only_one)  # rank 1's decision, untimed
        decide(both, BarrierTimer)  # both time it, then publish at once: the first write wins, on both
        again = strategy.decide(first, _candidates(), FakeTimer({}))  # held: neither timed nor read again
        dist.barrier()
        results.put((rank, {k: strategy.choices()[k] for k in (first, only_one, both)}, again, timed))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_use_one_decision_per_key(tmp_path):
    """Two gloo processes: each key is decided once for the group, by the first rank that meets it,
    and adopted by the other without timing, though its own clock would pick the other candidate;
    a key that only one rank meets leaves no rank waiting (per-rank image sizes in other buckets),
    and two ranks deciding at once adopt one winner."""
    # forked, as DataLoader workers are: a spawned rank would spend seconds importing deco_ops again
    results = torch.multiprocessing.get_context("fork").SimpleQueue()
    torch.multiprocessing.start_processes(_rank_decides, args=(2, str(tmp_path / "init"), str(tmp_path), results),
                                          nprocs=2, join=True, start_method="fork")
    by_rank = dict((rank, rest) for rank, *rest in (results.get() for _ in range(2)))
    (decided0, again0, timed0), (decided1, again1, timed1) = by_rank[0], by_rank[1]
    assert decided0 == decided1
    first, only_one, both = decided0.values()
    assert (first, only_one, again0, again1) == ("composed", "fused", "composed", "composed")
    assert both in ("fused", "composed")
    # each key timed by the rank that met it first and by no other; the shared one by both
    first_key, only_one_key, both_key = decided0
    assert (timed0[first_key], timed0[only_one_key], timed1[first_key], timed1[only_one_key]) == (True, False, False, True)
    assert timed0[both_key] and timed1[both_key]


def test_a_store_that_cannot_agree_leaves_each_rank_deciding_alone(cache_dir, monkeypatch):
    """A process group whose store has no ``check``/``compare_set`` (MPI's placeholder store, a
    Python store that leaves them out: c10d raises "pure virtual function") does not fail the op:
    the rank decides alone, with one warning; so does a capture's or a trace's lookup."""
    class NoAgreement:
        def check(self, keys):
            raise RuntimeError('Tried to call pure virtual function "::c10d::Store::check"')

        def compare_set(self, key, expected, desired):
            raise RuntimeError('Tried to call pure virtual function "::c10d::Store::compareSet"')

    monkeypatch.setattr(strategy, "_store", NoAgreement)
    monkeypatch.setattr(strategy, "_synchronised", lambda: True)
    monkeypatch.setattr(strategy, "_store_refused", False)
    with pytest.warns(UserWarning, match="store cannot agree strategy decisions .*pure virtual"):
        assert strategy.decide("k|d|t|s|grad|any|v", _candidates(), FakeTimer({"fused": 2.0, "composed": 1.0})) == "composed"
    assert strategy._traced_choice(_candidates(), lambda: "k|d|t|s|grad|any|w") == "fused"


def test_a_synchronised_rank_keeps_preloaded_decisions_and_refuses_what_it_cannot_run(cache_dir, monkeypatch):
    """Under torch.distributed a decision the rank made alone is decided again with the group, but
    one preloaded since (a table every rank loads) is agreed: used without asking the store. A
    published winner that is not among this rank's candidates raises, naming it."""
    key = "k|d|t|s|grad|any|v"
    assert strategy.decide(key, _candidates(), FakeTimer({"fused": 1.0, "composed": 2.0})) == "fused"  # alone
    strategy.preload({key: "composed"})
    monkeypatch.setattr(strategy, "_synchronised", lambda: True)
    monkeypatch.setattr(strategy, "_store", lambda: pytest.fail("a preloaded decision is not asked of the store"))
    assert strategy.decide(key, _candidates(), FakeTimer({})) == "composed"

    class Published:  # the group's store, where another rank published a kernel this rank lacks
        def check(self, keys):
            return True

        def get(self, key):
            return b"composed_flash"

    monkeypatch.setattr(strategy, "_store", Published)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(RuntimeError, match="rank 1 decides .* decision is 'composed_flash', which cannot run here"):
        strategy.decide(key.replace("|s|", "|t|"), _candidates(), FakeTimer({}))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_the_fake_backend_is_not_synchronised(tmp_path):
    """``init_process_group("fake")`` (one process standing in for a world of ranks, to compile or
    estimate memory) has no ranks to agree with: decisions are not synchronised."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        assert not strategy._synchronised()
    finally:
        torch.distributed.destroy_process_group()


def test_sync_setting(monkeypatch):
    monkeypatch.setenv(strategy.SYNC_ENV, "yes")
    with pytest.raises(ValueError, match="DECO_OPS_STRATEGY_SYNC must be 0 or 1"):
        strategy._synchronised()
    monkeypatch.setenv(strategy.SYNC_ENV, "1")
    assert not strategy._synchronised()  # no process group here
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # a gloo group, without starting one
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    for world, setting, synchronised in ((2, " 1 ", True), (2, "", True), (2, "0", False), (1, "1", False)):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None, world=world: world)
        monkeypatch.setenv(strategy.SYNC_ENV, setting)
        assert strategy._synchronised() is synchronised, (world, setting)


def test_overrides_are_spelled_as_the_environment_variables_may_be(monkeypatch):
    """``use_backend``/``use_strategy`` take a name in any case with surrounding spaces, as
    ``DECO_OPS_BACKEND``/``DECO_OPS_STRATEGY`` do (set but empty, they are ``auto``); a name that is
    none of the choices still raises."""
    with deco_ops.use_backend(" TORCH "), deco_ops.use_strategy("Composed"):
        assert deco_ops._backend.selected() == "torch" and strategy.SETTING.selected() == "composed"
    monkeypatch.setenv(strategy.ENV_VAR, " Fused ")
    assert strategy.SETTING.selected() == "fused"
    for empty in ("", "  "):
        monkeypatch.setenv(strategy.ENV_VAR, empty)
        assert strategy.SETTING.selected() == "auto", repr(empty)
    with pytest.raises(ValueError, match="strategy must be one of"), deco_ops.use_strategy("FAST"):
        pass


def test_cache_dir_may_start_with_a_tilde(monkeypatch, tmp_path):
    """``DECO_OPS_CACHE_DIR=~/x`` (quoted in a launcher's env file, so no shell expanded it) is the
    home's ``x``, not a folder named ``~`` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(strategy.CACHE_DIR_ENV, "~/x/y")
    assert strategy.cache_path() == tmp_path / "x" / "y" / strategy.CACHE_FILE
    strategy.forget()
    strategy._write_disk("k|d|t|s|grad|any|v", "fused")  # the folders are made, as the default ~/.cache/deco_ops
    assert json.loads(strategy.cache_path().read_text()) == {"k|d|t|s|grad|any|v": "fused"}
    strategy.forget()


def test_a_blank_cache_dir_is_the_default(monkeypatch, tmp_path):
    """``DECO_OPS_CACHE_DIR`` set but blank (``" "`` from a launcher's env file) is the default
    ``~/.cache/deco_ops``, as every other deco_ops setting reads a blank value; until 2026-12-07 a
    blank of spaces wrote the cache into a folder named ``" "`` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for blank in ("", " ", "\t"):
        monkeypatch.setenv(strategy.CACHE_DIR_ENV, blank)
        assert strategy.cache_path() == tmp_path / ".cache" / "deco_ops" / strategy.CACHE_FILE, repr(blank)


def test_forget_brings_the_table_s_decisions_back(cache_dir, tmp_path, monkeypatch):
    """``forget`` drops every decision, the tuning table's too: the next decision preloads the
    table again instead of measuring what the table decides."""
    from deco_ops import tuning_tables

    key = strategy.make_key("pool_mlp", torch.device("cpu"), torch.bfloat16, True, rows=256, C=1024)
    table = tmp_path / "table.json"
    tuning_tables.write({"format": tuning_tables.FORMAT, "triton": triton.__version__, "strategies": {key: "composed"}}, table)
    monkeypatch.setenv(tuning_tables.ENV_VAR, str(table))
    monkeypatch.setattr(tuning_tables, "_tables", {})
    never = FakeTimer({})  # a call fails: the table decides
    strategy._preload_shipped_table(key)
    assert strategy.decide(key, _candidates(), never) == "composed"
    strategy.forget()
    assert strategy.choices() == {}
    strategy._preload_shipped_table(key)
    assert strategy.decide(key, _candidates(), never) == "composed" and never.calls == []


def _writes_decisions(rank: int, cache: str, keys: int) -> None:
    """One process adding ``keys`` decisions of its own to the cache file, each write slowed down
    between reading the file and replacing it (where an unlocked writer loses the other's entries)."""
    import time

    os.environ[strategy.CACHE_DIR_ENV] = cache
    load = strategy._load

    def slow_load(path):
        table = load(path)
        time.sleep(0.003)
        return table

    strategy._load = slow_load
    for i in range(keys):
        strategy._write_disk(f"op|GPU|bfloat16|rows={i}|grad|any|rank{rank}", "fused")


@pytest.mark.skipif(strategy.fcntl is None, reason="no fcntl (not POSIX): nothing is locked")
def test_a_filesystem_without_locks_still_gets_the_cache(cache_dir, monkeypatch):
    """Where flock fails for want of support (ENOLCK on some network mounts), the decision is still
    written (unlocked, as before locks), not dropped with a warning on every decision."""
    import errno
    from types import SimpleNamespace

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(strategy, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=strategy.fcntl.LOCK_EX))
    strategy._write_disk("op|GPU|bfloat16|rows=1|grad|any|v", "composed")
    assert json.loads((cache_dir / strategy.CACHE_FILE).read_text()) == {"op|GPU|bfloat16|rows=1|grad|any|v": "composed"}


def test_concurrent_writers_keep_every_decision(tmp_path):
    """Two processes writing the cache at once (ranks of one node) keep each other's entries: the
    read-merge-replace runs under the cache's lock."""
    torch.multiprocessing.start_processes(_writes_decisions, args=(str(tmp_path), 20), nprocs=2, join=True,
                                          start_method="fork")
    assert len(json.loads((tmp_path / strategy.CACHE_FILE).read_text())) == 40


def _rank_meets_hazards(rank: int, world: int, init_file: str, cache_root: str, results) -> None:
    """One gloo rank: a decision made alone before the process group, a traced choice where only
    rank 0's disk knows the key, and a decision that fails on rank 0."""
    import datetime

    import torch.distributed as dist

    os.environ[strategy.CACHE_DIR_ENV] = os.path.join(cache_root, str(rank))
    strategy.forget()
    alone, on_disk, failing = (f"pool_mlp|GPU|bfloat16|rows={rows}|grad|any|v" for rows in (256, 512, 1024))
    if rank == 0:
        os.makedirs(os.environ[strategy.CACHE_DIR_ENV])
        with open(os.path.join(os.environ[strategy.CACHE_DIR_ENV], strategy.CACHE_FILE), "w") as f:
            json.dump({on_disk: "composed"}, f)
    else:  # decided before the process group starts: rank 0 never saw it
        strategy.decide(alone, _candidates(), FakeTimer({"fused": 1.0, "composed": 2.0}))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=10))  # a hang fails the test in 10 s
    try:
        if rank == 0:
            strategy.decide(alone, _candidates(), FakeTimer({"fused": 2.0, "composed": 1.0}))
        dist.barrier()
        agreed = strategy.decide(alone, _candidates(), FakeTimer({}))  # rank 1: the group's, not its own
        traced = strategy._traced_choice(_candidates(), lambda: on_disk)

        def fused():
            if rank == 0:
                raise RuntimeError("fused cannot run on rank 0")
            return "fused"

        failure = None
        for turn in range(world):  # rank 0 first: it fails and publishes nothing, rank 1 then decides
            if turn == rank:
                try:
                    failure = strategy.decide(failing, {**_candidates(), "fused": strategy.Candidate(fused)},
                                              FakeTimer({"fused": 2.0, "composed": 1.0}))
                except RuntimeError as e:
                    failure = str(e)
            dist.barrier()
        results.put((rank, agreed, traced, failure))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_never_decide_alone(tmp_path):
    """Two gloo processes. A decision a rank made before the process group started gives way to
    the group's; a ``torch.compile`` trace reads no rank's own disk (each would compile its own
    choice); where one rank's default candidate raises, that rank raises and the other goes on."""
    results = torch.multiprocessing.get_context("fork").SimpleQueue()
    torch.multiprocessing.start_processes(_rank_meets_hazards, args=(2, str(tmp_path / "init"), str(tmp_path), results),
                                          nprocs=2, join=True, start_method="fork")
    by_rank = dict((rank, rest) for rank, *rest in (results.get() for _ in range(2)))
    assert [by_rank[r][:2] for r in (0, 1)] == [["composed", "fused"], ["composed", "fused"]]
    assert by_rank[0][2] == "fused cannot run on rank 0" and by_rank[1][2] == "composed"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_plans_are_not_kept_across_the_process_group_start(tmp_path, monkeypatch):
    """A per-signature plan built before ``init_process_group`` holds a choice its rank made
    alone: after the start every call misses and decides again, for the group (``strategy._agree``)."""
    from deco_ops import pooling

    build, builds = pooling._plans._build, []
    monkeypatch.setattr(pooling._plans, "_build", lambda *args: builds.append(args) or build(*args))
    x = torch.randn(3, 15, 7)  # a signature no other test plans
    for _ in range(2):
        deco_ops.adaptive_avg_pool_tokens(x, (5, 3), (2, 2))
    assert len(builds) == 1
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        deco_ops.adaptive_avg_pool_tokens(x, (5, 3), (2, 2))
        assert len(builds) == 2
    finally:
        torch.distributed.destroy_process_group()
