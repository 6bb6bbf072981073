"""Launches through the compiled kernel (``kernels/_compiled_launch.py``, DECO_OPS_DIRECT_LAUNCH).

Without a GPU, Triton's own ``JITFunction.run`` runs here against a fake driver (device, stream,
target) and a fake compiled kernel that records how it is called: what Triton passes to the
launcher is the reference for what the direct launch passes, in whichever triton is installed
(CI: the newest; ``/work/wt/venv36/bin/python -m pytest tests/test_compiled_launch.py`` checks
3.6, what the GPU machines run). The CUDA test at the end compares every kernel's outputs bit for
bit, launched both ways.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import deco_ops
from deco_ops import _compiled_launch_setting
from deco_ops.kernels import _compiled_launch, _traceable, _tuning, adaptive_pool
from harness import DEVICE, DTYPES, assert_close

CPU = torch.device("cpu")


def _toy(x_ptr, y_ptr, n, stride, scale, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 2):
    pass


def _toy_star(x_ptr, *rest):
    pass


class FakeCompiled(CompiledKernel):
    """A compiled kernel whose launcher records its arguments (no module, no GPU)."""

    def __init__(self, serial: int):
        self.serial = serial
        self.calls: list[tuple] = []
        self.function = f"function {serial}"
        self.packed_metadata = ("packed", serial)
        self.module, self._module_pid = "loaded", None  # 3.9 unloads a module its own process loaded
        self.name, self.src = f"toy {serial}", None
        self._run = lambda *args: self.calls.append(args)

    def __del__(self):
        """Nothing was loaded. Triton 3.8's own ``__del__`` unloads any module (no process check),
        and its error, raised inside the garbage collector, could land in a later test's
        ``ast.parse`` (CPython 3.11.7: "AST constructor recursion depth mismatch", seen under
        torch 2.14.1 + triton 3.8 in test_tma_gemm)."""


class FakeDriver:
    """What ``JITFunction.run`` asks the active driver for."""

    def __init__(self):
        self.device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return 1000 + device

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def fake_driver():
    previous = driver._active
    fake = FakeDriver()
    driver.set_active(fake)
    try:
        yield fake
    finally:
        driver._active = previous


def fake_jit(fn=_toy) -> JITFunction:
    """A ``JITFunction`` whose every new Triton cache key "compiles" to a new ``FakeCompiled``."""
    jit = JITFunction(fn)
    jit.compiled = []  # in compile order

    def compile(key, signature, device, constexprs, options, attrs, warmup):
        kernel = FakeCompiled(len(jit.compiled))
        jit.compiled.append(kernel)
        jit.device_caches[device][0][key] = kernel
        return kernel

    jit._do_compile = compile
    return jit


class Counted:
    """Triton's normal launch, counted."""

    def __init__(self, run):
        self.run, self.calls = run, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.run(*args, **kwargs)


def tensor(n: int, dtype=torch.float32, offset: int = 0) -> torch.Tensor:
    """A CPU tensor whose address is ``offset`` elements past a 64-byte aligned allocation."""
    return torch.empty(n + 16, dtype=dtype, device=CPU)[offset:offset + n]


def _triton_specialisation(jit: JITFunction, args: tuple, kwargs: dict):
    """Triton's specialisation of a launch (its binder, as ``JITFunction.run`` calls it) and options."""
    binder = jit.device_caches[0][4]
    _, specialisation, options = binder(*args, **kwargs)
    return str(specialisation), str(options)


# ----------------------------------------------------------------------------------------------
# the signature


def _arguments():
    """Values a launch passes: tensors of three dtypes at aligned and unaligned addresses, integers
    around Triton's boundaries (1, multiples of 16, the i32/i64/u64 ranges), bools, floats, None."""
    tensors = [tensor(8, dt, off) for dt in (torch.float32, torch.float16, torch.int32) for off in (0, 1, 4)]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**40, 2**40 + 1, 2**63, 2**63 + 16]
    return tensors + ints + [True, False, 1.0, 0.5, 16.0, None]


