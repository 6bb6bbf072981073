"""Triton's integer helpers for host code, without their wrapper.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function``s (triton 3.6 and 3.9), so
that kernels can call them on constexprs. Called from Python, each call goes through that
wrapper (an import statement, unwrapping every argument): ≈ 8 µs on a loaded 2-core machine,
about 100x the arithmetic, and the launchers call them for every launch's grid and block sizes.
These are the very functions the wrapper calls (``.fn``), so the results are Triton's own.
"""

import triton

cdiv = triton.cdiv.fn
next_power_of_2 = triton.next_power_of_2.fn
