"""``deco_ops.__version__``: for a source checkout (a pyproject.toml of ``deco-ops`` beside the
package), the version its pyproject.toml declares, installed or not (the metadata of an editable
install, or of another checkout's, may name another version); else the installed distribution's
version (its metadata)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "deco-ops"


def version() -> str:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = pyproject.read_text() if pyproject.is_file() else ""
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if found and re.search(rf'^name\s*=\s*"{DISTRIBUTION}"', text, re.M):
        return found.group(1)
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = version()