def test_signature_is_at_least_as_fine_as_tritons_specialisation(fake_driver):
    """Two launches with one signature get one Triton specialisation (the compiled kernel they
    share is right for both), over every pair of argument values in two positions."""
    jit = fake_jit()
    jit.run(tensor(8), tensor(8), 1, 1, 1.0, True, grid=(1,), warmup=True, BLOCK=16)  # builds the binder
    seen: dict[tuple, tuple] = {}
    values = _arguments()
    for a, b in itertools.product(values, repeat=2):
        args, kwargs = (a, tensor(8), b, 16, 0.5, False), {"BLOCK": 32}
        key = _compiled_launch.signature(0, args, kwargs)
        want = _triton_specialisation(jit, args, kwargs)
        assert seen.setdefault(key, want) == want, (a, b)


def test_signature_keys_tensors_on_dtype_and_alignment_only():
    """Tensors of one dtype and alignment share a signature whatever their address, shape or
    strides (a model's every call reuses the kept launch); alignment and dtype split it."""
    same = [tensor(8), tensor(40)[::2], torch.empty(3, 5, device=CPU).t(), tensor(8, offset=4)]
    keys = {_compiled_launch.signature(0, (t,), {}) for t in same}
    assert len(keys) == 1
    assert _compiled_launch.signature(0, (tensor(8, offset=1),), {}) not in keys  # 4-byte aligned only
    assert _compiled_launch.signature(0, (tensor(8, offset=2),), {}) not in keys  # 8-byte aligned only
    assert _compiled_launch.signature(0, (tensor(8, torch.float16),), {}) not in keys
    assert _compiled_launch.signature(1, (tensor(8),), {}) not in keys  # another device


def test_signature_tells_equal_values_of_other_types_apart():
    """``1 == 1.0 == True`` in Python; Triton compiles them as i32, fp32, i1 (and constexprs alike)."""
    keys = {_compiled_launch.signature(0, (v,), {}) for v in (1, 1.0, True)}
    assert len(keys) == 3
    keys = {_compiled_launch.signature(0, (), {"MODE": v}) for v in (1, 1.0, True)}
    assert len(keys) == 3


# ----------------------------------------------------------------------------------------------
# the launcher call


def _launch_cases():
    """(args, kwargs, grid) of launches: defaults taken or overridden, grids of 1-3 axes or callable."""
    return [
        ((tensor(8), tensor(8), 100, 1, 0.5, True), {"BLOCK": 32}, (4,)),
        ((tensor(8), tensor(8, offset=1), 64, 17, 2.0, False), {"BLOCK": 16, "MODE": 5}, (3, 2)),
        ((tensor(8, torch.float16), tensor(8), 1, 16, 1.0, True), {"BLOCK": 64}, (2, 3, 4)),
        ((tensor(8), tensor(8), 77, 3, 0.25, True, 128), {}, lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]), meta["MODE"])),
    ]


def _triton_call(args, kwargs, grid):
    """What Triton's own launch passes to the launcher for this launch (a fresh fake kernel)."""
    jit = fake_jit()
    jit.run(*args, grid=grid, warmup=False, **kwargs)
    (call,) = jit.compiled[0].calls
    return call


@pytest.mark.parametrize("case", range(4))
def test_direct_launch_passes_what_triton_passes(fake_driver, case):
    """The launcher gets the same grid, stream, function, metadata and arguments (every parameter
    in declaration order, constexprs and defaults included) as from ``JITFunction.run``; None for
    the launch metadata and hooks where Triton passes its empty hook chains."""
    args, kwargs, grid = _launch_cases()[case]
    want = _triton_call(args, kwargs, grid)
    jit = fake_jit()
    normal = Counted(jit.run)
    launches = _compiled_launch.CompiledLaunch(jit, normal)
    first = launches[grid](*args, **kwargs)  # Triton's path, which resolves the compiled kernel
    second = launches[grid](*args, **kwargs)
    assert normal.calls == 1 and first is second is jit.compiled[0]
    triton_call, direct_call = first.calls
    assert triton_call[:6] == want[:6] and triton_call[9:] == want[9:]  # our fake reproduces Triton's call
    assert direct_call[:6] + direct_call[9:] == want[:6] + want[9:]
    assert direct_call[6:9] == (None, None, None)
    assert not want[7].calls and not want[8].calls  # Triton's hooks: empty chains, nothing to call


def test_the_launch_follows_the_current_device_and_stream(fake_driver):
    jit = fake_jit()
    launches = _compiled_launch.CompiledLaunch(jit, Counted(jit.run))
    args = (tensor(8), tensor(8), 100, 1, 0.5, True)
    for device in (0, 1, 0, 1):
        fake_driver.device = device
        launches[(1,)](*args, BLOCK=32)
    assert len(launches.signatures) == 2 and launches.normal.calls == 2
    streams = [call[3] for kernel in jit.compiled for call in kernel.calls]
    assert streams == [1000, 1000, 1001, 1001]


