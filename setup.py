"""Packaging glue: the Triton kernels live in the top-level folder ``kernels/`` of the repository
(Triton-only code, separate from the torch side) and are installed as ``deco_ops.kernels`` so the
distribution never claims the generic top-level name ``kernels``. The mapping itself is declared
in pyproject.toml; this file exists for tools that still call ``setup.py``."""

from setuptools import setup

setup()
