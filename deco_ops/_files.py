"""Replacing a JSON file atomically, with the permissions a plain ``open(path, "w")`` would give.

The strategy cache and the tuning tables are rewritten while other processes read them (ranks of
one node, a tuning run beside training): a reader must see the old file or the new one, never a
half-written one, so each write goes to a temporary file beside the target and ``os.replace``
moves it into place. ``tempfile.mkstemp`` creates that file with mode 0600; the replaced file
keeps its own mode instead (a new one gets 0666 less the umask), so a table shared between users
stays readable to them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomically(path: Path, value: object) -> None:
    """``json.dump(value)`` (indented, keys sorted, a final newline) to ``path``, atomically; the
    temporary file is removed if anything fails (a ``KeyboardInterrupt`` too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
