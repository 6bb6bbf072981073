"""Triton's interpreter without its repeated patching of ``triton.language`` (test-suite speed only).

A kernel launch under ``TRITON_INTERPRET=1`` (``GridExecutor.__call__``) patches the language
modules its kernel sees (``tl``, ``tl.core``: every builtin wrapped for the interpreter) for the
whole grid and restores them at the end. Every call of a ``@triton.jit`` helper inside the kernel
(``InterpretedFunction.__call__``: our window bounds, activations, dot wrappers, and Triton's own
``tl.cdiv`` and the like) patches them again: ``inspect.getmembers`` over the modules, ≈ 0.15 ms
a call, once per helper call per program. Those patches find every builtin already wrapped and
change nothing the kernel runs; they made a fifth to a quarter of the interpreted tests' time
(a 24×24 → 12×12 pooling backward: 3.5 → 2.6 s; test_projector, test_packed, test_mlp_pool and
test_hardening_pool: 349 → 280 s).

``install()`` skips a helper's patch while a launch in the same thread has already patched every
language module the helper sees (Triton's own helpers see ``tl.core``, which our kernel modules do
not import: the first of them patches it, as Triton would, and the later ones are skipped).
Anything else (a launch, a call outside a launch) patches as Triton does. The interpreter is
otherwise untouched: its integer overflow checks (``sanitize_overflow``) and everything it
computes stay as they are; outputs are bit for bit the same (``tests/test_interpreter_speed.py``).
Triton 3.6 and 3.9 have the same ``_patch_lang``; a Triton without it is left alone.
"""

from __future__ import annotations

import contextlib
import inspect
import threading


def install() -> bool:
    """Installs the shim once; False where this Triton's interpreter lacks the functions it wraps."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang, grid_call = getattr(interpreter, "_patch_lang", None), getattr(interpreter.GridExecutor, "__call__", None)
    if patch_lang is None or not hasattr(interpreter, "_LangPatchScope") or getattr(patch_lang, "deco_ops_shim", False):
        return False
    launch = threading.local()  # .patched: the language modules (ids) the running launch has patched

    def language_modules(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once_per_launch(fn):
        patched = getattr(launch, "patched", None)
        if patched is None:  # not inside a launch of this thread: as Triton does
            return patch_lang(fn)
        langs = language_modules(fn)
        if patched and langs <= patched:
            return interpreter._LangPatchScope()  # nothing to patch, nothing to restore
        patched.update(langs)  # the launch's own patch (restored when it ends), or a helper's (never restored, as in Triton)
        return patch_lang(fn)

    def grid_call_in_launch(self, *args, **kwargs):
        outer, launch.patched = getattr(launch, "patched", None), set()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launch.patched = outer

    patch_once_per_launch.deco_ops_shim = True
    patch_once_per_launch.tritons = (patch_lang, grid_call)
    interpreter._patch_lang = patch_once_per_launch
    interpreter.GridExecutor.__call__ = grid_call_in_launch
    return True


@contextlib.contextmanager
def uninstalled():
    """Triton's own interpreter inside the block (where the shim is installed)."""
    from triton.runtime import interpreter

    shim, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    if not getattr(shim, "deco_ops_shim", False):
        yield
        return
    interpreter._patch_lang, interpreter.GridExecutor.__call__ = shim.tritons
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = shim, grid_call
