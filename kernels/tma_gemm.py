"""A persistent, TMA, warp-specialised GEMM for Hopper with the projector's two epilogues.

    BIAS_ACT:  out[m, n] = act(sum_k a[m, k] * w[n, k] + b[n])    w (N, K): nn.Linear's weight
               pre[m, n] = sum_k a[m, k] * w[n, k] + b[n]          (kept for backward on request)
    ACT_GRAD:  dz[m, n]  = (sum_k a[m, k] * w[k, n]) * act'(z[m, n])   a = dy, w (K, N): dy @ w2
               aux[m, n] = act(z[m, n])                             (rebuilt for dW2 = dy.T @ act(z))

The same tile loop as ``gemm_act_grad.py`` and the first GEMM of ``pool_gemm.py``, written the way
Triton's persistent-matmul tutorial writes Hopper GEMMs that reach cuBLAS:

* a persistent grid: one program per SM, each walking output tiles ``NUM_SMS`` apart in grouped
  order (``tiling.grouped_tile``), so there is no tail wave and the loads of a program's next tile
  overlap the epilogue of its current one;
* every operand moves through tensor descriptors (``tl.make_tensor_descriptor``): TMA copies on
  sm_90, out-of-bounds rows and columns read as zero and are clipped on store, so M, N and K need
  no masks (the row strides must be 16-byte multiples, which the launcher checks);
* the tile loop is ``tl.range(..., warp_specialize=True, flatten=False)``: Triton 3.6+ on sm_90
  then splits the program into a producer warpgroup issuing the TMA loads and consumer warpgroups
  running wgmma and the epilogue, with register reallocation between them. It does so only for
  descriptor loads with ``num_warps=4`` (its conditions are otherwise silently unmet), hence the
  configs below; ``python -m deco_ops.aot`` checks each config's SASS for TMA, USETMAXREG and HGMMA.

The epilogue works on the whole tile. The tutorial's EPILOGUE_SUBTILE (column halves through
reshape/permute/split, as ``gemm_act_grad.py`` does) stops triton 3.6's warp specialisation: its
data partitioning of the consumers fails the compile ("unsupported op type", WSDataPartition.cpp). So the tile
sizes carry the epilogue instead: 128x128 or 128x64 for BIAS_ACT, 128x64 only for ACT_GRAD, whose
z, act'(z) and act(z) beside a 128-wide accumulator spill (``fits``).

Counts (16-bit operands, ``elem`` bytes):
    flops = 2 * M * N * K
    bytes = (M*K + N*K + M*N * (1 + stored_pre)) * elem            BIAS_ACT
    bytes = (M*K + N*K + 3*M*N) * elem                             ACT_GRAD
"""

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from . import activations
from ._device import on_input_device
from ._host_arith import cdiv
from ._traceable import tracing
from .dot import dot
from .tiling import INTERPRET_CONFIG, gemm_configs, grouped_tile
from ._tuning import INTERPRET, autotuned, device_arch, device_smem_limit, dot_dtype_workaround

BIAS_ACT, ACT_GRAD = 0, 1
# TMA needs 16-byte aligned base addresses and row strides.
TMA_ALIGN_BYTES = 16


def cuda_configs() -> list[triton.Config]:
    """128-row tiles on one warpgroup per 64 rows: with ``num_warps=4`` Triton's automatic warp
    specialisation gives the tile a producer warpgroup and two 64-row consumer warpgroups."""
    return gemm_configs([
        (128, 128, 64, 4, 4),
        (128, 128, 64, 4, 3),
        (128, 64, 64, 4, 4),
    ])