def test_a_new_alignment_or_value_is_resolved_by_triton(fake_driver):
    """A launch whose specialisation differs gets the compiled kernel Triton picks for it, never the
    kept one of another signature."""
    jit = fake_jit()
    launches = _compiled_launch.CompiledLaunch(jit, Counted(jit.run))
    for args, block in [((tensor(8), tensor(8), 32, 16), 32), ((tensor(8, offset=1), tensor(8), 32, 16), 32),
                        ((tensor(8), tensor(8), 33, 16), 32), ((tensor(8), tensor(8), 1, 16), 32),
                        ((tensor(8), tensor(8), 32, 16), 64),  # another constexpr value, of the same type
                        ((tensor(8), tensor(8), 32, 16), 32), ((tensor(8, offset=1), tensor(8), 32, 16), 32)]:
        full = (*args, 0.5, True)
        got = launches[(1,)](*full, BLOCK=block)
        assert got is jit.run(*full, grid=(1,), warmup=True, BLOCK=block)
    assert len(jit.compiled) == 5 and launches.normal.calls == 5


# ----------------------------------------------------------------------------------------------
# the autotuner's config


def _tuned(monkeypatch, jit: JITFunction) -> _tuning.TunedKernel:
    """A ``TunedKernel`` over ``jit`` choosing BLOCK by ``n`` (its key), kept off the suite's list."""
    small, large = triton.Config({"BLOCK": 16}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=8)
    monkeypatch.setattr(_tuning, "TUNED_KERNELS", [])
    monkeypatch.setenv("DECO_OPS_AUTOTUNE", "0")  # the first fitting config, untimed
    return _tuning.TunedKernel(jit, [small, large], [small, large], key=["n"],
                               prune=lambda configs, named, **kw: configs if named["n"] < 1000 else configs[::-1])


def test_autotuned_launch_passes_the_chosen_config(fake_driver, monkeypatch):
    """Through ``TunedKernel.run`` with direct launches on: the config the autotuner chose for the
    key is in the launch, Triton's path runs once per key."""
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    normal = Counted(kernel.direct.normal)
    monkeypatch.setattr(kernel.direct, "normal", normal)
    grid = lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)  # noqa: E731
    x, y = tensor(8), tensor(8)
    for n in (100, 5000, 100, 5000):
        kernel[grid](x, y, n, 1, 0.5, True)
    assert normal.calls == 2
    blocks = [(call[0], call[9 + 6]) for kernel_ in jit.compiled for call in kernel_.calls]
    assert sorted(blocks) == sorted([(7, 16), (7, 16), (40, 128), (40, 128)])
    for kernel_ in jit.compiled:
        triton_call, direct_call = kernel_.calls
        assert direct_call[:6] + direct_call[9:] == triton_call[:6] + triton_call[9:]


def test_the_config_kept_is_the_keys_not_the_last_launched(fake_driver, monkeypatch):
    """Another thread's launch of another key between Triton's launch and the keeping (it sets the
    autotuner's ``best_config``) does not change the config kept for this key."""
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    x, y = tensor(8), tensor(8)
    autotuner_run = kernel.direct.normal

    def then_another_key(*args, **kwargs):
        compiled = autotuner_run(*args, **kwargs)
        autotuner_run(x, y, 5000, 1, 0.5, True, grid=(1,), warmup=False)
        return compiled

    monkeypatch.setattr(kernel.direct, "normal", then_another_key)
    kernel[(1,)](x, y, 100, 1, 0.5, True)
    assert kernel.best_config.kwargs["BLOCK"] == 128
    kernel[(1,)](x, y, 100, 1, 0.5, True)
    small = next(k for k in jit.compiled if k.calls[0][9 + 2] == 100)
    assert [call[9 + 6] for call in small.calls] == [16, 16]


