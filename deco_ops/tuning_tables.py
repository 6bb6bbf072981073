"""Per-GPU tuning tables: the tile config every autotuned kernel launches for each shape bucket,
measured once by ``python -m deco_ops.tune`` and shipped inside the package as
``deco_ops/tuning/<GPU name>.json`` (``file_name``), the way vLLM ships its fused-MoE configs.

A CUDA launch whose bucket is in its GPU's table runs that config with no autotuning; a bucket the
table lacks is timed once per process and then serves every other batch size in it
(``deco_ops.kernels._tuning``). A table entry that the kernel's pruning rules no longer keep for
the call (configs changed since it was written) is ignored, never launched.

``DECO_OPS_TUNING_TABLE``: a JSON file to use instead of the shipped table (for every GPU), or
``none`` for no table at all. A table that is not valid JSON, has a section of the wrong type or a
strategy key or winner ``strategy.preload`` refuses raises a ValueError naming the file (and the
variable where it named it).

A table recorded under another triton major.minor than the installed one (its ``triton`` field;
a table without one counts as another) is ignored as a whole, with a warning: tile configs are
compiled and timed by triton, and a new minor version changes both. Its strategy decisions could
not match anyway (their keys name the versions, ``deco_ops.strategy``).

Format (``FORMAT``)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "capability": [9, 0],
     "triton": "3.6.0", "torch": "2.9.0", "shapes": ["llava15_7b", ...],
     "kernels": {"pool_gemm_kernel": {"<bucket label>": {
         "config": {"kwargs": {"BLOCK_M": 128, ...}, "num_warps": 8, "num_stages": 3},
         "timings_ms": {"BLOCK_M=128,...,w8,s3": 0.412, ...}}}},
     "strategies": {"<strategy key>": "<candidate name>"}}

A bucket label is the kernel's autotune key with rows and key lengths bucketed, then the dtypes of
its tensor arguments, e.g. ``M=8192 N=4096 K=1024 ... | bfloat16,bfloat16,...``. Strategy keys and
winners are ``deco_ops.strategy``'s; loading a table hands them to ``strategy.preload``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
import triton

from . import strategy
from ._files import write_json_atomically
from .kernels import _tuning

ENV_VAR = "DECO_OPS_TUNING_TABLE"
TABLE_DIR = Path(__file__).parent / "tuning"
FORMAT = 1

_tables: dict[tuple[str, str], dict] = {}  # (GPU name, DECO_OPS_TUNING_TABLE) -> its table, read once per process


def file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", device_name).strip("_") + ".json"


def table_path(device_name: str) -> Path | None:
    """The table a GPU named ``device_name`` uses: ``$DECO_OPS_TUNING_TABLE``, else the shipped
    one; None when ``DECO_OPS_TUNING_TABLE=none``. A path the variable names must be a file: a
    table the user asked for is never silently replaced by none. A leading ``~`` is expanded, as
    a shell would have (and as ``DECO_OPS_CACHE_DIR``'s is)."""
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() == "none":
        return None
    if not setting:
        return TABLE_DIR / file_name(device_name)
    path = Path(setting).expanduser()
    if not path.is_file():
        raise ValueError(f"{ENV_VAR}={setting!r} is not a file: a table written by python -m deco_ops.tune, or 'none'")
    return path


# The fields a table is read by: their Python types and JSON names (a null ``triton`` is no record)
SECTIONS = {"triton": ((str, type(None)), "a string"), "kernels": (dict, "an object"), "strategies": (dict, "an object")}


def read(path: Path) -> dict:
    """The table at ``path`` ({} if there is none), checked for its format and the types of
    ``SECTIONS``; a ValueError names the file."""
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bytes that are not UTF-8, nesting past Python's stack
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"{path}: not a deco_ops tuning table of format {FORMAT} (write it with python -m deco_ops.tune)")
    for field, (kinds, expected) in SECTIONS.items():
        if field in table and not isinstance(table[field], kinds):
            raise ValueError(f"{path}: its {field!r} must be {expected}, got {json.dumps(table[field])[:80]}")
    for kernel, buckets in table.get("kernels", {}).items():  # read at a kernel's launch: checked here, by name
        entries = buckets.values() if isinstance(buckets, dict) else [None]
        if not all(isinstance(entry, dict) and isinstance(entry.get("config"), dict) for entry in entries):
            raise ValueError(f"{path}: its kernels[{kernel!r}] must map bucket labels to {{\"config\": {{...}}}} objects, "
                             f"got {json.dumps(buckets)[:80]}")
    return table


def major_minor(version: str) -> tuple[str, ...]:
    """``"3.6.0"`` -> ``("3", "6")``."""
    return tuple(version.split(".")[:2])


def same_triton(table: dict, path: Path) -> bool:
    """Whether ``table`` was recorded under the installed triton's major.minor; warns if not."""
    recorded = table.get("triton")
    if isinstance(recorded, str) and major_minor(recorded) == major_minor(triton.__version__):
        return True
    warnings.warn(f"deco_ops: ignoring the tuning table {path}: it was recorded under triton {recorded}, this is triton "
                  f"{triton.__version__} (measure a table for it with python -m deco_ops.tune)", stacklevel=3)
    return False


def write(table: dict, path: Path) -> None:
    """Write ``table`` to ``path`` atomically (a temporary file beside it, then ``os.replace``):
    ``python -m deco_ops.tune`` rewrites its table after every shape, and a run killed mid-write
    must not leave a truncated table that every later op call refuses (``_files``: its mode kept)."""
    write_json_atomically(path, table)


def load(device: torch.device) -> dict:
    """The table of ``device``'s GPU, read once per process; its strategies are preloaded then."""
    return load_named(torch.cuda.get_device_name(device))


def load_named(device_name: str) -> dict:
    """``load`` by GPU name (``torch.cuda.get_device_name``). Called on every measured strategy
    choice, so a table is found by (GPU, ``DECO_OPS_TUNING_TABLE``) in one dict lookup. A table
    from another triton major.minor loads as ``{}``."""
    setting = (device_name, os.environ.get(ENV_VAR, ""))
    table = _tables.get(setting)
    if table is None:
        path = table_path(device_name)
        try:
            table = _adopt(path)
        except ValueError as e:
            if setting[1].strip():  # the user's file: say which setting named it
                raise ValueError(f"{ENV_VAR}: {e}") from e
            raise
        _tables[setting] = table
    return table


def _adopt(path: Path | None) -> dict:
    """The table at ``path`` (None: no table) with its strategies preloaded; ``{}`` for one of
    another triton major.minor. A decision this process already holds as agreed (the user's own
    ``strategy.preload``, the process group's) keeps its winner. A ValueError names the file."""
    table = {} if path is None else read(path)
    if table and not same_triton(table, path):
        table = {}
    try:
        strategy.preload(table.get("strategies", {}), keep_agreed=True)
    except ValueError as e:  # a key or winner preload refuses
        raise ValueError(f"{path}: {e}") from e
    return table


def forget() -> None:
    """Drop the tables read so far (``strategy.forget``, which drops their preloaded decisions):
    the next lookup reads each again and preloads its strategies."""
    _tables.clear()


def lookup(kernel: str, device: torch.device, label: str) -> dict | None:
    """The config dict the table holds for ``kernel``'s bucket ``label`` on ``device``, if any."""
    if device.type != "cuda":
        return None
    entry = load(device).get("kernels", {}).get(kernel, {}).get(label)
    return entry["config"] if entry else None


_tuning.table_lookup = lookup
