"""Triton kernels of deco_ops, each file one kernel (or one kernel family) with its launcher and
its FLOP / byte counts. Installed as ``deco_ops.kernels``. No autograd, dispatch or argument
checking lives here: callers (``deco_ops``) validate inputs before they reach a launcher. The
one exception, the Hopper launchers (``tma_gemm``, ``cross_attention_tma``), refuse tensors a TMA
descriptor cannot address before they build one: a direct call (a benchmark's, a test's) would
otherwise read out of bounds; the ops never reach those refusals (``deco_ops`` picks the pointer
kernels for such tensors)."""

if __name__ == "kernels":
    # Imported as the top-level ``kernels``: a checkout's root is on sys.path (``python -m pytest``,
    # a script run from it), and this folder, which the wheel installs as ``deco_ops.kernels`` only,
    # stands in front of the package that owns that name (Hugging Face's ``kernels``, which
    # ``import transformers`` needs). Hand the name over to the next ``kernels`` on sys.path, or fail
    # as a missing package would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    # Skipped: every checkout of deco_ops on sys.path (this one, another on PYTHONPATH), whose
    # kernels/ would hand the name on again; one is told by a kernel file of ours in it.
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if not os.path.isfile(os.path.join(p or os.curdir, __name__, "pool_gemm.py"))])
    sys.modules.pop(__name__, None)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (this checkout's kernels/ is deco_ops.kernels)",
                                  name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise
