"""``deco_ops.aot``'s reading of a compiled kernel: TMA copies and warp specialisation, from SASS
(cuobjdump) and PTX lines as Triton's sm_90 compiles print them, and the problems they raise when
a kernel written for them compiles without them. No compiling here (tests/test_aot.py compiles)."""

from types import SimpleNamespace

import pytest
import triton

from deco_ops import aot

# Lines from `python -m deco_ops.aot --kernels tma_gemm` (triton 3.9, sm_90) and from pool_gemm's
# cp.async pipeline, which is not TMA.
TMA_SASS = """
        /*0a50*/                   UTMALDG.2D [UR20], [UR6] ;
        /*0c80*/                   SYNCS.ARRIVE.TRANS64 RZ, [UR19+0x24100], R3 ;
        /*1f30*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*2400*/                   UTMASTG.2D [UR24], [UR6] ;
"""
WS_SASS = """
        /*0090*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;
        /*0b10*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;
"""
BULK_SASS = "        /*0400*/                   UBLKCP.S.G [UR8], [UR4], UR10 ;\n"
PLAIN_SASS = """
        /*0300*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR6][R4.64] ;
        /*0310*/                   LDGDEPBAR ;
        /*0400*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0500*/                   STG.E.128 desc[UR6][R8.64], R12 ;
        /*0600*/                   MOV R1, c[0x0][0x28] ;
"""
TMA_PTX = ("\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3, %r4}], [%r5];\n"
           "\tcp.async.bulk.commit_group ;\n")
WS_PTX = ("\tsetmaxnreg.dec.sync.aligned.u32 \t40;\n\tsetmaxnreg.inc.sync.aligned.u32 \t232;\n"
          "\tsetmaxnreg.inc.sync.aligned.u32 \t232;\n\tsetmaxnreg.dec.sync.aligned.u32 \t120;\n")
PLAIN_PTX = ("\tcp.async.cg.shared.global [%r1], [%rd1], 16;\n\tcp.async.commit_group;\n"
             "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n")


@pytest.mark.parametrize("sass,ptx,expected", [
    (TMA_SASS, "", True), (BULK_SASS, "", True), ("", TMA_PTX, True),
    (PLAIN_SASS, PLAIN_PTX, False), (WS_SASS, WS_PTX, False),
])
def test_tma_is_read_from_sass_or_ptx(sass, ptx, expected):
    assert aot.uses_tma(sass, ptx) is expected


@pytest.mark.parametrize("sass,ptx,expected", [
    (WS_SASS, "", True), ("", WS_PTX, True), (TMA_SASS, TMA_PTX, False), (PLAIN_SASS, PLAIN_PTX, False),
])
def test_warp_specialisation_is_read_from_sass_or_ptx(sass, ptx, expected):
    assert aot.warp_specialized(sass, ptx) is expected


def test_warpgroup_registers_are_the_distinct_setmaxnreg_counts():
    assert aot.warpgroup_registers(WS_PTX) == [40, 120, 232]
    assert aot.warpgroup_registers(PLAIN_PTX) == []


def _row(**features):
    row = dict(kernel="tma_gemm", variant="bf16 bias_act gelu", config="M128 N128 K64 G8 w4 s4", arch=90, target="sm_90",
               registers=168, spill_stores=0, spill_loads=0, local_bytes=0, shared_bytes=149096, hgmma=True,
               expect_hgmma=True, tma=True, warp_specialized=True, expect_tma=True, expect_warp_specialized=True, error="")
    row.update(features)
    return row


def test_a_hopper_kernel_without_tma_or_warp_specialisation_is_a_problem():
    assert aot._problems(_row()) == []
    assert aot._problems(_row(tma=False)) == ["no TMA"]
    assert aot._problems(_row(warp_specialized=False)) == ["not warp-specialised"]
    # kernels not written for them (every other kernel) are fine without either
    assert aot._problems(_row(tma=False, warp_specialized=False, expect_tma=False, expect_warp_specialized=False)) == []


def test_the_tables_show_the_columns():
    rows = [_row(warpgroup_registers=[40, 232], mma="HGMMA.64x128x16", compile_s=3.0, problems=[])]
    assert "| HGMMA.64x128x16 | yes | yes | yes (40/232) | 3.0 | ok |" in aot.markdown(rows)
    assert "| 168 | 0/0 | 149096 | yes | yes | yes (40/232) | ok |" in aot.summary({"rows": rows})
    no_ws = [_row(tma=False, warp_specialized=False, expect_tma=False, expect_warp_specialized=False, problems=[])]
    assert "| yes | - | - | ok |" in aot.summary({"rows": no_ws})
    some = rows + [_row(variant="bf16 bias_act silu", tma=False, warpgroup_registers=[40, 232])]
    assert "| yes | some | yes (40/232) | no TMA |" in aot.summary({"rows": some})


