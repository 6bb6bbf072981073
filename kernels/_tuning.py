"""One place that turns a kernel's CUDA config list into its autotuner, and decides when it times.

Under Triton's interpreter there is no driver to time configs (autotuning several of them crashes),
so every kernel runs a single fixed config there; on CUDA it chooses among ``cuda_configs``.
``deco_ops.aot`` compiles every entry of ``cuda_configs`` ahead of time for sm_90 and sm_80.

How a CUDA launch picks its config (``TunedKernel``), the first time its key is seen:

1. The key is *bucketed*: the arguments named in ``buckets`` (rows, key lengths) are rounded up to
   a power of two (``bucket``) and the others (weight dims, flags) kept exact, so a new batch size, packed
   composition or key length reuses the choice made for its bucket instead of timing 7-9 configs.
2. Candidates are the configs the kernel's ``prune`` rules keep for this call.
3. ``DECO_OPS_AUTOTUNE=0``: the first candidate, never timed (the same config on every GPU; the
   test suite on CUDA uses it). Otherwise the only candidate if there is one (never timed), else
   the config chosen earlier in this process for the bucket, else the one in the GPU's tuning table
   (``deco_ops.tuning_tables``, installed as ``table_lookup``), else, inside a CUDA graph capture,
   the first candidate untimed, else Triton times every candidate once; the bucket remembers what
   ran.

``planning()`` records launches instead of running them: ``python -m deco_ops.tune --dry-run``
lists each kernel's buckets and candidates without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import _compiled_launch, _traceable

TRUE_VALUES = ("1", "true", "on", "yes", "y")  # triton's boolean knobs (``getenv_bool``), in any case


@functools.cache  # a handful of distinct values; every strategy choice asks (``deco_ops._backend.interpreting``)
def env_true(raw: str | bytes | None) -> bool:
    """Whether an environment variable's value as stored (bytes on POSIX; None: unset) is true as
    triton reads ``TRITON_INTERPRET`` and its other boolean knobs (``triton.knobs.env_bool``: one
    of ``TRUE_VALUES`` in any case, nothing stripped), so Triton and deco_ops always agree on
    whether kernels are interpreted."""
    return raw is not None and os.fsdecode(raw).lower() in TRUE_VALUES


INTERPRET = env_true(os.environ.get("TRITON_INTERPRET"))
AUTOTUNE_ENV = "DECO_OPS_AUTOTUNE"


def autotune_enabled() -> bool:
    """False when ``DECO_OPS_AUTOTUNE=0``: every kernel launches its first fitting config untimed.
    Unset or empty: the default, on (as every deco_ops switch reads an empty value)."""
    setting = os.environ.get(AUTOTUNE_ENV, "").strip() or "1"
    if setting not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {setting!r}")
    return setting == "1"


def bucket(n: int) -> int:
    """Tuning bucket of a row count or key length: the next power of two. Coarse on purpose: LLaVA-1.5
    batches of 1-64 images (144 pooled rows each) fall in 7 buckets (60 with Liger's multiples of
    128 above 1024), videos of 1-32 frames x 576 keys in 6 (32), and a tile config depends on M
    only through its wave count, which a bucket bounds within 2x."""
    return 1 << max(0, n - 1).bit_length()


def config_dict(config: triton.Config) -> dict:
    """The JSON form of a config, as the tuning tables store it."""
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages}


def config_label(config: triton.Config) -> str:
    """``BLOCK_M=64,BLOCK_N=128,...,w4,s3``: a config in one short string."""
    return ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps},s{config.num_stages}"


# deco_ops.tuning_tables installs its lookup here: (kernel name, device, bucket label) -> config dict or None.
table_lookup: Callable[[str, torch.device, str], dict | None] | None = None

# While planning (``planning()``): (kernel name, bucket label, candidates) of every launch, none run.
_plan: list[tuple[str, str, list[triton.Config]]] | None = None

TUNED_KERNELS: list[TunedKernel] = []


@contextlib.contextmanager
def planning() -> Iterator[list[tuple[str, str, list[triton.Config]]]]:
    """Inside the block no Triton kernel runs: autotuned kernels record (name, bucket label,
    candidate configs) and return, plain ``@triton.jit`` launches (direct ones too) return at once;
    the outputs they would write stay unwritten."""
    from triton.runtime.interpreter import InterpretedFunction

    global _plan
    previous, _plan = _plan, []
    launchers = [(cls, cls.run) for cls in (JITFunction, InterpretedFunction, _compiled_launch.CompiledLaunch)]
    for cls, _ in launchers:
        cls.run = lambda self, *args, **kwargs: None
    try:
        yield _plan
    finally:
        _plan = previous
        for cls, run in launchers:
            cls.run = run


class TunedKernel(Autotuner):
    """Triton's ``Autotuner`` with bucketed keys, ``DECO_OPS_AUTOTUNE=0``, tuning tables and no
    timing of a lone candidate (triton 3.6 times even one). A launch whose exact key Triton has
    cached costs one extra check (the planning switch); on a new key Triton's ``run`` asks
    ``prune_configs`` for the candidates, which answers with the one config to launch untimed
    where there is one, and ``_bench`` skips timing that lone config."""

    def __init__(self, fn, configs: list[triton.Config], cuda_configs: list[triton.Config], key: list[str],
                 buckets: tuple[str, ...] = (), prune=None):
        super().__init__(fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None,
                         prune_configs_by={"early_config_prune": prune} if prune else None)
        unknown = [name for name in buckets if name not in key]
        if unknown:
            raise ValueError(f"buckets {unknown} are not in the autotune key {key}")
        self.name = self.base_fn.__name__
        self.cuda_configs = cuda_configs
        self.buckets = frozenset(buckets)
        self.chosen: dict[str, triton.Config] = {}  # bucket label -> config, this process
        self.timings: dict[str, dict[triton.Config, float]] = {}  # bucket label -> what Triton measured
        self._untimed = False  # the current new key launches a preset config
        self._pending: tuple[str, tuple, bool] | None = None  # (label, key, timed) of the last new key
        self._traced: dict[triton.Config, Autotuner] = {}  # config -> the one-config autotuner traces record
        # launches through the compiled kernel (``_compiled_launch``); None under the interpreter
        self.direct = (_compiled_launch.CompiledLaunch(self.fn, super().run, self)
                       if type(self.fn) is JITFunction else None)
        TUNED_KERNELS.append(self)

    def triton_key(self, args: dict) -> tuple:
        """The key ``Autotuner.run`` caches under (triton 3.6 and 3.9 build it alike): the key
        arguments' values, then the dtype of every argument that has one."""
        named = {k: v for k, v in args.items() if k in self.arg_names}
        return tuple([named[k] for k in self.keys if k in named] + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])

    def bucket_label(self, args: dict) -> str:
        """``M=1024 N=4096 ... | bfloat16,...``: the key with bucketed sizes, as the tables store it."""
        values = " ".join(f"{k}={bucket(args[k]) if k in self.buckets else args[k]}" for k in self.keys)
        dtypes = ",".join(str(v.dtype).removeprefix("torch.") for k, v in args.items()
                          if k in self.arg_names and hasattr(v, "dtype"))
        return f"{values} | {dtypes}"

    def candidates(self, configs: list[triton.Config], nargs: dict, kwargs: dict) -> list[triton.Config]:
        """``configs`` that the kernel's prune rules keep for a launch with positional arguments
        ``nargs`` (by name) and keyword arguments ``kwargs``, called as ``Autotuner`` calls them."""
        if self.early_config_prune is None:
            return list(configs)
        return self.early_config_prune(configs, nargs, **kwargs)

    def preset(self, label: str, candidates: list[triton.Config], device: torch.device) -> triton.Config | None:
        """The config to launch untimed for a new key in bucket ``label``, or None to let Triton
        time ``candidates``."""
        if not candidates:  # a caller's fit rule must refuse such a call first; never an IndexError or min() of nothing
            raise RuntimeError(f"deco_ops: no config of {self.name} fits the launch {label} on {device}: its fit rules pruned "
                               "every one (the op's dispatch should not have chosen this kernel)")
        if not autotune_enabled() or len(candidates) == 1:
            return candidates[0]
        known = self.chosen.get(label)
        if known is None and table_lookup is not None:
            entry = table_lookup(self.name, device, label)
            known = next((c for c in candidates if config_dict(c) == entry), None)
        # A stale table entry (other configs or pruning rules) never launches a config that does not fit.
        if known is not None and known in candidates:
            return known
        # Timing inside a CUDA graph capture would record the timed launches into the graph.
        return candidates[0] if capturing(device) else None

    def settle(self) -> None:
        """Record what the last new key ended with (Triton stores it after ``prune_configs``):
        its config for the whole bucket, and the timings if Triton measured them."""
        if self._pending is None:
            return
        label, key, timed = self._pending
        self._pending = None
        if key not in self.cache:  # the launch failed, or it was a warmup (compiles, caches nothing)
            return
        self.chosen.setdefault(label, self.cache[key])
        if timed:
            self.timings[label] = dict(self.configs_timings)

    def prune_configs(self, kwargs: dict) -> list[triton.Config]:
        """Called by ``Autotuner.run`` for a key it has not cached (``self.nargs`` is set): the one
        preset config, or the candidates Triton is to time."""
        self.settle()
        all_args = {**self.nargs, **kwargs}
        label = self.bucket_label(all_args)
        device = next(v.device for v in all_args.values() if isinstance(v, torch.Tensor))
        candidates = self.candidates(self.configs, self.nargs, kwargs)
        config = self.preset(label, candidates, device)
        self._untimed = config is not None
        self._pending = (label, self.triton_key(all_args), not self._untimed)
        return [config] if self._untimed else candidates

    def for_trace(self, args: tuple, kwargs: dict) -> Autotuner:
        """The kernel a ``torch.compile`` trace records for a launch (``kwargs``: no grid): an
        autotuner over the one config an eager launch would take untimed (``preset``: tuning table,
        this process's choice for the bucket, ``DECO_OPS_AUTOTUNE=0``, a lone candidate), so compiled
        and eager calls launch alike; else this autotuner, whose fitting candidates Inductor then
        times itself. Under the interpreter its one config, as eager."""
        nargs = dict(zip(self.arg_names, args))
        named = {**nargs, **kwargs}
        if INTERPRET or any(isinstance(named.get(k), torch.SymInt) for k in self.keys):  # dynamic shapes: no bucket
            return self
        device = next(v.device for v in named.values() if isinstance(v, torch.Tensor))
        config = self.preset(self.bucket_label(named), self.candidates(self.configs, nargs, kwargs), device)
        if config is None:
            return self
        if config not in self._traced:
            self._traced[config] = Autotuner(self.fn, self.arg_names, [config], self.keys, reset_to_zero=None,
                                             restore_value=None)
        return self._traced[config]

    def _bench(self, *args, config, **meta):
        if self._untimed:  # triton 3.6 benchmarks even a single config
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)

    def run(self, *args, **kwargs):
        if _traceable.tracing(args):  # inside torch.compile's trace of an op body: a graph node
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            return _traceable.launch(self.for_trace(args, kwargs), grid, args, kwargs)
        if _plan is not None:
            nargs = dict(zip(self.arg_names, args))
            _plan.append((self.name, self.bucket_label({**nargs, **kwargs}), self.candidates(self.cuda_configs, nargs, kwargs)))
            return None
        if self.direct is not None and _compiled_launch.enabled():
            return self.direct.run(kwargs.pop("grid"), args, kwargs, kwargs.pop("warmup", False))
        return super().run(*args, **kwargs)


