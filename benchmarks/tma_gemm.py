"""``python -m benchmarks.tma_gemm``: the persistent TMA GEMM (``kernels/tma_gemm.py``) against
cuBLAS and the current kernels on LLaVA-1.5-7B's projector GEMMs, one short GPU run (issue 22:
"the new GEMM >= 0.95x cuBLAS on the LLaVA shapes").

* first Linear, training forward: ``act(x @ w1.T + b1)`` and the pre-activation, x (32*144, 1024),
  w1 (4096, 1024): ``tma_linear_act`` vs ``F.linear`` alone (the cuBLAS floor) vs ``F.linear`` +
  ``F.gelu`` (the composed twin);
* the backward's dH GEMM: ``dy @ w2 * gelu'(z)`` and ``gelu(z)``, dy (32*144, 4096), w2 (4096, 4096):
  ``tma_gemm_act_grad`` vs ``dy @ w2`` alone (the floor) vs ``gemm_act_grad`` (today's fused kernel)
  vs ``reference.mlp_activation_backward`` (the composed twin).

Each candidate is first checked against an fp32 reference (relative error printed), then timed
with ``do_bench`` (L2 flushed, host time partly hidden) and ``do_bench_cudagraph`` (the GPU alone);
TFLOP/s count 2*M*N*K. Needs an sm_90 GPU; on a CPU under Triton's interpreter it runs tiny twins
of the shapes in fp16 (a smoke test of the script: errors only, CPU times); elsewhere it says so.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .timing import bench_ms

REAL = dict(rows=32 * 144, c=1024, hidden=4096, out=4096)  # LLaVA-1.5-7B, 32 images pooled to 12x12
TINY = dict(rows=72, c=64, hidden=136, out=48)  # more tiles than the interpreter's persistent programs


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def _times_ms(fn) -> tuple[float, float]:
    """(do_bench, do_bench_cudagraph) medians on CUDA; the CPU's median call time and NaN elsewhere."""
    import triton.testing

    fn()
    if not torch.cuda.is_available():
        return bench_ms(fn, torch.device("cpu"), quick=True), float("nan")
    torch.cuda.synchronize()
    bench = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return float(bench), float(graph)


def _table(title: str, flops: float, candidates: dict, ref: torch.Tensor) -> None:
    print(f"\n{title}")
    print("| candidate | rel err vs fp32 | do_bench ms | TFLOP/s | cudagraph ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, (fn, pick) in candidates.items():
        err = _rel(pick(fn()), ref) if pick is not None else float("nan")
        bench, graph = _times_ms(fn)
        print(f"| {name} | {err:.2e} | {bench:.4f} | {flops / bench / 1e9:.0f} | {graph:.4f} | {flops / graph / 1e9:.0f} |")


def main() -> int:
    from deco_ops import _backend, reference
    from deco_ops.kernels import gemm_act_grad, tma_gemm

    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        dev, dtype, size, name = torch.device("cuda"), torch.bfloat16, REAL, torch.cuda.get_device_name()
    elif not torch.cuda.is_available() and _backend.interpreting():
        dev, dtype, size, name = torch.device("cpu"), torch.float16, TINY, "CPU, Triton interpreter, tiny shapes"
    else:
        print("benchmarks.tma_gemm: needs an sm_90 (Hopper) GPU, or a CPU with DECO_OPS_BACKEND=triton; nothing to time")
        return 0
    ROWS, C, HIDDEN, OUT = size["rows"], size["c"], size["hidden"], size["out"]
    torch.manual_seed(0)
    x = torch.randn(ROWS, C, device=dev, dtype=dtype)
    w1 = torch.randn(HIDDEN, C, device=dev, dtype=dtype) * C ** -0.5
    b1 = torch.randn(HIDDEN, device=dev, dtype=dtype)
    ref_pre = F.linear(x.float(), w1.float(), b1.float())
    _table(f"first Linear + GELU, M={ROWS} N={HIDDEN} K={C}, {dtype}, {name}",
           2.0 * ROWS * HIDDEN * C, {
               "tma_linear_act (gelu, pre kept)": (lambda: tma_gemm.tma_linear_act(x, w1, b1, "gelu", True), lambda r: r[1]),
               "F.linear (cuBLAS floor)": (lambda: F.linear(x, w1, b1), lambda r: r),
               "F.linear + F.gelu (composed)": (lambda: F.gelu(F.linear(x, w1, b1)), None),
           }, ref_pre)

    dy = torch.randn(ROWS, OUT, device=dev, dtype=dtype)
    w2 = torch.randn(OUT, HIDDEN, device=dev, dtype=dtype) * OUT ** -0.5
    z = ref_pre.to(dtype)
    ref_dz = (dy.float() @ w2.float()) * reference.ACTIVATION_GRADS["gelu"](z.float())
    _table(f"dH GEMM, dy @ w2 * gelu'(z), M={ROWS} N={HIDDEN} K={OUT}, {dtype}", 2.0 * ROWS * HIDDEN * OUT, {
        "tma_gemm_act_grad": (lambda: tma_gemm.tma_gemm_act_grad(dy, w2, z, "gelu"), lambda r: r[0]),
        "gemm_act_grad (current fused)": (lambda: gemm_act_grad.gemm_act_grad(dy, w2, z, "gelu"), lambda r: r[0]),
        "dy @ w2 (cuBLAS floor)": (lambda: dy @ w2, None),
        "reference.mlp_activation_backward (composed)": (
            lambda: reference.mlp_activation_backward(dy, w2, z, "gelu"), lambda r: r[0]),
    }, ref_dz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