def test_a_replaced_autotuner_cache_chooses_again(fake_driver, monkeypatch):
    """Forcing a config the way test_every_config's ``only`` does (new configs, a new cache) takes
    effect on a signature already kept."""
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    x, y = tensor(8), tensor(8)
    for _ in range(2):
        kernel[(1,)](x, y, 100, 1, 0.5, True)
    monkeypatch.setattr(kernel, "configs", kernel.configs[1:])
    monkeypatch.setattr(kernel, "cache", {})
    normal = Counted(kernel.direct.normal)
    monkeypatch.setattr(kernel.direct, "normal", normal)
    for _ in range(2):
        kernel[(1,)](x, y, 100, 1, 0.5, True)
    blocks = [call[9 + 6] for compiled in jit.compiled for call in compiled.calls]
    assert blocks == [16, 16, 128, 128]
    assert normal.calls == 1  # the new config is kept: its later launches are direct again


def test_a_tensor_in_the_autotuner_key_keeps_tritons_path(fake_driver, monkeypatch):
    """Triton keys a tensor of the autotuner's key by identity, the signature by dtype and
    alignment: two such tensors of one signature may get other configs (here the prune rules read
    the tensor's size), so every launch takes Triton's path and nothing is kept."""
    jit = fake_jit()
    small, large = triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 128})
    monkeypatch.setattr(_tuning, "TUNED_KERNELS", [])
    monkeypatch.setenv("DECO_OPS_AUTOTUNE", "0")
    kernel = _tuning.TunedKernel(jit, [small, large], [small, large], key=["x_ptr"],
                                 prune=lambda configs, named, **kw: configs if named["x_ptr"].numel() < 100 else configs[::-1])
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    few, many, y = tensor(8), tensor(200), tensor(8)
    for x in (few, many, few, many):
        kernel[(1,)](x, y, 100, 1, 0.5, True)
    launched = sorted((call[9].numel(), call[9 + 6]) for compiled in jit.compiled for call in compiled.calls)
    assert launched == [(8, 16), (8, 16), (200, 128), (200, 128)]
    assert all(kept is None for kept in kernel.direct.signatures.values())


def test_a_key_missing_from_the_autotuners_cache_keeps_tritons_path(fake_driver, monkeypatch):
    """The autotuner's cache emptied between Triton's launch and the keeping (another thread, or
    a test forcing a config): no config to keep, so the signature keeps Triton's path (never a
    launch that fails looking up the config)."""
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    autotuner_run = kernel.direct.normal

    def then_emptied(*args, **kwargs):
        compiled = autotuner_run(*args, **kwargs)
        kernel.cache.clear()
        return compiled

    monkeypatch.setattr(kernel.direct, "normal", Counted(then_emptied))
    for _ in range(3):
        kernel[(1,)](tensor(8), tensor(8), 100, 1, 0.5, True)
    assert kernel.direct.normal.calls == 3 and list(kernel.direct.signatures.values()) == [None]


def test_a_config_pre_hook_keeps_tritons_path(fake_driver, monkeypatch):
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    hooked = []
    for config in kernel.configs:
        monkeypatch.setattr(config, "pre_hook", lambda nargs: hooked.append(nargs["n"]))
    monkeypatch.setattr(_compiled_launch, "enabled", lambda: True)
    for _ in range(3):
        kernel[(1,)](tensor(8), tensor(8), 100, 1, 0.5, True)
    assert hooked == [100, 100, 100]


# ----------------------------------------------------------------------------------------------
# when Triton's path runs


class Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize("what", ["warmup", "tensor keyword", "list argument", "tensor subclass", "launch hook", "launch exit hook",
                                  "pre-run hook", "stages hook", "star args"])