def autotuned(cuda_configs: list[triton.Config], interpret_config: triton.Config, key: list[str],
              buckets: tuple[str, ...] = (), prune=None):
    """Decorator: a ``TunedKernel`` over ``cuda_configs`` on a GPU (``prune(configs, named_args,
    **constexprs)`` drops those that cannot fit the call; ``buckets`` names the key arguments that
    are row counts or key lengths), running ``interpret_config`` alone when interpreting."""

    def decorator(fn):
        return TunedKernel(fn, [interpret_config] if INTERPRET else cuda_configs, cuda_configs, key, buckets, prune)

    return decorator


# Opt-in shared memory per block: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}


def device_smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device``; an H100's for the CPU (planning)."""
    if device.type != "cuda":
        return SMEM_LIMIT[90]
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def dot_dtype_workaround(dtype_is_bf16: bool) -> bool:
    """Whether tl.dot operands must be upcast to fp32: Triton's interpreter (3.6 and 3.9) returns
    garbage for bf16 dots, fp16/fp32 are right. Compiled kernels keep bf16 tensor-core dots."""
    return INTERPRET and dtype_is_bf16


def fp32_matmul_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what torch.matmul does with fp32 CUDA operands right now.

    The setting lives in ``torch.backends.cuda.matmul.fp32_precision`` (``"none"`` inherits
    ``torch.backends.fp32_precision``; the legacy ``allow_tf32`` and
    ``torch.set_float32_matmul_precision`` write it too). It is read instead of the legacy
    ``allow_tf32`` or ``torch.get_float32_matmul_precision()``, which raise once the new API was
    used ("mix of the legacy and new APIs").
    """
    setting = torch.backends.cuda.matmul.fp32_precision
    if setting == "none":
        setting = torch.backends.fp32_precision
    return "tf32" if setting == "tf32" else "ieee"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: fp32 dots follow ``fp32_matmul_precision()``, as torch.matmul
    does; 16-bit dots ignore it."""
    if dtype == torch.float32 and fp32_matmul_precision() == "ieee":
        return "ieee"
    return "tf32"


def device_arch(device: torch.device) -> int:
    """Compute capability of ``device`` as an int (90 for H100); an H100's for the CPU (planning)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
