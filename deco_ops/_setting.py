"""A process-wide choice among named options (the backend, the strategy): read from an environment
variable (default ``auto``), overridable per ``with`` block, checked with an error that names it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class Setting:
    def __init__(self, var: str, choices: tuple[str, ...], what: str):
        self.var = var
        self.choices = choices
        self.what = what  # how the error of a bad ``use(name)`` names the argument
        self.override: str | None = None
        self._parsed: dict[str, str] = {}  # raw environment value -> its checked setting

    def check(self, name: str, source: str) -> str:
        if name not in self.choices:
            raise ValueError(f"{source} must be one of {self.choices}, got {name!r}")
        return name

    def selected(self) -> str:
        """The innermost ``use`` block's choice, else ``$var``, normalised and checked once per
        distinct value (every op call asks)."""
        if self.override is not None:
            return self.override
        raw = os.environ.get(self.var, "auto")
        name = self._parsed.get(raw)
        if name is None:
            name = self._parsed[raw] = self.check(raw.strip().lower() or "auto", self.var)
        return name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Force ``name`` inside a ``with`` block."""
        previous, self.override = self.override, self.check(name, self.what)
        try:
            yield
        finally:
            self.override = previous
