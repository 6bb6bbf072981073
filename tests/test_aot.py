"""``python -m deco_ops.aot``: every kernel compiles for sm_90 and sm_80 without spills or shared
memory over the limit, and the fp16/bf16 GEMMs use Hopper's wgmma (HGMMA) on sm_90. No GPU needed
(triton.compile + cuobjdump).

The default test compiles the pooling projector's kernels (pooling and un-pooling, dense and
packed; the three GEMMs; the activation backward: every config that can launch, every
representative variant) in bf16 for both targets (the full run adds fp16 and fp32); the TMA GEMM
and attention forward have a one-compile test each, and every merge and attention kernel one
bf16 compile of its heaviest tile. The fp32 cross-attention kernels (exact and tf32 dots, sm_90)
have their own test; every merge and attention config in every dtype is a slow test (``--runslow``). The full check is
``python -m deco_ops.aot``. The tool runs from this process's environment,
which has TRITON_INTERPRET=1 under the test suite: it must re-run itself with compiled Triton.
"""

import json
import os
import subprocess
import sys

import pytest

KERNELS = "pool_gemm,gemm_act_grad,gemm_unpool_act_grad,activation_backward,pool_packed,unpool_packed,pool_tokens,unpool_tokens"
GEMMS = ("pool_gemm", "gemm_act_grad", "gemm_unpool_act_grad")
ATTENTION = ("cross_attention_fwd,cross_attention_combine,"
             "cross_attention_bwd_single_pass,cross_attention_bwd_dkdv,cross_attention_bwd_dq,cross_attention_weights,"
             "cross_attention_row_sums")


