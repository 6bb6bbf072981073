"""One tiny case per Triton kernel, forward and backward, for ``compute-sanitizer`` (run_gpu.sh):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m benchmarks.sanitize_cases

Shapes are small and awkward (non-divisible grids, 3D, ragged lengths, head dim 72) so masks are
exercised; ops that deco_ops does not expose yet are skipped with a line saying so.
"""

from __future__ import annotations

import sys

import torch

import deco_ops


def _r(*shape, grad=False, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def case_pool_mlp():  # pool_gemm (fwd), gemm_act_grad + unpool (bwd)
    x = _r(2, 27 * 27, 72, grad=True)
    w1, b1, w2, b2 = _r(96, 72, grad=True), _r(96, grad=True), _r(80, 96, grad=True), _r(80, grad=True)
    deco_ops.pool_mlp(x, w1, b1, w2, b2, grid=(27, 27), out_grid=(12, 12)).float().sum().backward()


def case_pool_linear_3d():  # pool_gemm identity epilogue, 3D windows
    x = _r(1, 3 * 7 * 9, 40, grad=True)
    w = _r(24, 40, grad=True)
    deco_ops.pool_linear(x, w, None, grid=(3, 7, 9), out_grid=(2, 3, 4)).float().sum().backward()


def case_pool_tokens():  # adaptive_pool pool/unpool kernels
    x = _r(2, 24 * 24, 33, grad=True)
    deco_ops.adaptive_avg_pool_tokens(x, (24, 24), (7, 7)).float().sum().backward()


def case_mlp_pool():
    x = _r(1, 2 * 9 * 9, 40, grad=True)
    w1, b1, w2, b2 = _r(48, 40, grad=True), _r(48, grad=True), _r(56, 48, grad=True), _r(56, grad=True)
    deco_ops.mlp_pool(x, w1, b1, w2, b2, grid=(2, 9, 9), out_grid=(2, 5, 5)).float().sum().backward()


def case_pool_mlp_packed():
    grids = torch.tensor([[5, 7], [24, 24], [1, 1]], dtype=torch.int32, device="cuda")
    x = _r(int(grids.prod(1).sum()), 40, grad=True)
    w1, b1, w2, b2 = _r(48, 40, grad=True), _r(48, grad=True), _r(56, 48, grad=True), _r(56, grad=True)
    y, _ = deco_ops.pool_mlp_packed(x, grids, w1, b1, w2, b2, stride=2)
    y.float().sum().backward()


def case_cross_attention():  # fwd (incl. kv_lens masking), bwd
    q = _r(1, 33, 3, 72, grad=True)
    k, v = _r(3, 257, 3, 72, grad=True), _r(3, 257, 3, 72, grad=True)
    kv_lens = torch.tensor([257, 100, 0], dtype=torch.int32, device="cuda")
    deco_ops.cross_attention(q, k, v, kv_lens=kv_lens).float().sum().backward()


def case_cross_attention_mask_weights():  # an additive mask in the forward, the weights kernel and its backward
    q = _r(2, 17, 2, 64, grad=True)
    k, v = _r(2, 70, 2, 64, grad=True), _r(2, 70, 2, 64, grad=True)
    mask = torch.randn(2, 1, 17, 70, device="cuda") > -1.0
    out, weights = deco_ops.cross_attention(q, k, v, attn_mask=mask, need_weights=True, average_attn_weights=False)
    (out.float().sum() + weights.float().sum()).backward()


def case_merge_mlp():  # merge_norm_stats + merge_gemm (fwd), merge_norm_backward (bwd): Qwen2-VL's and InternVL's layouts
    for kw, width in (({}, 40), ({"grid": (6, 10), "order": "grid", "norm_position": "post"}, 160)):
        x = _r(2, 60, 40, grad=True)
        nw, nb = _r(width, grad=True), _r(width, grad=True)
        w1, b1, w2, b2 = _r(72, 160, grad=True), _r(72, grad=True), _r(48, 72, grad=True), _r(48, grad=True)
        deco_ops.merge_mlp(x, nw, nb, w1, b1, w2, b2, **kw).float().sum().backward()


def case_tma():  # the opt-in Hopper kernels (sm_90): the TMA GEMM forward and act' backward, the TMA attention forward
    if torch.cuda.get_device_capability() != (9, 0):
        print("tma: skipped (not sm_90)", flush=True)
        return
    with deco_ops.use_strategy("fused_tma"):
        case_pool_mlp()
        q = _r(2, 130, 2, 64, grad=True)
        k, v = _r(2, 300, 2, 64, grad=True), _r(2, 300, 2, 64, grad=True)
        deco_ops.cross_attention(q, k, v).float().sum().backward()  # the warp-specialised 128-query tile
        deco_ops.cross_attention(q[:, :32], k, v, kv_lens=torch.tensor([300, 77], dtype=torch.int32, device="cuda"))


CASES = {
    "pool_mlp": (case_pool_mlp, "pool_mlp"),
    "pool_linear_3d": (case_pool_linear_3d, "pool_linear"),
    "pool_tokens": (case_pool_tokens, "adaptive_avg_pool_tokens"),
    "mlp_pool": (case_mlp_pool, "mlp_pool"),
    "pool_mlp_packed": (case_pool_mlp_packed, "pool_mlp_packed"),
    "cross_attention": (case_cross_attention, "cross_attention"),
    "cross_attention_mask_weights": (case_cross_attention_mask_weights, "cross_attention"),
    "merge_mlp": (case_merge_mlp, "merge_mlp"),
    "tma": (case_tma, "pool_mlp"),
}


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases: no CUDA device")
        return 0
    torch.manual_seed(0)
    failed = 0
    for name, (fn, attr) in CASES.items():
        if not hasattr(deco_ops, attr):
            print(f"{name}: skipped (deco_ops.{attr} missing)", flush=True)
            continue
        try:
            fn()
            torch.cuda.synchronize()
            print(f"{name}: ran", flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