def test_missing_hgmma_any_spill_and_smem_past_the_limit_are_problems():
    """A wgmma-eligible kernel without HGMMA, spill stores or loads alone, local memory, and shared
    memory past the opt-in limit (the limit itself fits) are problems; wgmma is expected from tiles
    of 64 rows on warpgroups, and TMA is read from a load, a store or a bulk reduction alone."""
    assert aot._problems(_row(hgmma=False)) == ["no HGMMA"]
    assert aot._problems(_row(hgmma=False, expect_hgmma=False)) == []
    for spill in ({"spill_stores": 8}, {"spill_loads": 8}, {"local_bytes": 16}):
        assert aot._problems(_row(**spill)) == ["spills"], spill
    limit = aot.SMEM_LIMIT[90]
    assert aot._problems(_row(shared_bytes=limit)) == []
    assert aot._problems(_row(shared_bytes=limit + 1)) == [f"smem > {limit}"]
    tile = lambda m, n, w: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 32}, num_warps=w, num_stages=3)  # noqa: E731
    assert aot.wgmma_eligible(tile(64, 64, 4)) and aot.wgmma_eligible(tile(128, 64, 8))
    assert not aot.wgmma_eligible(tile(32, 64, 4)) and not aot.wgmma_eligible(tile(64, 64, 2))
    assert not aot.wgmma_eligible(tile(128, 32, 4))  # every side counts, BLOCK_N too
    assert aot.uses_tma("        /*0a50*/                   UTMALDG.2D [UR20], [UR6] ;\n")
    assert aot.uses_tma("", "\tcp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%rd1, {%r1, %r2}], [%r3];\n")


def test_the_summary_shows_each_config_s_largest_spill_and_shared_memory():
    """A config's summary row names its worst variant (most registers) but reports the largest
    spill and shared memory of any variant: a spill in a variant with fewer registers still shows."""
    rows = [_row(registers=200, shared_bytes=100000, problems=[]),
            _row(variant="bf16 bias_act silu", registers=160, spill_stores=24, spill_loads=16, shared_bytes=149096)]
    assert "| 2 | bias_act gelu | 200 | 24/16 | 149096 | yes | yes | yes | spills |" in aot.summary({"rows": rows})


def test_a_config_s_row_shows_a_variant_s_compile_error_and_the_totals_count_shared_memory():
    """A config whose variants partly failed to compile says so beside the others' worst; the totals
    line counts the compiles over the shared memory limit."""
    rows = [_row(problems=[]), _row(variant="bf16 bias_act silu", error="CompilationError: out of resources", problems=["compile error"]),
            _row(config="M64 N128 K64 G8 w4 s4", shared_bytes=aot.SMEM_LIMIT[90] + 1)]
    table = aot.summary({"rows": rows})
    assert "| 2 | bias_act gelu | 168 | 0/0 | 149096 | yes | yes | yes | compile error |" in table
    assert "sm_90 bf16: 3 compiles, 2 with problems (1 errors, 0 spill, 1 smem over limit)" in table


def test_arguments_are_specialised_as_the_jit_specialises_them():
    """Pointers 16-byte aligned; an int of 1 a constant and a multiple of 16 divisible, except where
    the kernel says ``do_not_specialize``; ints past int32 as i64; bools as i1; floats as the
    launcher passes them (``float_type``); config values as constexprs."""
    names = [("p", False), ("one", False), ("big", False), ("last", False), ("flag", False), ("scale", False), ("keep", True),
             ("steps", True), ("BLOCK", False)]
    fn = SimpleNamespace(__name__="k", params=[SimpleNamespace(name=n, is_constexpr=n == "BLOCK", do_not_specialize=d)
                                               for n, d in names])
    args = {"p": "*bf16", "one": 1, "big": 2**31, "last": 2**31 - 16, "flag": True, "scale": 0.5, "keep": 1, "steps": 32}
    signature, constexprs, attrs = aot.specialize(fn, args, triton.Config({"BLOCK": 64}), float_type="fp64")
    assert signature == {"p": "*bf16", "one": "constexpr", "big": "i64", "last": "i32", "flag": "i1", "scale": "fp64",
                         "keep": "i32", "steps": "i32", "BLOCK": "constexpr"}
    assert constexprs == {"one": 1, "BLOCK": 64}
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]], (3,): [["tt.divisibility", 16]]}


def test_hopper_only_kernels_are_compiled_for_sm90_only_and_fp32_expects_no_hgmma():
    """The TMA GEMM (descriptors, wgmma) is not compiled for sm_80, where it never launches; fp32
    variants (FMA or tf32 dots) are not expected to use HGMMA, 16-bit ones are."""
    import importlib

    jobs, skipped = aot._jobs(["tma_gemm"], ["bf16"], [90, 80])
    assert jobs and {arch for *_, arch in jobs} == {90} and any(s.endswith("sm_80: pruned by the autotuner (does not fit)")
                                                              for s in skipped)
    entry = aot._entry("gemm_act_grad")
    variants = entry.variants(importlib.import_module(entry.module), ["fp32", "bf16"])
    assert {(v.label.split(" ")[0], v.hgmma) for v in variants} == {("fp32/ieee", False), ("fp32/tf32", False), ("bf16", True)}
