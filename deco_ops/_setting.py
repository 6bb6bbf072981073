"""A choice among named options (the backend, the strategy): read from an environment variable
(default ``auto``), overridable per ``with`` block, checked with an error that names it.

Overrides live in a ``contextvars.ContextVar``: a ``use`` block affects the thread (or asyncio
task) that entered it and nothing else, so two threads that force different choices never see
each other's. A new thread starts without overrides (it reads the environment variable).
torch.compile cannot trace ``ContextVar.get`` nor guard on it: code it traces (the ops' argument
checks, and on CUDA the ops' bodies with their strategy choice) keeps the override in force when it
traced the graph; an op that stays one opaque node reads it when it runs (docs/strategy.md)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator, Mapping

import torch

from . import _checkpoint


def environ_entry(name: str) -> tuple[Mapping, object]:
    """(mapping, key) such that ``mapping.get(key)`` reads ``$name`` in one dictionary lookup: on
    CPython ``os.environ``'s own dict (which ``os.environ[...] = ...`` and ``monkeypatch.setenv``
    update) and the key encoded once, the value left as stored (bytes on POSIX; ``decode`` gives
    the string). ``os.environ.get`` runs four Python functions per read (Mapping.get,
    __getitem__, the key's encoding), paid by every op call that reads a setting."""
    data = getattr(os.environ, "_data", None)
    return (os.environ, name) if data is None else (data, os.environ.encodekey(name))


def decode(raw) -> str:
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


# Each setting's ``use`` overrides by the setting's ``what`` (a string: see ``_override``)
_OVERRIDES: dict[str, contextvars.ContextVar[str | None]] = {}


@torch.compiler.assume_constant_result
def _override(what: str) -> str | None:
    """The innermost ``use`` block's choice of the setting named ``what`` in the current context, or
    None. A function of a string, not a method: torch 2.11's dynamo calls an assume_constant_result
    function only with constant arguments, and a ``Setting`` is not one (seen on the H200)."""
    return _OVERRIDES[what].get()


class Setting:
    def __init__(self, var: str, choices: tuple[str, ...], what: str):
        self.var = var
        self.environ, self.env_key = environ_entry(var)  # ``environ.get(env_key)``: the raw value
        self.choices = choices
        self.what = what  # how the error of a bad ``use(name)`` names the argument
        # the innermost ``use`` block's choice in this context (None: none)
        self.overrides: contextvars.ContextVar[str | None] = contextvars.ContextVar(f"deco_ops_{what}", default=None)
        if what in _OVERRIDES:  # ``_override`` finds a setting's overrides by this name alone
            raise ValueError(f"a setting named {what!r} exists already")
        _OVERRIDES[what] = self.overrides
        self._parsed: dict[object, str] = {}  # raw environment value -> its checked setting
        # The value at import, known before any call: a process's first call, if compiled, then
        # guards on it being there instead of missing (which the next eager call would change,
        # recompiling the graph once). A bad value raises where it is used, naming the variable.
        with contextlib.suppress(ValueError):
            self._parse(self.environ.get(self.env_key))

    def check(self, name: str, source: str) -> str:
        if name not in self.choices:
            raise ValueError(f"{source} must be one of {self.choices}, got {name!r}")
        return name

    def state(self) -> tuple[str | None, object]:
        """What the setting's value is a function of: (the innermost ``use`` block's choice or None,
        ``$var`` as stored). The one rule for reading a setting: code that acts on it asks
        ``selected()`` (checked); code that only tells settings apart (a plan's key,
        ``deco_ops._plan``) holds ``state()``, two dictionary lookups, and asks ``selected()``
        when it acts (building the plan), so a bad value raises there, once per value."""
        return self.overrides.get(), self.environ.get(self.env_key)

    def selected(self) -> str:
        """The innermost ``use`` block's choice, else ``$var``, normalised and checked once per
        distinct value (every op call asks)."""
        forced = _override(self.what)
        if forced is not None:
            return forced
        raw = self.environ.get(self.env_key)
        name = self._parsed.get(raw)
        return self._parse(raw) if name is None else name

    def _parse(self, raw) -> str:
        """``raw`` ($var as stored, or None) checked, and remembered but while ``torch.compile``
        traces: Dynamo guards the compiled code on the cache missing the value, and an entry added
        later in the same compile (AOTAutograd tracing the ops' bodies) fails that guard at once (a
        process whose first call was compiled raised "Guard failed on the same frame it was
        created"). On torch 2.10 and 2.11 ``is_compiling()`` is False while AOTAutograd runs the graph
        (its metadata pass), so the compile's own context is asked too."""
        name = self.check(("auto" if raw is None else decode(raw)).strip().lower() or "auto", self.var)
        if not (torch.compiler.is_compiling() or torch._guards.CompileContext.try_get() is not None):
            self._parsed[raw] = name
        return name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Force ``name`` inside a ``with`` block, in the current thread / context only; spelled as
        the environment variable may be (any case, surrounding spaces)."""
        name = self.check(name.strip().lower() if isinstance(name, str) else name, self.what)
        _checkpoint.recompute_in_this_context()  # a block opened inside a checkpointed region: its recompute starts outside it
        token = self.overrides.set(name)
        try:
            yield
        finally:
            self.overrides.reset(token)