def test_triton_path_runs_where_the_direct_launch_could_differ(fake_driver, monkeypatch, what):
    """Each launch below goes through ``JITFunction.run``, every time, and keeps nothing that
    could hold a tensor alive. ``*args``: Triton passes the extra arguments as one tuple, the
    direct launch would spread them."""
    jit = fake_jit(_toy_star if what == "star args" else _toy)
    normal = Counted(jit.run)
    launches = _compiled_launch.CompiledLaunch(jit, normal)
    args, kwargs, warmup = [tensor(8), tensor(8), 100, 1, 0.5, True], {"BLOCK": 32}, False
    hook = lambda metadata: None  # noqa: E731
    if what == "warmup":
        warmup = True
    elif what == "tensor keyword":
        args, kwargs = args[:1], {**kwargs, **dict(zip(("y_ptr", "n", "stride", "scale", "flag"), args[1:]))}
    elif what == "list argument":
        args[3] = [1]
    elif what == "tensor subclass":
        args[0] = args[0].as_subclass(Subclass)
    elif what == "launch hook":
        knobs.runtime.launch_enter_hook.add(hook)
    elif what == "launch exit hook":  # alone: its metadata too only Triton's path builds
        knobs.runtime.launch_exit_hook.add(hook)
    elif what == "pre-run hook":
        jit.add_pre_run_hook(lambda *a, **k: None)
    elif what == "stages hook":  # triton 3.9: part of Triton's key (custom compiler stages)
        if not hasattr(knobs.runtime, "add_stages_inspection_hook"):
            pytest.skip("this triton has no compiler stages hook")
        monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: ("stages", "hash"))
    elif what == "star args":
        args, kwargs = args[:3], {}
    try:
        for _ in range(3):
            launches.run((1,), tuple(args), dict(kwargs), warmup)
    except TypeError:  # Triton rejects it itself (triton 3.6 any ``*args`` kernel); no signature was kept
        assert what == "list argument" or (what == "star args" and normal.calls == 1)
    else:
        assert normal.calls == 3, what
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
        knobs.runtime.launch_exit_hook.remove(hook)
    assert all(kept is None for kept in launches.signatures.values()), what
    if what in ("tensor subclass", "list argument"):
        assert not launches.signatures


def test_a_future_from_triton_is_not_kept(fake_driver):
    """3.6 compiling asynchronously returns a future: its signature is resolved again next time."""
    jit = fake_jit()
    future = type("Future", (), {"result": lambda self: None})()
    launches = _compiled_launch.CompiledLaunch(jit, lambda *args, **kwargs: future)
    assert launches[(1,)](tensor(8), tensor(8), 100, 1, 0.5, True, BLOCK=32) is future
    assert not launches.signatures


def test_signatures_per_kernel_are_bounded(fake_driver):
    jit = fake_jit()
    launches = _compiled_launch.CompiledLaunch(jit, jit.run)
    first = _compiled_launch.signature(0, (tensor(8), tensor(8), 0, 1, 0.5, True), {"BLOCK": 32})
    for n in range(_compiled_launch.MAX_SIGNATURES + 5):
        launches[(1,)](tensor(8), tensor(8), n, 1, 0.5, True, BLOCK=32)
    assert len(launches.signatures) == _compiled_launch.MAX_SIGNATURES
    assert first not in launches.signatures
    _compiled_launch.clear()
    assert not launches.signatures


def test_dropping_the_oldest_signature_while_another_thread_does(fake_driver, monkeypatch):
    """Threads launching new signatures past ``MAX_SIGNATURES`` at once both drop the oldest: picked
    by iterating, then deleted, the second delete raised ``KeyError`` out of the launch (as
    ``_plan.Plans`` did, tests/test_host_path.py). Here "another thread" drops each key as it is picked."""
    monkeypatch.setattr(_compiled_launch, "MAX_SIGNATURES", 2)
    jit = fake_jit()
    launches = _compiled_launch.CompiledLaunch(jit, Counted(jit.run))

    class DroppedMeanwhile(type(launches.signatures)):
        def __iter__(self):
            for key in list(super().__iter__()):
                self.pop(key, None)
                yield key

    launches.signatures = DroppedMeanwhile()
    for n in range(5):
        launches[(1,)](tensor(8), tensor(8), n, 1, 0.5, True, BLOCK=32)
    assert 1 <= len(launches.signatures) <= 2 and launches.normal.calls == 5


# ----------------------------------------------------------------------------------------------
# the setting


def test_off_by_default_and_checked(monkeypatch):
    monkeypatch.delenv(_compiled_launch_setting.ENV_VAR, raising=False)
    assert not _compiled_launch.enabled()
    monkeypatch.setenv(_compiled_launch_setting.ENV_VAR, "auto")  # opt-in until a GPU run verifies it
    assert not _compiled_launch.enabled()
    monkeypatch.setenv(_compiled_launch_setting.ENV_VAR, "1")
    assert _compiled_launch.enabled()
    monkeypatch.setenv(_compiled_launch_setting.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=_compiled_launch_setting.ENV_VAR):
        _compiled_launch.enabled()


