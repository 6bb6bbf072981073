"""Replacing a JSON file atomically, with the permissions a plain ``open(path, "w")`` would give.

The strategy cache and the tuning tables are rewritten while other processes read them (ranks of
one node, a tuning run beside training): a reader must see the old file or the new one, never a
half-written one, so each write goes to a temporary file beside the target and ``os.replace``
moves it into place. The temporary file is created as ``open(path, "w")`` creates a file (mode
0666 less the umask, applied by the kernel: no umask is read or changed, so other threads' files
are not affected), and takes the replaced file's mode where there is one, so a table shared
between users stays readable to them (``tempfile.mkstemp`` would make it 0600).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def write_json_atomically(path: Path, value: object) -> None:
    """``json.dump(value)`` (indented, keys sorted, a final newline) to ``path``, atomically; the
    temporary file is removed if anything fails (a ``KeyboardInterrupt`` too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if path.exists():
            os.fchmod(fd, path.stat().st_mode & 0o777)
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
