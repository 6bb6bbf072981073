"""Triton kernels of deco_ops, each file one kernel (or one kernel family) with its launcher and
its FLOP / byte counts. Installed as ``deco_ops.kernels``. No autograd, dispatch or argument
checking lives here: callers (``deco_ops``) validate inputs before they reach a launcher."""

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

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    del sys.modules[__name__]
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (this checkout's kernels/ is deco_ops.kernels)",
                                  name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules[__name__]
        raise
