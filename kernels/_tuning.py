"""One place that turns a kernel's CUDA config list into its autotuner.

Under Triton's interpreter there is no driver to time configs (autotuning several of them crashes),
so every kernel runs a single fixed config there; on CUDA it autotunes over ``cuda_configs``.
``deco_ops.aot`` compiles every entry of ``cuda_configs`` ahead of time for sm_90 and sm_80.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuned(cuda_configs: list[triton.Config], interpret_config: triton.Config, key: list[str], prune=None):
    """Decorator: autotune over ``cuda_configs`` on a GPU (after ``prune(configs, named_args,
    **constexprs)`` drops those that cannot fit the call), run ``interpret_config`` alone when
    interpreting."""
    if INTERPRET:
        return triton.autotune(configs=[interpret_config], key=key)
    return triton.autotune(configs=cuda_configs, key=key, prune_configs_by={"early_config_prune": prune} if prune else None)


# Opt-in shared memory per block: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}


def device_smem_limit(t: torch.Tensor) -> int:
    """Shared memory one block may use on ``t``'s GPU."""
    return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin


def dot_dtype_workaround(dtype_is_bf16: bool) -> bool:
    """Whether tl.dot operands must be upcast to fp32: Triton's interpreter (3.6 and 3.9) returns
    garbage for bf16 dots, fp16/fp32 are right. Compiled kernels keep bf16 tensor-core dots."""
    return INTERPRET and dtype_is_bf16


def fp32_matmul_precision() -> str:
    """``"tf32"`` or ``"ieee"``: what torch.matmul does with fp32 CUDA operands right now.

    PyTorch >= 2.9 keeps the setting in ``torch.backends.cuda.matmul.fp32_precision`` (``"none"``
    inherits ``torch.backends.fp32_precision``; the legacy ``allow_tf32`` and
    ``torch.set_float32_matmul_precision`` write it too). Reading ``allow_tf32`` or
    ``torch.get_float32_matmul_precision()`` once the new API was used raises ("mix of the legacy
    and new APIs"), so the legacy flag is read only where the new attribute does not exist.
    """
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is None:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if setting == "tf32" else "ieee"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: fp32 dots follow ``fp32_matmul_precision()``, as torch.matmul
    does; 16-bit dots ignore it."""
    if dtype == torch.float32 and fp32_matmul_precision() == "ieee":
        return "ieee"
    return "tf32"


def device_arch(t: torch.Tensor) -> int:
    """Compute capability of ``t``'s GPU as an int (90 for H100)."""
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor
