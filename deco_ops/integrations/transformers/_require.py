"""The one place that imports Hugging Face transformers for the integration, with the pip command
in the error when it is missing."""

from __future__ import annotations

import importlib

INSTALL = 'pip install "transformers>=5"'


def transformers_module(name: str = "transformers"):
    """``import name`` (transformers or one of its modules), or ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(f"deco_ops.integrations.transformers needs Hugging Face transformers (tested with 5.24): {INSTALL}") from exc