def smem_bytes(config: triton.Config, elem_bytes: int) -> int:
    """Shared memory of a config: its A and W stages plus two output tiles staged for TMA (the
    stored tile and the pre-activation or z / act(z) beside it)."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (config.num_stages * (bm + bn) * bk + 2 * bm * bn) * elem_bytes


def fits(config: triton.Config, elem_bytes: int, smem_limit: int, epilogue: int) -> bool:
    """Whether ``config`` fits shared memory and compiles without spills (measured by
    ``python -m deco_ops.aot``, triton 3.6): the ACT_GRAD epilogue (z, act'(z) and act(z) beside
    the accumulator) spills 1.6-2 KB on 128-wide tiles, so it takes 64-wide ones."""
    if epilogue == ACT_GRAD and config.kwargs["BLOCK_N"] > 64:
        return False
    return smem_bytes(config, elem_bytes) <= smem_limit


@triton.jit
def _bias_act(acc, off_m, off_n, N, b_ptr, out_desc, pre_desc,
              HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr):
    """Stores ``act(acc + b)`` (and ``acc + b`` when ``STORE_PRE``) at (off_m, off_n)."""
    if HAS_BIAS:
        cols = off_n + tl.arange(0, acc.shape[1])
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        pre_desc.store([off_m, off_n], acc.to(pre_desc.dtype))
    out_desc.store([off_m, off_n], activations.apply(acc, ACTIVATION).to(out_desc.dtype))


@triton.jit
def _act_grad(acc, off_m, off_n, z_desc, out_desc, aux_desc, ACTIVATION: tl.constexpr):
    """Stores ``acc * act'(z)`` and ``act(z)`` at (off_m, off_n)."""
    z = z_desc.load([off_m, off_n]).to(tl.float32)
    out_desc.store([off_m, off_n], (acc * activations.derivative(z, ACTIVATION)).to(out_desc.dtype))
    aux_desc.store([off_m, off_n], activations.apply(z, ACTIVATION).to(aux_desc.dtype))


@triton.jit
def _epilogue(acc, off_m, off_n, N, b_ptr, z_desc, out_desc, aux_desc,
              EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr):
    """The tile's epilogue, BIAS_ACT or ACT_GRAD (constexpr literals: jit code reads no Python globals)."""
    if EPILOGUE == 0:  # BIAS_ACT: aux is the pre-activation
        _bias_act(acc, off_m, off_n, N, b_ptr, out_desc, aux_desc, HAS_BIAS, STORE_PRE, ACTIVATION)
    else:  # ACT_GRAD: aux is act(z)
        _act_grad(acc, off_m, off_n, z_desc, out_desc, aux_desc, ACTIVATION)


def _prune(configs, named_args, **constexprs):
    a = named_args["a_ptr"]
    return [c for c in configs if fits(c, a.element_size(), device_smem_limit(a.device), constexprs["EPILOGUE"])]


# EPILOGUE in the key: the forward and the backward GEMM of a square MLP (4096 -> 4096) share M, N
# and K, and the backward spills 2 KB in the forward's 128x128 tile (``fits``)
@autotuned(cuda_configs(), INTERPRET_CONFIG, key=["M", "N", "K", "EPILOGUE"], buckets=("M",), prune=_prune)
@triton.jit
def tma_gemm_kernel(
    a_ptr, w_ptr, b_ptr, z_ptr, out_ptr, aux_ptr,
    M, N, K, sam, swr, szm,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_FP32: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[sam, 1], block_shape=[BLOCK_M, BLOCK_K])
    if EPILOGUE == 0:  # w (N, K), read as W^T tiles
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[swr, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:  # w (K, N)
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[swr, 1], block_shape=[BLOCK_K, BLOCK_N])
    z_desc = tl.make_tensor_descriptor(z_ptr, shape=[M, N], strides=[szm, 1], block_shape=[BLOCK_M, BLOCK_N])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    aux_desc = tl.make_tensor_descriptor(aux_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])

    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=False, warp_specialize=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            if EPILOGUE == 0:
                w = w_desc.load([off_n, ki * BLOCK_K]).T
            else:
                w = w_desc.load([ki * BLOCK_K, off_n])
            acc = dot(a, w, acc, DOT_FP32, "tf32")
        _epilogue(acc, off_m, off_n, N, b_ptr, z_desc, out_desc, aux_desc, EPILOGUE, HAS_BIAS, STORE_PRE, ACTIVATION)


# Programs of the persistent grid under the interpreter: fewer than the tiles of the tests' shapes,
# so each program walks several tiles as it does on a GPU.
INTERPRET_PROGRAMS = 3


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # Device-side tensor descriptors live in a global scratch buffer Triton asks for at launch,
    # on the current device (the launcher's, under ``on_input_device``).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Installs ``_scratch`` as Triton's allocator unless the caller installed their own."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


