"""Triton kernels of deco_ops, each file one kernel (or one kernel family) with its launcher and
its FLOP / byte counts. Installed as ``deco_ops.kernels``. No autograd, dispatch or argument
checking lives here: callers (``deco_ops``) validate inputs before they reach a launcher."""