def _run(tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "deco_ops.aot", *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    # bf16 only in CI (fp16 compiles to the same registers, docs/aot.md), and on sm_80 the GELU
    # epilogues only (every activation compiles to within 2 registers of it there; 1.5 min less on 2
    # cores): the full run, `python -m deco_ops.aot`, compiles every dtype and activation
    hopper = _run(tmp_path_factory, "--kernels", KERNELS, "--dtypes", "bf16", "--targets", "90")
    ampere = _run(tmp_path_factory, "--kernels", KERNELS, "--dtypes", "bf16", "--targets", "80", "--activations", "gelu")
    procs = [proc for proc, _ in (hopper, ampere)]
    if hopper[1] is None or ampere[1] is None:
        return procs, None
    return procs, {"rows": hopper[1]["rows"] + ampere[1]["rows"]}


def _check_rows(rows):
    for r in rows:
        assert not r["error"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert not r["problems"], r


def test_aot_succeeds(aot_run):
    procs, data = aot_run
    for proc in procs:
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert data is not None and data["rows"]


def test_aot_compiles_only_the_activations_asked_for(aot_run):
    _, data = aot_run
    from deco_ops.projector import ACTIVATIONS

    acts = {target: {a for r in data["rows"] if r["target"] == target and r["kernel"] == "gemm_act_grad"
                     for a in ACTIVATIONS if a in r["variant"].split(" ")} for target in ("sm_90", "sm_80")}
    assert acts == {"sm_90": set(ACTIVATIONS), "sm_80": {"gelu"}}, acts


def test_aot_rows_cover_every_kernel_target_and_dtype_without_spills(aot_run):
    _, data = aot_run
    rows = data["rows"]
    assert {r["target"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["kernel"] for r in rows} == set(KERNELS.split(","))
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, "bf16") for k in KERNELS.split(",")}
    _check_rows(rows)


def test_aot_covers_packed_pool_gemm(aot_run):
    _, data = aot_run
    labels = {r["variant"] for r in data["rows"] if r["kernel"] == "pool_gemm"}
    assert any("packed average" in v for v in labels) and any("packed bilinear" in v for v in labels), labels


def test_aot_gemms_use_hgmma_on_sm90(aot_run):
    _, data = aot_run
    gemm = [r for r in data["rows"] if r["kernel"] in GEMMS and r["target"] == "sm_90"]
    assert {r["kernel"] for r in gemm} == set(GEMMS)
    for r in gemm:  # 64-row tiles with a multiple of 4 warps are wgmma-eligible and must use it
        if r["expect_hgmma"]:
            assert r["hgmma"], f"no HGMMA in sm_90 SASS of {r['kernel']} {r['variant']} {r['config']}"
    # The ragged (packed) pool_gemm path only compiles spill-free with 32-row tiles: mma.sync, no wgmma.
    variants = {(r["kernel"], r["variant"]) for r in gemm if "packed" not in r["variant"]}
    with_hgmma = {(r["kernel"], r["variant"]) for r in gemm if r["hgmma"] and "packed" not in r["variant"]}
    assert variants == with_hgmma, f"variants with no tensor-core (HGMMA) config on sm_90: {variants - with_hgmma}"


def test_aot_attention_fp32_sm90(tmp_path_factory):
    """fp32 attention, exact (FMA) and tf32 dots: the dK/dV kernel's keys-major tiles (also with the
    one-kernel schedule's atomic dQ) and the small fp32 tiles of every other attention kernel compile
    without spills at head dims 64 and 128."""
    kernels = ("cross_attention_fwd,cross_attention_bwd_single_pass,cross_attention_bwd_dkdv,cross_attention_bwd_dq,"
               "cross_attention_bwd_one_kernel,cross_attention_weights")  # the row sums' fp32 pass: slow tests (~40 s)
    proc, data = _run(tmp_path_factory, "--kernels", kernels, "--dtypes", "fp32", "--targets", "90")
    print(proc.stdout)
    assert data is not None, proc.stderr[-4000:]
    rows = data["rows"]
    assert {r["kernel"] for r in rows} == set(kernels.split(","))
    assert {r["variant"].split(" ")[0] for r in rows} == {"fp32/ieee", "fp32/tf32"}
    assert {r["variant"].split(" ")[1] for r in rows} == {"D64", "D128"}
    _check_rows(rows)
    assert proc.returncode == 0, proc.stdout[-4000:]


@pytest.mark.slow
def test_aot_attention_every_dtype_and_target(tmp_path_factory):
    proc, data = _run(tmp_path_factory, "--kernels", ATTENTION)
    print(proc.stdout)
    assert data is not None, proc.stderr[-4000:]
    rows = data["rows"]
    skipped = [s for s in data["skipped"] if "does not exist" in s or "has no" in s]
    assert not skipped, skipped
    assert {r["kernel"] for r in rows} == set(ATTENTION.split(","))
    _check_rows(rows)
    assert proc.returncode == 0, proc.stdout[-4000:]


MERGE = "merge_gemm,merge_norm_stats,merge_norm_backward"


@pytest.mark.slow
def test_aot_merge_kernels_sm90(tmp_path_factory):
    """The patch-merge kernels (issue 13) in every dtype for sm_90: no spills, wgmma in the 16-bit
    and tf32 GEMMs (90 compiles, ~9 min on 2 CPU cores, hence --runslow)."""
    proc, data = _run(tmp_path_factory, "--kernels", MERGE, "--targets", "90")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = data["rows"]
    _check_rows(rows)
    assert {r["kernel"] for r in rows} == set(MERGE.split(","))
    gemm = [r for r in rows if r["kernel"] == "merge_gemm" and r["expect_hgmma"]]
    assert gemm and all(r["hgmma"] for r in gemm)


def _compiled_env() -> dict[str, str]:
    """This environment without the interpreter switches, as the tool's own re-run uses."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DECO_OPS_BACKEND")}


def _check_hopper_rows(rows):
    _check_rows(rows)
    for r in rows:
        assert r["hgmma"] and r["tma"] and r["warp_specialized"], r
        # a producer warpgroup gives registers to the consumers
        assert len(r["warpgroup_registers"]) >= 2 and r["warpgroup_registers"][0] < r["registers"], r


# Kernels known to take float arguments, and how many: the test finds every such registry entry itself
FLOAT_ARGS = {"cross_attention_fwd": 2, "cross_attention_weights": 2, "cross_attention_row_sums": 2,
              "cross_attention_bwd_single_pass": 3, "cross_attention_bwd_dkdv": 3, "cross_attention_bwd_dq": 3,
              "cross_attention_tma": 1, "merge_norm_stats": 1}


def test_float_arguments_typed_fp64_stay_out_of_the_arithmetic():
    """Inductor launches our kernels (``wrap_triton``) with Python floats typed fp64, where Triton's
    JIT passes fp32 (seen on the H200, torch 2.11): the forward then failed to compile (an fp64 scale
    promoted the loop-carried fp32 statistics) and the backward ran ~600 fp64 instructions. Every
    registry kernel with a float argument, its first sm_90 variant compiled so: it compiles, and fp64
    appears only where the arguments are read and converted (at most 2 PTX instructions each)."""
    code = (
        "import importlib, json, re, triton; from deco_ops import aot\n"
        "from triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
        "for entry in aot.REGISTRY:\n"
        "    module = importlib.import_module(entry.module)\n"
        "    variants = entry.variants(module, ['bf16'])\n"
        "    if not variants:\n"
        "        continue\n"
        "    config = entry.configs(module)[0]; variant = variants[0]\n"
        "    fn = aot._raw_jit_function(getattr(module, entry.attr))\n"
        "    sig, consts, attrs = aot.specialize(fn, variant.args, config, float_type='fp64')\n"
        "    floats = sum(t == 'fp64' for t in sig.values())\n"
        "    if not floats:\n"
        "        continue\n"
        "    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=GPUTarget('cuda', 90, 32),\n"
        "                       options={'num_warps': config.num_warps, 'num_stages': config.num_stages})\n"
        "    print(json.dumps([entry.name, floats, len(re.findall(r'\\.f64\\b', k.asm['ptx']))]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_compiled_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    found = {name: floats for name, floats, _ in rows}
    assert FLOAT_ARGS.items() <= found.items(), found
    for name, floats, f64 in rows:
        assert f64 <= 2 * floats, f"{name}: {f64} fp64 PTX instructions for {floats} float arguments"


def _compile_each(picks, tmp_path) -> list[dict]:
    """Compile each (kernel, config label, variant label) in bf16 for sm_90, two at a time, in a
    process with compiled Triton (Triton's caches under tmp_path); the rows in the order given."""
    code = ("import json, sys, multiprocessing as mp; from concurrent.futures import ProcessPoolExecutor; "
            "from deco_ops import aot; picks = json.loads(sys.argv[1]); "
            "pool = ProcessPoolExecutor(2, mp_context=mp.get_context('spawn')); "
            "print(json.dumps(list(pool.map(aot.compile_labelled, *zip(*picks), *([p] * len(picks) for p in (['bf16'], 90))))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(picks)], env={**_compiled_env(), "DECO_OPS_AOT_CACHE": str(tmp_path)},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_aot_tma_gemm_one_compile_sm90(tmp_path):
    """One compile of the persistent TMA GEMM (bf16, bias + GELU, its first config) for sm_90 (~15 s):
    TMA copies, producer/consumer warpgroups and HGMMA in the SASS, no spills. Triton's warp
    specialisation is silently off when its conditions are unmet; this is where that shows."""
    _check_hopper_rows(_compile_each([("tma_gemm", "M128 N128 K64 G8 w4 s4", "bf16 bias_act gelu")], tmp_path))


@pytest.mark.slow
def test_aot_tma_gemm_every_config_sm90(tmp_path_factory):
    """Every tma_gemm config, epilogue and activation in fp16/bf16 for sm_90 (~32 compiles); sm_80
    is pruned (TMA and wgmma are Hopper's)."""
    proc, data = _run(tmp_path_factory, "--kernels", "tma_gemm", "--targets", "90,80", "--dtypes", "fp16,bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = data["rows"]
    assert {r["target"] for r in rows} == {"sm_90"}
    assert {r["variant"].split(" ")[1] for r in rows} == {"bias_act", "act_grad"}
    _check_hopper_rows(rows)


def test_aot_attention_tma_warp_specialised_sm90(tmp_path):
    """One compile of the TMA attention forward (bf16, sm_90, ~15 s): the Qwen-VL resampler's
    128 x 128 tile shows TMA, producer/consumer warpgroups and HGMMA, no spills. Triton 3.6 drops
    the warp specialisation of this loop silently when its conditions are unmet (docs/aot.md)."""
    _check_hopper_rows(_compile_each([("cross_attention_tma", "N128 w4 s2", "bf16 qwenvl D128 heads1")], tmp_path))


# The kernels no other default test compiles in 16 bits, each at its most register-hungry bf16
# config and variant on sm_90 (from a full `--kernels ... --dtypes bf16 --targets 90` run, 125
# compiles, 2026-12-06): the interpreter upcasts what a real compile refuses (a 16-bit loop-carried
# sum), and these are the tiles closest to spilling (238-255 registers for the dots' kernels).
HEAVIEST_BF16 = (
    ("merge_gemm", "M64 N128 K64 G8 w4 s4", "bf16 gelu qwen2vl"),
    ("merge_norm_stats", "R16 C128 w4 s3", "bf16 internvl packed"),
    ("merge_norm_backward", "R16 C128 w4 s3", "bf16 qwen2vl fp32-norm"),
    ("cross_attention_fwd", "M64 N128 w4 s3", "bf16 D128"),
    ("cross_attention_combine", "M64 w8 s3", "bf16 D128"),
    ("cross_attention_bwd_single_pass", "N32 w8 s2", "bf16 D64 M64 drop+lens+bias"),
    ("cross_attention_bwd_dkdv", "M32 N64 w4 s2", "bf16 D128 DELTA_FROM_O"),
    ("cross_attention_bwd_dq", "M64 N128 w8 s2", "bf16 D128"),
    ("cross_attention_bwd_one_kernel", "M16 N64 w8 s2", "bf16 D128 drop+lens+bias"),
    ("cross_attention_weights", "M32 N128 w8 s2", "bf16 D128 drop+lens+bias"),
    ("cross_attention_row_sums", "M32 N128 w8 s2", "bf16 D64 drop+lens+bias"),
)


def test_aot_every_other_kernel_once_in_bf16_sm90(tmp_path):
    """One bf16 compile of each merge kernel and each attention kernel for sm_90 (~1 min): no
    spills, HGMMA where the tile is wgmma-eligible. The full sets are the slow tests above and below."""
    rows = _compile_each(HEAVIEST_BF16, tmp_path)
    assert [(r["kernel"], r["config"], r["variant"]) for r in rows] == list(HEAVIEST_BF16)
    _check_rows(rows)
    assert all(r["hgmma"] for r in rows if r["expect_hgmma"])
    assert {r["kernel"] for r in rows if r["hgmma"]} >= {"merge_gemm", "cross_attention_fwd", "cross_attention_bwd_dq"}


@pytest.mark.slow
def test_aot_attention_tma_every_config_sm90(tmp_path_factory):
    """Every admitted config and variant of the TMA attention forward in fp16/bf16 (~36 compiles): TMA
    everywhere, warp specialisation on the 128 x 128 tile of dense keys only (BLIP-2's two heads per program run
    batched mma.sync dots), no spills; sm_80 is pruned."""
    proc, data = _run(tmp_path_factory, "--kernels", "cross_attention_tma", "--targets", "90,80", "--dtypes", "fp16,bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = data["rows"]
    assert {r["target"] for r in rows} == {"sm_90"}
    _check_rows(rows)
    ws = [r for r in rows if "qwenvl" in r["variant"] and "lens" not in r["variant"]]  # ragged keys: never (tile)
    assert all(r["tma"] for r in rows) and all(r["warp_specialized"] == (r in ws) for r in rows)
    _check_hopper_rows(ws)