def tma_addressable(t: torch.Tensor) -> bool:
    """Whether a tensor of any rank can be read or written through a TMA descriptor: unit stride in
    its last dim, every other stride and the base address 16-byte aligned, and no broadcast dim (a
    stride-0 dim of several elements, e.g. ``y.sum()``'s expanded gradient: a descriptor walks
    real rows; such a tensor takes the pointer-load kernels). Never while ``torch.compile`` traces
    (a FakeTensor has no address, and the graph must not bake in one call's alignment: its guards
    do not check the next call's)."""
    if tracing((t,)):
        return False
    return (t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGN_BYTES == 0
            and all(s * t.element_size() % TMA_ALIGN_BYTES == 0 and (s > 0 or n == 1)
                    for s, n in zip(t.stride()[:-1], t.shape[:-1])))


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a GEMM operand the TMA kernel takes: 2-D, non-empty, fp16/bf16 and
    ``tma_addressable``."""
    return all(
        t.dim() == 2 and t.numel() > 0 and t.dtype in (torch.float16, torch.bfloat16) and tma_addressable(t)
        for t in tensors
    )


def _check(named: dict[str, torch.Tensor]) -> None:
    device = next(iter(named.values())).device
    if device.type == "cuda" and device_arch(device) < 90:
        raise RuntimeError(f"tma_gemm: TMA descriptors and wgmma need an sm_90 (Hopper) or newer GPU, {device} is "
                           f"sm_{device_arch(device)}")
    for name, t in named.items():
        if not tma_compatible(t):
            raise ValueError(
                f"tma_gemm: {name} must be a non-empty 2-D fp16/bf16 tensor with unit column stride and a 16-byte aligned "
                f"base and row stride (TMA descriptors), got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    dtypes = {t.dtype for t in named.values()}
    if len(dtypes) != 1:
        raise TypeError(f"tma_gemm: {', '.join(named)} must share one dtype, got {sorted(map(str, dtypes))}")


@on_input_device
def tma_linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str,
                   store_pre: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(act(x @ w.T + b), x @ w.T + b or None)`` for x (M, K), w (N, K) (nn.Linear's layout),
    b (N,) or None; the pre-activation only when ``store_pre``."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"tma_linear_act: x and w must be 2-D, got {tuple(x.shape)} and {tuple(w.shape)}")
    (M, K), N = x.shape, w.shape[0]
    if w.shape[1] != K or (b is not None and tuple(b.shape) != (N,)):
        raise ValueError(f"tma_linear_act: x {tuple(x.shape)}, w {tuple(w.shape)} and b "
                         f"{None if b is None else tuple(b.shape)} do not make a Linear")
    if b is not None and b.dtype != x.dtype:
        raise TypeError(f"tma_linear_act: b must be {x.dtype}, got {b.dtype}")
    out = x.new_empty((M, N))
    pre = x.new_empty((M, N)) if store_pre else None
    _check({"x": x, "w": w, "out (M, N)": out})
    # the epilogue reads the bias as N consecutive elements: a strided or expanded (stride 0) one is copied
    _launch(x, w, None if b is None else b.contiguous(), None, out, pre, K, BIAS_ACT, activation, store_pre)
    return out, pre


@on_input_device
def tma_gemm_act_grad(dy: torch.Tensor, w2: torch.Tensor, z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy @ w2 * act'(z), act(z))`` for dy (M, K), w2 (K, N) in nn.Linear layout (out=K, in=N),
    z (M, N): ``gemm_act_grad.gemm_act_grad`` through TMA."""
    if dy.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"tma_gemm_act_grad: dy and w2 must be 2-D, got {tuple(dy.shape)} and {tuple(w2.shape)}")
    (M, K), N = dy.shape, w2.shape[1]
    if w2.shape[0] != K or tuple(z.shape) != (M, N):
        raise ValueError(f"tma_gemm_act_grad: dy {tuple(dy.shape)}, w2 {tuple(w2.shape)} and z {tuple(z.shape)} "
                         "do not match (dy (M, K), w2 (K, N), z (M, N))")
    dz, a = z.new_empty((M, N)), z.new_empty((M, N))
    _check({"dy": dy, "w2": w2, "z": z, "dz (M, N)": dz})
    _launch(dy, w2, None, z, dz, a, K, ACT_GRAD, activation, False)
    return dz, a


def _launch(a, w, b, z, out, aux, K, epilogue, activation, store_pre) -> None:
    M, N = out.shape
    programs = INTERPRET_PROGRAMS if INTERPRET else _num_sms(out.device)
    if not INTERPRET:
        ensure_allocator()
    grid = lambda meta: (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)
    tma_gemm_kernel[grid](
        a, w, out if b is None else b, out if z is None else z, out, out if aux is None else aux,
        M, N, K, a.stride(0), w.stride(0), N if z is None else z.stride(0),
        EPILOGUE=epilogue, HAS_BIAS=b is not None, STORE_PRE=store_pre, ACTIVATION=activations.CODES[activation],
        DOT_FP32=dot_dtype_workaround(out.dtype == torch.bfloat16), NUM_SMS=programs,
    )


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K
