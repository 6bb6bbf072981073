"""Which implementation of an op runs: its fused Triton kernel, or a *composed* twin built from
the pieces a careful user would use (ATen's adaptive pooling, or our pooling kernel, + cuBLAS
``addmm`` + the activation in PyTorch; the scaled-dot-product-attention kernels of PyTorch for
attention).

Candidates, by name (``CANDIDATES``): ``fused``; ``fused_tma`` (Hopper's TMA-descriptor kernels:
attention's forward, ``kernels/cross_attention_tma.py``; the projectors' first GEMM and the
backward's dz GEMM, ``kernels/tma_gemm.py``: *opt-in*, see below); ``fused_one_kernel`` (the
attention backward for many queries in one kernel, dQ added up by float atomics: not bitwise
reproducible, *opt-in*); ``composed`` (an op's one composed twin);
attention's composed twins on CUDA, one per SDPA kernel that returns the log-sum-exp
(``composed_efficient``, ``composed_flash``, ``composed_cudnn``: ``deco_ops.composed_attention``
says which applies to which call); ``composed_aten`` (the MLP backward's activation step in ATen's
elementwise kernels, where ``composed`` runs our one fused elementwise pass: three ATen launches
against one Triton launch, whose host cost can outweigh the passes it saves). An op offers those
that can express the call, the fused one first.

``DECO_OPS_STRATEGY`` selects (``deco_ops.use_strategy`` overrides it inside a ``with`` block, in
the current thread or context only, the innermost block winning):

* ``auto`` (default):
  - Triton backend on CUDA: the first call of an op for a *key* (below) times every candidate and
    keeps the fastest; the choice is remembered in memory and in an on-disk cache. Under
    ``torch.use_deterministic_algorithms(True)`` only deterministic candidates compete.
  - Triton backend under Triton's interpreter: ``fused``, so the kernels stay tested.
  - PyTorch backend (CPU tensors by default): the composed twin, PyTorch's own fast kernels.
* ``fused``: the fused Triton kernel (on the PyTorch backend: the reference implementation that
  mirrors it, e.g. the chunked online softmax of ``reference_attention``).
* ``composed``: the composed twin where the op has one for this call (SDPA cannot express
  attention dropout with our Philox mask, so such calls keep the fused path); among several, the
  one this process measured or preloaded for the key, else the first that applies. In
  deterministic mode only deterministic ones (none: the default). Never timed.
* ``composed_efficient`` / ``composed_flash`` / ``composed_cudnn`` / ``composed_aten``: that
  kernel where it applies, else as ``composed``.

Deterministic mode wins over a forced name: a candidate that is not bitwise reproducible (ATen's
CUDA pooling backward, SDPA's memory-efficient backward) never runs under
``torch.use_deterministic_algorithms(True)``, forced or not.

Opt-in candidates (``Candidate.opt_in``): kernels no GPU has verified yet. They run only where
selected by name (``DECO_OPS_STRATEGY=fused_tma`` or ``use_strategy("fused_tma")``, for the calls
they can express; other calls take ``fused``); ``auto`` never times or picks them, and a cached or
preloaded decision naming one is ignored (re-measured without it).

What is timed: one custom op's own work, host included (``_time_cuda``: the larger of its GPU
time and its wall time per call back to back). Forward and backward are separate custom ops with
their own decisions; every forward returns the same residuals (the output and the fp32 log-sum-exp in
the op's own layout), so any backward follows any forward and the pair is optimised piece by piece.

Measuring is made safe for training:

* *Versions*: every key ends with the deco_ops, torch and triton versions, so neither the on-disk
  cache nor a tuning table serves a decision measured under other ones.
* *CUDA graph capture*: nothing is timed while the current stream captures: a decision made or
  preloaded in this process, else one from the on-disk cache, else the first candidate (``fused``
  on the Triton backend); such a default is not remembered, the next call outside a capture
  measures.
* *torch.distributed*: once the default process group is initialised with more than one rank,
  each key is decided once for the whole group: the first rank that meets it decides (from its
  cache or by timing) and publishes the winner in the process group's key-value store, and every
  rank uses what the store holds (``DECO_OPS_STRATEGY_SYNC=0`` lets each rank decide alone). No
  rank waits for another, so ranks may meet keys in any order, or never (per-rank image sizes in
  other buckets). A decision a rank made alone (before the process group started) is decided again
  with the others; a capture or a ``torch.compile`` trace reads the store, never the per-rank
  on-disk cache.
* *Determinism*: the key records the mode, and deterministic mode admits only candidates whose
  result is bitwise reproducible.

Key strings, the format that ``choices()`` returns, ``preload()`` accepts and the on-disk cache
stores (``$DECO_OPS_CACHE_DIR/strategy.json``, default ``~/.cache/deco_ops/strategy.json``, a JSON
object ``{key: winner}``)::

    <op>|<device name>|<dtype>|<shape>|<grad>|<determinism>|<versions>

* ``op``: the custom op's name without namespace, e.g. ``pool_mlp``, ``cross_attention_backward``.
* ``device name``: ``torch.cuda.get_device_name``, e.g. ``NVIDIA H100 80GB HBM3``.
* ``dtype``: ``float16``, ``bfloat16`` or ``float32``.
* ``shape``: comma-separated ``name=value`` pairs in the op's own order. Row counts and key
  lengths are bucketed by ``bucket()`` (the next power of two); weight dimensions, grids and other sizes are exact; strings such as the activation as is.
* ``grad``: ``grad`` when autograd needs the op's residuals (the forward stores more), else ``infer``.
* ``determinism``: ``deterministic`` under ``torch.use_deterministic_algorithms(True)``, else ``any``.
* ``versions``: ``versions()``, e.g. ``deco_ops=0.1.0,torch=2.11.0+cu130,triton=3.6.0``.

Winners are candidate names (``CANDIDATES``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from . import _backend, _version
from ._files import write_json_atomically
from ._setting import Setting
from .kernels import _tuning

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # flock's errors where a filesystem has none
try:
    import fcntl
except ImportError:  # not POSIX (Windows): cache writers are not serialised (``_locked``)
    fcntl = None

ENV_VAR = "DECO_OPS_STRATEGY"
CACHE_DIR_ENV = "DECO_OPS_CACHE_DIR"
SYNC_ENV = "DECO_OPS_STRATEGY_SYNC"
CANDIDATES = ("fused", "fused_tma", "fused_one_kernel", "composed", "composed_efficient", "composed_flash", "composed_cudnn",
              "composed_aten")
STRATEGIES = ("auto", *CANDIDATES)
CACHE_FILE = "strategy.json"
LOCK_SUFFIX = ".lock"  # the cache's lock file: strategy.json.lock
KEY_FIELDS = 7

_decisions: dict[str, str] = {}  # measured, agreed or preloaded in this process: key -> winner
# keys of ``_decisions`` this process made alone (before the process group started, or with
# ``DECO_OPS_STRATEGY_SYNC=0``): another rank may hold another winner, so not used while synchronised
_unagreed: set[str] = set()
_disk: dict[str, str] | None = None  # the on-disk cache, read once on first need
# How many choices ``decide`` made without deciding (inside a CUDA graph capture): a plan built
# while it grew holds one, and ``deco_ops._plan`` does not keep it, so the next call outside the
# capture measures.
provisional = 0
_device_names: dict[torch.device, str] = {}  # device -> the name its keys carry


SETTING = Setting(ENV_VAR, STRATEGIES, "strategy")


def selected() -> str:
    """The strategy in force: the innermost ``use_strategy`` block, else ``$DECO_OPS_STRATEGY``."""
    return SETTING.selected()


def use_strategy(name: str) -> contextlib.AbstractContextManager[None]:
    """Force ``"fused"``, ``"composed"``, one named composed candidate or an opt-in one such as
    ``"fused_tma"`` (or restore ``"auto"``) inside a ``with`` block, in the current thread or context only; the innermost block wins."""
    return SETTING.use(name)


def is_composed(name: str) -> bool:
    """Whether a candidate name is one of the composed twins."""
    return name.startswith("composed")


# ----------------------------------------------------------------------------------------------
# keys


def bucket(n: int) -> int:
    """Rows and key lengths share a bucket, the same one the kernels' autotuning uses
    (``deco_ops.kernels._tuning.bucket``: the next power of two), so a new batch size rarely
    means a new measurement and one tuning run covers both decisions."""
    return _tuning.bucket(n)


@functools.cache
def versions() -> str:
    """The last field of every key: the versions whose kernels a decision was measured with
    (``deco_ops.__version__``: a source checkout's is its pyproject.toml's, so two checkouts of
    different versions never share a decision)."""
    return f"deco_ops={_version.version()},torch={torch.__version__},triton={triton.__version__}"


def make_key(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, **shape) -> str:
    """The key string of one decision (format in the module docstring). ``shape`` values are
    written as given: bucket row counts and key lengths with ``bucket()`` before passing them."""
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    fields = ",".join(f"{k}={_field(v)}" for k, v in shape.items())
    determinism = "deterministic" if torch.are_deterministic_algorithms_enabled() else "any"
    return "|".join((op, name, _field(dtype), fields, "grad" if needs_grad else "infer", determinism, versions()))


def _field(value) -> str:
    """A key field: a sequence as ``AxB``, a dtype by its name (``bfloat16``), anything else as ``str``."""
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


# ----------------------------------------------------------------------------------------------
# choosing


class Candidate(NamedTuple):
    """One way to run an op on its current inputs: ``run()`` computes it (what is timed). A named
    tuple: an op call outside a plan (autocast, the dispatcher path) builds a few per decision, at
    0.15 us each where a frozen dataclass took 0.6."""

    run: Callable[[], object]
    deterministic: bool = True  # bitwise reproducible from run to run
    opt_in: bool = False  # never verified on a GPU: runs only when selected by name, never under auto


def choose(candidates: Mapping[str, Candidate], *, on_triton: bool, key: Callable[[], str],
           device: torch.device | None = None) -> str:
    """The name of the candidate to run; the first one listed is the default (``"fused"`` where
    the op has a fused path on this backend).

    ``on_triton``: whether the op runs on the Triton backend (else the PyTorch one). ``key``
    builds the decision's key string; it is only called when a decision may be looked up.
    ``device``: the call's device, where a measurement runs (``_on_device``).
    """
    default = next(iter(candidates))
    forced = selected()
    if forced == "auto" and on_triton:
        if _backend.interpreting() or len(candidates) == 1:
            return default
        if torch.compiler.is_compiling():
            return _traced_choice(candidates, key)
        measured_key = key()
        _preload_shipped_table(measured_key)
        with _on_device(device):
            return decide(measured_key, candidates, _time_cuda)
    if forced in candidates and (candidates[forced].deterministic or not torch.are_deterministic_algorithms_enabled()):
        return forced
    if forced == "auto" or is_composed(forced):
        return _composed_choice(candidates, key) or default
    return default


def _on_device(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Makes the call's CUDA device current for its decision. The launchers run the candidates
    on their inputs' device (``kernels/_device.py``), but the timer's CUDA events, its
    synchronisations and the capture check act on the current device: for inputs on ``cuda:1``
    while ``cuda:0`` is current (Hugging Face ``device_map="auto"``) they would time nothing of
    the candidates' GPU work and decide on host time alone."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _composed_choice(candidates: Mapping[str, Candidate], key: Callable[[], str]) -> str | None:
    """The composed candidate a forced ``composed`` (or the PyTorch backend's ``auto``) runs, None
    if there is none: among several, the one measured or preloaded for the key if any, else the
    first listed; under ``torch.use_deterministic_algorithms(True)`` deterministic ones only (None
    if no composed one is: the caller's default runs, e.g. our un-pooling gather where ATen's CUDA
    pooling backward would raise)."""
    composed = [name for name in candidates if is_composed(name)]
    if torch.are_deterministic_algorithms_enabled():
        composed = [name for name in composed if candidates[name].deterministic]
    if len(composed) > 1:
        known_key = key()
        _preload_shipped_table(known_key)  # as an auto decision would: the choice must not depend on which came first
        known = _held(known_key)
        if known in composed:
            return known
    return composed[0] if composed else None


def _traced_choice(candidates: Mapping[str, Candidate], key: Callable[[], str]) -> str:
    """The choice while ``torch.compile`` traces an op body (FakeTensors: nothing can be timed, and
    the graph keeps what is chosen here): the decision held for the key (made by an eager call,
    preloaded or in the GPU's tuning table), else as inside a capture (``_untimed``: under
    torch.distributed the group's published one, not the rank's own disk, which may differ and
    make ranks compile different graphs; else the on-disk one), else the default. Symbolic sizes (dynamic shapes) have no key: the default."""
    usable = _usable(candidates)
    default = next(iter(usable))
    try:
        known_key = key()
    except AttributeError:  # bucket() of a SymInt: int.bit_length has no symbolic twin
        return default
    _preload_shipped_table(known_key)
    known = _held(known_key)
    return known if known in usable else _untimed(known_key, usable, _synchronised())


def _preload_shipped_table(key: str) -> None:
    """Hand the decisions of the key's GPU tuning table to ``preload`` before anything is timed
    (the table is otherwise read at a kernel's first unseen launch, which may come later)."""
    from . import tuning_tables  # tuning_tables imports this module

    tuning_tables.load_named(key.split("|")[1])


def implementation(args: tuple, *, on_triton: bool, key: Callable[[], str], fused: Callable | None = None,
                   composed: Callable | None = None, composed_deterministic: bool = True,
                   composed_kernels: Mapping[str, Candidate] | None = None) -> Callable:
    """The function that runs an op's call with ``args``: ``fused`` (None where this backend has
    no fused path), ``composed`` (None where the composed twin cannot express the call) or, for an
    op with several composed twins, one of ``composed_kernels`` (named candidates whose ``run``
    takes ``args``, in order of preference), chosen by ``choose`` (a measurement, where one is
    needed, runs them on ``args``). The choice depends on ``args``' signature only, so
    ``deco_ops._plan`` keeps it per signature."""
    ways = {name: Candidate(f, name != "composed" or composed_deterministic)
            for name, f in (("fused", fused), ("composed", composed)) if f is not None}
    ways.update(composed_kernels or {})
    candidates = {name: Candidate(functools.partial(c.run, *args), c.deterministic, c.opt_in) for name, c in ways.items()}
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    return ways[choose(candidates, on_triton=on_triton, key=key, device=device)].run


def decide(key: str, candidates: Mapping[str, Candidate], timer: Callable[[Callable[[], object]], float]) -> str:
    """The measured choice for ``key`` (the rules of the module docstring): a decision made,
    agreed or preloaded earlier in this process; else, inside a CUDA graph capture, one that
    needs no timing; else one from the on-disk cache or the fastest candidate by
    ``timer(run) -> ms`` (remembered in memory and on disk), under torch.distributed decided once
    for the process group (``_agree``). Under ``torch.use_deterministic_algorithms(True)`` only
    deterministic candidates compete (the first candidate if none is). A candidate that raises
    while it is timed drops out of the competition, with a warning."""
    usable = _usable(candidates)
    known = _held(key)
    if known in usable:
        return known
    if len(usable) == 1:
        return next(iter(usable))
    synchronised = _synchronised()
    if capturing():
        global provisional
        provisional += 1
        return _untimed(key, usable, synchronised)
    winner = _agree(key, usable, lambda: _measure(key, usable, timer)) if synchronised else _measure(key, usable, timer)
    _decisions[key] = winner
    if synchronised:
        _unagreed.discard(key)
    else:
        _unagreed.add(key)
    return winner


def _held(key: str) -> str | None:
    """The decision this process holds for ``key``, if any. Under torch.distributed one this rank
    made alone (before the process group started, or with ``DECO_OPS_STRATEGY_SYNC=0``) is dropped
    instead: another rank may hold another winner, and the group's is agreed (``_agree``).
    Agreed and preloaded ones stay."""
    if key in _unagreed and _synchronised():
        _unagreed.discard(key)
        _decisions.pop(key, None)  # another thread may have dropped it first
    return _decisions.get(key)


def _usable(candidates: Mapping[str, Candidate]) -> dict[str, Candidate]:
    """The candidates ``auto`` may run: never the opt-in ones; under
    ``torch.use_deterministic_algorithms(True)`` the deterministic ones (the first candidate if none
    is), else all."""
    candidates = {name: c for name, c in candidates.items() if not c.opt_in}
    if torch.are_deterministic_algorithms_enabled():
        default = next(iter(candidates))
        return {name: c for name, c in candidates.items() if c.deterministic} or {default: candidates[default]}
    return dict(candidates)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (timing there would record the
    timed runs into the graph, and the synchronisation it needs is illegal). Never where this
    process has not initialised CUDA (no capture can be running): asking would initialise it, which
    fails in a worker forked from a process that has (seen on the H200: a gloo rank deciding a key)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _untimed(key: str, usable: Mapping[str, Candidate], synchronised: bool) -> str:
    """The choice where nothing can be timed (a capture, a ``torch.compile`` trace) and no
    decision is held: under torch.distributed the group's published one (``_published``; never a
    rank's own disk, which may differ: held from now on, as agreed), else the on-disk cache's, else
    the first usable candidate (neither remembered)."""
    known = _published(key) if synchronised else _read_disk().get(key)
    if known not in usable:
        return next(iter(usable))
    if synchronised:  # the group's decision: agreed, so held from now on (a default or a rank's disk is not)
        _decisions[key] = known
    return known


def _measure(key: str, usable: Mapping[str, Candidate], timer: Callable[[Callable[[], object]], float]) -> str:
    """This process's own decision: the on-disk cache's, else the fastest by ``timer``, written to disk."""
    known = _read_disk().get(key)
    if known in usable:
        return known
    default = next(iter(usable))
    times = {}
    for name, candidate in usable.items():
        try:
            times[name] = timer(candidate.run)
        except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot run loses, it does not crash the op
            if name == default:
                raise
            warnings.warn(f"deco_ops: {key}: the {name} candidate failed and is not used: {type(e).__name__}: {e}", stacklevel=4)
    winner = min(times, key=times.get)
    _write_disk(key, winner)
    return winner


def _synchronised() -> bool:
    """Whether decisions are agreed across ranks: the default process group is initialised with
    more than one rank and ``$DECO_OPS_STRATEGY_SYNC`` is not ``0`` (unset or empty: the default, ``1``)."""
    setting = os.environ.get(SYNC_ENV, "").strip() or "1"
    if setting not in ("0", "1"):
        raise ValueError(f"{SYNC_ENV} must be 0 or 1, got {setting!r}")
    if setting == "0" or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    # the fake backend: one process standing in for many (compile or memory estimates), nothing to agree with
    return torch.distributed.get_world_size() > 1 and torch.distributed.get_backend() != "fake"


STORE_PREFIX = "deco_ops/strategy/"  # the group's decisions in its key-value store: prefix + key -> winner


def _agree(key: str, usable: Mapping[str, Candidate], decide_here: Callable[[], str]) -> str:
    """The process group's one decision for ``key``: the one published in the group's key-value
    store, else this rank's own (``decide_here``: its on-disk cache or its timing), published with
    ``compare_set`` (set only where the key is missing, atomically: two ranks deciding at once both
    adopt the first write). Every rank reads the store on its own, without waiting for another (a
    broadcast would leave a rank waiting for one that never meets the key: per-rank image sizes in
    another bucket, a rank that forces a strategy), so ranks may meet keys in any order."""
    winner = _published(key)
    if winner is None:
        mine = decide_here()
        try:
            winner = _store().compare_set(STORE_PREFIX + key, "", mine).decode()
        except RuntimeError as e:  # a store that cannot (``_store_cannot_agree``)
            _store_cannot_agree(e)
            winner = mine
    if winner not in usable:
        raise RuntimeError(
            f"deco_ops: rank {torch.distributed.get_rank()} decides {key!r}, and the process group's decision is "
            f"{winner!r}, which cannot run here (candidates: {tuple(usable)}). Decide on one rank and preload the "
            f"decisions on every rank (strategy.choices() / strategy.preload()), or set {SYNC_ENV}=0 to let each rank decide alone."
        )
    return winner


def _store() -> torch.distributed.Store:
    """The default process group's key-value store (the one ``init_process_group`` rendezvoused
    through, or was given as ``store=``), which every rank reads and writes without a collective."""
    return torch.distributed.distributed_c10d._get_default_store()


def _published(key: str) -> str | None:
    """The process group's decision for ``key`` if a rank has published one, else None (never waits)."""
    store, name = _store(), STORE_PREFIX + key
    try:
        return store.get(name).decode() if store.check([name]) else None
    except RuntimeError as e:
        _store_cannot_agree(e)
        return None


_store_refused = False  # whether ``_store_cannot_agree`` warned in this process


def _store_cannot_agree(error: RuntimeError) -> None:
    """A store without ``check``/``compare_set`` (MPI's placeholder, a Python store that leaves them
    out: c10d's "pure virtual function" error) or one that fails them: each rank decides alone,
    with one warning per process."""
    global _store_refused
    if not _store_refused:
        _store_refused = True
        warnings.warn(f"deco_ops: the process group's store cannot agree strategy decisions ({error}); each rank decides "
                      "alone: preload one table on every rank (strategy.preload) for identical kernels", stacklevel=4)


def _time_cuda(run: Callable[[], object]) -> float:
    """Milliseconds per call of ``run`` as a model's stream of calls pays them: the larger of its
    GPU time (``_gpu_ms``) and its wall time per call back to back, host included
    (``_back_to_back_ms``). GPU time alone crowns a candidate whose host work (a Triton launch
    costs 30-100 us of Python on the H200 VMs) outlasts its kernels; ``do_bench`` hides that work
    behind its L2 flush, and on the H200 ``auto`` lost to its own forced composed path by it
    (0.80x pool_mlp, 0.63x BLIP-2 forward+backward, docs/strategy.md). Wall time alone sees
    warm-L2 reruns of the same inputs, which a model's call does not get."""
    gpu = _gpu_ms(run)
    return max(gpu, _back_to_back_ms(run, torch.cuda.synchronize, gpu))


def _gpu_ms(run: Callable[[], object]) -> float:
    """Median milliseconds of ``run`` on the GPU (CUDA events around each call, L2 flushed before it)."""
    import triton.testing

    return float(triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median"))


def _back_to_back_ms(run: Callable[[], object], synchronize: Callable[[], object], gpu_ms: float,
                     clock: Callable[[], float] = time.perf_counter) -> float:
    """Wall milliseconds per call of ``run`` (``gpu_ms`` of GPU work) called back to back between
    two ``synchronize()`` (host and device overlap as in a model), the best of up to 5 rounds: a
    busy host slows a round, never speeds it up. A first round of 3 calls measures the call; the
    later ones make about a millisecond of calls each (3 to 50: the tail of the last call, which
    the closing synchronisation waits for, stays a small part), until 5 rounds or about 5 ms of
    calls in all: a 100 ms call runs 3 more times (``do_bench`` runs it about 7), a call of 1 ms
    of host work 6 times, a 10 us call 203 times."""
    best, spent, calls = math.inf, 0.0, 3
    for _ in range(5):
        synchronize()
        start = clock()
        for _ in range(calls):
            run()
        synchronize()
        elapsed = (clock() - start) * 1e3
        best, spent = min(best, elapsed / calls), spent + elapsed
        if spent >= 5.0:
            break
        calls = max(3, min(50, math.ceil(1.0 / max(gpu_ms, best, 1e-3))))
    return best


# ----------------------------------------------------------------------------------------------
# the decision table: in memory, preloaded from tuning tables, on disk


def choices() -> dict[str, str]:
    """Every decision made or preloaded in this process, ``key string -> winner``."""
    return dict(_decisions)


def preload(table: Mapping[str, str], *, keep_agreed: bool = False) -> None:
    """Adopt decisions (e.g. from a per-GPU tuning table): they are used as they are, never re-timed.
    Under torch.distributed, preload the same decisions on every rank. With ``keep_agreed`` (a
    tuning table read at the first call) a key this process already holds preloaded or agreed
    keeps its winner; one it measured alone gives way."""
    if not isinstance(table, Mapping):
        raise TypeError(f"preload: table must be a mapping of strategy key strings to winners, got {type(table).__name__}")
    for key, winner in table.items():
        if not isinstance(key, str) or key.count("|") != KEY_FIELDS - 1:
            raise ValueError(f"preload: {key!r} is not a strategy key string (op|device|dtype|shape|grad|determinism|versions)")
        if winner not in CANDIDATES:
            raise ValueError(f"preload: the winner of {key!r} must be one of {CANDIDATES}, got {winner!r}")
    if keep_agreed:
        table = {key: winner for key, winner in table.items() if key not in _decisions or key in _unagreed}
    _decisions.update(table)
    _unagreed.difference_update(table)
    _drop_plans()


def forget() -> None:
    """Drop this process's decisions and its copy of the on-disk cache (the file stays), and the
    tuning tables read so far: the next decision preloads its GPU's table again."""
    from . import tuning_tables  # tuning_tables imports this module

    global _disk
    _decisions.clear()
    _unagreed.clear()
    _disk = None
    tuning_tables.forget()
    _drop_plans()


def _drop_plans() -> None:
    """The ops' per-signature plans hold decisions (``deco_ops._plan``): drop them when decisions change."""
    from . import _plan  # _plan imports this module

    _plan.clear()


def cache_path() -> Path:
    """Where measured decisions persist: ``$DECO_OPS_CACHE_DIR/strategy.json`` or
    ``~/.cache/deco_ops/strategy.json`` (a leading ``~`` expanded, as a shell would have; set but
    blank, the default, as every deco_ops setting reads a blank value)."""
    root = os.environ.get(CACHE_DIR_ENV, "")
    root = root if root.strip() else Path.home() / ".cache" / "deco_ops"
    return Path(root).expanduser() / CACHE_FILE


def _load(path: Path) -> dict[str, str]:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past Python's stack
        warnings.warn(f"deco_ops: ignoring the unreadable strategy cache {path}: {e}", stacklevel=3)
        return {}
    if not isinstance(table, dict):
        warnings.warn(f"deco_ops: ignoring the strategy cache {path}: not a JSON object of key -> winner", stacklevel=3)
        return {}
    kept = {k: v for k, v in table.items() if isinstance(k, str) and v in CANDIDATES}
    if len(kept) < len(table):
        dropped = [k for k in table if k not in kept]
        warnings.warn(f"deco_ops: ignoring {len(dropped)} entries of the strategy cache {path} whose winner is not one of "
                      f"{CANDIDATES}, e.g. {dropped[0]!r} -> {table[dropped[0]]!r}", stacklevel=3)
    return kept


def _read_disk() -> dict[str, str]:
    global _disk
    if _disk is None:
        _disk = _load(cache_path())
    return _disk


def _write_disk(key: str, winner: str) -> None:
    """Add one decision to the cache file: under its lock (``_locked``), re-read it (another
    process may have written), then replace it atomically (``_files.write_json_atomically``)."""
    path = cache_path()
    _read_disk()[key] = winner
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            table = _load(path)
            table[key] = winner
            write_json_atomically(path, table)
    except OSError as e:
        warnings.warn(f"deco_ops: could not write the strategy cache {path}: {e}", stacklevel=3)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive ``fcntl.flock`` on ``<path>.lock`` (kept beside the cache): writers
    then re-read, merge and replace the cache one at a time. Two at once (ranks of one node, jobs
    sharing a home) would each replace it with their own merge, the first one's entry lost.
    Without fcntl (not POSIX): no lock."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + LOCK_SUFFIX), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError as e:  # a filesystem without flock (some network mounts): written unlocked
            if e.errno not in _NO_FLOCK:
                raise
        yield
