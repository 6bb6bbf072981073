"""Which implementation of an op runs: its fused Triton kernel, or its *composed* twin built from
the pieces a careful user would use (our pooling kernel + cuBLAS ``addmm`` + the activation in
PyTorch; ``F.scaled_dot_product_attention``'s kernels for attention).

``DECO_OPS_STRATEGY`` selects, per process (``deco_ops.use_strategy`` overrides it per block,
the innermost block wins):

* ``auto`` (default):
  - Triton backend on CUDA: the first call of an op for a *key* (op, GPU name, dtype, shape
    bucket, whether autograd needs the residuals, deterministic mode) times every candidate and
    keeps the fastest; the choice is remembered in memory and in an on-disk cache. Under
    ``torch.use_deterministic_algorithms(True)`` only deterministic candidates compete.
  - Triton backend under Triton's interpreter: ``fused``, so the kernels stay tested.
  - PyTorch backend (CPU tensors by default): ``composed``, PyTorch's own fast kernels.
* ``fused``: the fused Triton kernel (on the PyTorch backend: the reference implementation that
  mirrors it, e.g. the chunked online softmax of ``reference_attention``).
* ``composed``: the composed twin, where the op has one for this call (SDPA cannot express
  attention dropout with our Philox mask, so such calls keep the fused path).

What is timed: one custom op's own work. Forward and backward are separate custom ops with their
own decisions; the fused and composed forwards return identical residuals, so either backward
follows either forward and the forward+backward pair is optimised piece by piece.

Key strings, the format that ``choices()`` returns, ``preload()`` accepts and the on-disk cache
stores (``$DECO_OPS_CACHE_DIR/strategy.json``, default ``~/.cache/deco_ops/strategy.json``, a JSON
object ``{key: winner}``)::

    <op>|<device name>|<dtype>|<shape>|<grad>|<determinism>

* ``op``: the custom op's name without namespace, e.g. ``pool_mlp``, ``cross_attention_backward``.
* ``device name``: ``torch.cuda.get_device_name``, e.g. ``NVIDIA H100 80GB HBM3``.
* ``dtype``: ``float16``, ``bfloat16`` or ``float32``.
* ``shape``: comma-separated ``name=value`` pairs in the op's own order. Row counts and key
  lengths are bucketed by ``bucket()`` (the next power of two); weight dimensions, grids and other sizes are exact; strings such as the activation as is.
* ``grad``: ``grad`` when autograd needs the op's residuals (the forward stores more), else ``infer``.
* ``determinism``: ``deterministic`` under ``torch.use_deterministic_algorithms(True)``, else ``any``.

Winners are candidate names: ``fused`` or ``composed``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _backend
from ._setting import Setting
from .kernels import _tuning

ENV_VAR = "DECO_OPS_STRATEGY"
CACHE_DIR_ENV = "DECO_OPS_CACHE_DIR"
STRATEGIES = ("auto", "fused", "composed")
CANDIDATES = ("fused", "composed")
CACHE_FILE = "strategy.json"

_decisions: dict[str, str] = {}  # measured or preloaded in this process: key -> winner
_disk: dict[str, str] | None = None  # the on-disk cache, read once on first need
_device_names: dict[torch.device, str] = {}  # device -> the name its keys carry


SETTING = Setting(ENV_VAR, STRATEGIES, "strategy")


def selected() -> str:
    """The strategy in force: the innermost ``use_strategy`` block, else ``$DECO_OPS_STRATEGY``."""
    return SETTING.selected()


def use_strategy(name: str) -> contextlib.AbstractContextManager[None]:
    """Force ``"fused"`` or ``"composed"`` (or restore ``"auto"``) inside a ``with`` block; the
    innermost block wins."""
    return SETTING.use(name)


# ----------------------------------------------------------------------------------------------
# keys


def bucket(n: int) -> int:
    """Rows and key lengths share a bucket, the same one the kernels' autotuning uses
    (``deco_ops.kernels._tuning.bucket``: the next power of two), so a new batch size rarely
    means a new measurement and one tuning run covers both decisions."""
    return _tuning.bucket(n)


def make_key(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, **shape) -> str:
    """The key string of one decision (format in the module docstring). ``shape`` values are
    written as given: bucket row counts and key lengths with ``bucket()`` before passing them."""
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    fields = ",".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in shape.items())
    determinism = "deterministic" if torch.are_deterministic_algorithms_enabled() else "any"
    return "|".join((op, name, str(dtype).removeprefix("torch."), fields, "grad" if needs_grad else "infer", determinism))


# ----------------------------------------------------------------------------------------------
# choosing


@dataclass(frozen=True)
class Candidate:
    """One way to run an op on its current inputs: ``run()`` computes it (what is timed)."""

    run: Callable[[], object]
    deterministic: bool = True  # bitwise reproducible from run to run


def choose(candidates: Mapping[str, Candidate], *, on_triton: bool, key: Callable[[], str]) -> str:
    """The name of the candidate to run; the first one listed is the default (``"fused"`` where
    the op has a fused path on this backend).

    ``on_triton``: whether the op runs on the Triton backend (else the PyTorch one). ``key``
    builds the decision's key string; it is only called when a measurement may be needed.
    """
    default = next(iter(candidates))
    forced = selected()
    if forced != "auto":
        return forced if forced in candidates else default
    if not on_triton:
        return "composed" if "composed" in candidates else default
    if _backend.interpreting() or len(candidates) == 1:
        return default
    measured_key = key()
    _preload_shipped_table(measured_key)
    return decide(measured_key, candidates, _time_cuda)


def _preload_shipped_table(key: str) -> None:
    """Hand the decisions of the key's GPU tuning table to ``preload`` before anything is timed
    (the table is otherwise read at a kernel's first unseen launch, which may come later)."""
    from . import tuning_tables  # tuning_tables imports this module

    tuning_tables.load_named(key.split("|")[1])


def implementation(args: tuple, *, on_triton: bool, key: Callable[[], str], fused: Callable | None = None,
                   composed: Callable | None = None, composed_deterministic: bool = True) -> Callable:
    """The function that runs an op's call with ``args``: ``fused`` (None where this backend has
    no fused path) or ``composed`` (None where the composed twin cannot express the call), chosen
    by ``choose`` (a measurement, where one is needed, runs them on ``args``). The choice depends
    on ``args``' signature only, so ``deco_ops._plan`` keeps it per signature."""
    ways = {name: f for name, f in (("fused", fused), ("composed", composed)) if f is not None}
    candidates = {name: Candidate(functools.partial(f, *args), name != "composed" or composed_deterministic)
                  for name, f in ways.items()}
    return ways[choose(candidates, on_triton=on_triton, key=key)]


def run(*, on_triton: bool, key: Callable[[], str], fused: Callable[[], object] | None = None,
        composed: Callable[[], object] | None = None, composed_deterministic: bool = True):
    """Run an op the chosen way (``implementation``, for closures over the call's arguments)."""
    return implementation((), on_triton=on_triton, key=key, fused=fused, composed=composed,
                          composed_deterministic=composed_deterministic)()


def decide(key: str, candidates: Mapping[str, Candidate], timer: Callable[[Callable[[], object]], float]) -> str:
    """The measured choice for ``key``: a decision made or preloaded earlier in this process,
    else one from the on-disk cache, else the fastest candidate by ``timer(run) -> ms``, which is
    then remembered in memory and on disk. Under ``torch.use_deterministic_algorithms(True)``
    only deterministic candidates compete (the first candidate if none is). A candidate that
    raises while it is timed drops out of the competition, with a warning."""
    default = next(iter(candidates))
    usable = dict(candidates)
    if torch.are_deterministic_algorithms_enabled():
        usable = {name: c for name, c in usable.items() if c.deterministic} or {default: candidates[default]}
    known = _decisions.get(key) or _read_disk().get(key)
    if known in usable:
        _decisions[key] = known
        return known
    if len(usable) == 1:
        return next(iter(usable))
    times = {}
    for name, candidate in usable.items():
        try:
            times[name] = timer(candidate.run)
        except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot run loses, it does not crash the op
            if name == default:
                raise
            warnings.warn(f"deco_ops: {key}: the {name} candidate failed and is not used: {type(e).__name__}: {e}", stacklevel=3)
    winner = min(times, key=times.get)
    _decisions[key] = winner
    _write_disk(key, winner)
    return winner


def _time_cuda(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run`` on the GPU (CUDA events, warm, a few repetitions)."""
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median"))


# ----------------------------------------------------------------------------------------------
# the decision table: in memory, preloaded from tuning tables, on disk


def choices() -> dict[str, str]:
    """Every decision made or preloaded in this process, ``key string -> winner``."""
    return dict(_decisions)


def preload(table: Mapping[str, str]) -> None:
    """Adopt decisions (e.g. from a per-GPU tuning table): they are used as they are, never re-timed."""
    for key, winner in table.items():
        if not isinstance(key, str) or key.count("|") != 5:
            raise ValueError(f"preload: {key!r} is not a strategy key string (op|device|dtype|shape|grad|determinism)")
        if winner not in CANDIDATES:
            raise ValueError(f"preload: the winner of {key!r} must be one of {CANDIDATES}, got {winner!r}")
    _decisions.update(table)
    _drop_plans()


def forget() -> None:
    """Drop this process's decisions and its copy of the on-disk cache (the file stays)."""
    global _disk
    _decisions.clear()
    _disk = None
    _drop_plans()


def _drop_plans() -> None:
    """The ops' per-signature plans hold decisions (``deco_ops._plan``): drop them when decisions change."""
    from . import _plan  # _plan imports this module

    _plan.clear()


def cache_path() -> Path:
    """Where measured decisions persist: ``$DECO_OPS_CACHE_DIR/strategy.json`` or ``~/.cache/deco_ops/strategy.json``."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "deco_ops"
    return Path(root) / CACHE_FILE


def _load(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"deco_ops: ignoring the unreadable strategy cache {path}: {e}", stacklevel=3)
        return {}
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and v in CANDIDATES}


def _read_disk() -> dict[str, str]:
    global _disk
    if _disk is None:
        _disk = _load(cache_path())
    return _disk


def _write_disk(key: str, winner: str) -> None:
    """Add one decision to the cache file: re-read it (another process may have written), then
    replace it atomically (write a temporary file beside it, ``os.replace``)."""
    path = cache_path()
    table = _load(path)
    table[key] = winner
    _read_disk()[key] = winner
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".strategy-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"deco_ops: could not write the strategy cache {path}: {e}", stacklevel=3)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