def test_off_means_tritons_own_launch(fake_driver, monkeypatch):
    """With the setting off a launch site gets the kernel itself and an autotuned launch never
    reaches its direct launches."""
    jit = fake_jit()
    kernel = _tuned(monkeypatch, jit)
    with _compiled_launch_setting.SETTING.use("0"):
        assert _traceable.launcher(jit, tensor(8)) is jit
        assert _traceable.launcher(jit, torch.nn.Parameter(tensor(8))) is jit  # a weight is as plain as a tensor
        monkeypatch.setattr(kernel.direct, "run", None)  # would fail if called
        kernel[(1,)](tensor(8), tensor(8), 100, 1, 0.5, True)
    assert len(jit.compiled) == 1 and len(jit.compiled[0].calls) == 1
    with _compiled_launch_setting.SETTING.use("1"):
        launches = _traceable.launcher(jit, tensor(8))
        assert isinstance(launches, _compiled_launch.CompiledLaunch)
        assert _traceable.launcher(jit, tensor(8)) is launches  # kept on the kernel: its signatures last


def test_planning_launches_nothing_directly(fake_driver, monkeypatch):
    """``_tuning.planning()`` (``deco_ops.tune --dry-run``) runs no kernel, kept signatures included."""
    jit = fake_jit()
    args = (tensor(8), tensor(8), 100, 1, 0.5, True)
    with _compiled_launch_setting.SETTING.use("1"):
        for planned in (False, True, True):
            with _tuning.planning() if planned else contextlib.nullcontext():
                _traceable.launcher(jit, args[0])[(1,)](*args, BLOCK=32)
    assert len(jit.compiled[0].calls) == 1


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's kernels")
def test_never_under_the_interpreter():
    """Interpreted kernels have no compiled kernel: switched on, their launches stay Triton's."""
    with _compiled_launch_setting.SETTING.use("1"):
        assert _traceable.launcher(adaptive_pool.pool_tokens_kernel, tensor(8)) is adaptive_pool.pool_tokens_kernel
    assert all(k.direct is None for k in _tuning.TUNED_KERNELS)


# ----------------------------------------------------------------------------------------------
# on a GPU


CUDA_ONLY = pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels: CUDA only")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_launched_directly_gives_the_same_bits(dtype):
    """Every case of test_every_config (together they reach every kernel), run with Triton's
    launch, then twice with direct launches (the first resolves each new signature through Triton,
    the second launches directly): bit for bit the same outputs, and every kernel the cases launch
    kept a signature."""
    from test_every_config import ATOMIC_SUMS, CASES, KERNELS, launches

    def outputs(case):
        return [(name, got) for name, got, _ in CASES[case](dtype)]

    _compiled_launch.clear()
    autotuned = set()
    with deco_ops.use_backend("triton"):
        for case in CASES:
            autotuned |= set(launches(case, dtype))
            with _compiled_launch_setting.SETTING.use("0"):
                want = outputs(case)
            with _compiled_launch_setting.SETTING.use("1"):
                outputs(case)
                got = outputs(case)
            assert len(got) == len(want), case
            for (name, a), (_, b) in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape, f"{case} {name}"
                if (case, name) in ATOMIC_SUMS:
                    assert_close(a, b.double(), dtype, f"{case} {name}")
                else:
                    assert torch.equal(a, b), f"{case} {name}"
    assert autotuned
    unused = sorted(name for name in autotuned if not any(KERNELS[name].direct.signatures.values()))
    assert not unused, f"autotuned kernels never launched directly: {unused}"
    package = _compiled_launch.__name__.rpartition(".")[0]  # deco_ops.kernels, not this file's toys
    plain = [launches for launches in _compiled_launch._all
             if launches.tuned is None and launches.jit.fn.__module__.startswith(package)]
    assert plain and all(any(launches.signatures.values()) for launches in plain)


@CUDA_ONLY
def test_direct_launches_are_captured_in_cuda_graphs(monkeypatch):
    """A capture records the direct launches (the warm-up call outside it resolves each signature;
    inside, the launcher is called on the capture's stream): replays match eager bit for bit."""
    import test_cuda_graphs

    monkeypatch.setenv("DECO_OPS_CHECKS", "0")  # no host reads of values inside a capture
    _compiled_launch.clear()
    with _compiled_launch_setting.SETTING.use("1"):
        test_cuda_graphs.test_pooling_ops_capture()
        test_cuda_graphs.test_projector_ops_capture()
        test_cuda_graphs.test_cross_attention_captures("kv_lens")
    assert any(any(launches.signatures.values()) for launches in _compiled_launch._all)
