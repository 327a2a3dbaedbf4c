"""The static GPU-readiness check (benchmarks.static): parsers, rules, and one end-to-end run on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static.policy import SHARED_LIMIT_BYTES, triton_violations
from benchmarks.static.toolchain import FunctionReport, Resources, SassCounts, count_sass, parse_resource_usage, parse_sass
from benchmarks.static.triton_aot import DotOp, Variant, dots_of
from benchmarks.static.workloads import representatives

ROOT = Path(__file__).resolve().parents[1]

RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPf:
  REG:40 STACK:192 SHARED:240 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Function _Z6kernelPf:
  REG:32 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:536 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
Fatbin elf code:
================
arch = sm_90

		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;              /* 0x00000a00ff017624 */
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x00000a00ff017624 */
        /*0020*/              @!P0 STL [R1], R5 ;                                       /* 0x000000000000894d */
        /*0030*/               @P1 LDL R5, [R1] ;                                       /* 0x000000000000894d */
        /*0040*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                /* 0x000fe20000000f00 */
        /*0050*/                   EXIT ;                                               /* 0x000000000000794d */
"""


def test_resource_usage_is_read_per_architecture():
    usage = parse_resource_usage(RES_USAGE)
    assert usage[("sm_80", "_Z6kernelPf")] == Resources(registers=40, stack=192, shared_static=240, local=0)
    assert usage[("sm_90", "_Z6kernelPf")] == Resources(registers=32, stack=0, shared_static=1024, local=0)


def test_sass_counts_tensor_core_and_local_memory_instructions():
    counts = parse_sass(SASS)[("sm_90", "_Z6kernelPf")]
    assert counts.mma == {"HGMMA": 1, "HMMA": 1} and counts.mma_total == 2
    assert counts.local_stores == 1 and counts.local_loads == 1 and counts.instructions == 6
    assert count_sass("        /*0000*/                   FFMA R1, R2, R3, R4 ;").mma_total == 0


def test_dots_of_reads_operand_type_and_precision():
    ttir = """
        %a = tt.dot %x, %y, %z : tensor<128x64xbf16> * tensor<64x64xbf16> -> tensor<128x64xf32> loc(#loc1)
        %b = tt.dot %x, %y, %z : tensor<128x32xf32> * tensor<32x64xf32> -> tensor<128x64xf32> loc(#loc2)
        %c = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<128x32xf32> * tensor<32x64xf32> -> tensor<128x64xf32>
    """
    assert dots_of(ttir) == [DotOp("bf16", "ieee"), DotOp("f32", "ieee"), DotOp("f32", "tf32")]
    assert [d.wants_tensor_cores for d in dots_of(ttir)] == [True, False, True]


def _variant(**report) -> Variant:
    variant = Variant(kernel="k", arch=90, signature={}, constexprs={"BLOCK": 64}, num_warps=4, num_stages=3)
    resources = Resources(registers=report.get("registers", 64), stack=report.get("stack", 0),
                          shared_static=report.get("shared_static", 0), local=0)
    sass = SassCounts(mma=report.get("mma", {}), local_stores=report.get("stores", 0), local_loads=0, instructions=10)
    variant.report = FunctionReport("sm_90", "k", resources, sass)
    variant.dots = report.get("dots", [])
    variant.shared_dynamic = report.get("shared_dynamic", 0)
    return variant


def test_rules():
    assert triton_violations(_variant()) == []
    assert [v.rule for v in triton_violations(_variant(stack=16))] == ["spills"]
    assert [v.rule for v in triton_violations(_variant(stores=3))] == ["spills"]
    assert [v.rule for v in triton_violations(_variant(shared_dynamic=SHARED_LIMIT_BYTES["sm_90"], shared_static=8))] \
        == ["shared-memory"]
    assert [v.rule for v in triton_violations(_variant(dots=[DotOp("bf16", "ieee")]))] == ["tensor-cores"]
    assert triton_violations(_variant(dots=[DotOp("bf16", "ieee")], mma={"HGMMA": 4})) == []
    assert triton_violations(_variant(dots=[DotOp("f32", "ieee")])) == []  # the exact path may use FMAs
    broken = _variant()
    broken.error = "CompilationError: boom"
    assert [v.rule for v in triton_violations(broken)] == ["compile"]


def test_spills_off_the_training_path_are_warnings_only_when_asked():
    from benchmarks.static.policy import triton_checks

    bench, model = _variant(stack=8), _variant(stack=8)
    bench.origins, model.origins = ["nearest_token N=1 K=2 D=3 k=1 l2 fp32 ieee"], ["model demo step"]
    assert [len(x) for x in triton_checks([bench, model])] == [2, 0]
    violations, warnings = triton_checks([bench, model], spills="training")
    assert [v.rule for v in violations] == ["spills"] and len(warnings) == 1
    assert triton_checks([_variant(dots=[DotOp("bf16", "ieee")])], spills="training")[0]  # other rules still fail


def test_representatives_keep_one_shape_per_specialisation():
    geometries = {(50176, 8192, 256), (37632, 16384, 256), (37632, 1024, 64), (50177, 8192, 256), (1, 8192, 256)}
    # 50176 and 37632 rows (both multiples of 16) with 8192 / 16384 codes compile alike: one is kept
    assert representatives(geometries, (0, 1)) == [(1, 8192, 256), (37632, 1024, 64), (37632, 16384, 256),
                                                   (50177, 8192, 256)]


@pytest.mark.slow
def test_tiny_training_step_compiles_clean_for_sm80_and_sm90(tmp_path):
    """The whole pipeline on one preset, in a process without Triton's interpreter (as CI runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.static", "--no-benchmarks", "--presets", "tiny",
                           "--no-cuda", "--check", "--json", str(out), "--markdown", str(tmp_path / "static.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    record = json.loads(out.read_text())
    assert done.returncode == 0, record["violations"] or done.stderr[-3000:]
    kernels = {row["kernel"] for row in record["triton"]}
    # every Triton kernel a PaCo-FR step and its codebook maintenance launch, found by recording the step
    assert {"nearest_token_kernel", "soft_assign_fwd_kernel", "soft_assign_bwd_kernel", "gather_patches_kernel",
            "patch_targets_kernel", "masked_patch_loss_kernel",
            "masked_patch_loss_backward_kernel", "scatter_tokens_kernel", "scatter_tokens_backward_kernel"} <= kernels
    assert {row["arch"] for row in record["triton"]} == {"sm_80", "sm_90"}
    assert all(row["training_path"] for row in record["triton"])


# ------------------------------------------------------------------------------------------
# the cost model (benchmarks.static.sass_flow, cost_model): counts -> bound, on synthetic SASS
# ------------------------------------------------------------------------------------------

def _listing(*instructions: str) -> str:
    """A cuobjdump-style function body: one instruction per 16 bytes from address 0."""
    return "\n".join(f"        /*{16 * n:04x}*/                   {text} ;  /* 0x000fe20000000f00 */"
                     for n, text in enumerate(instructions))


NESTED = _listing(
    "S2R R0, SR_TID.X",                                 # 0x00 once
    "MOV R1, 0x1",                                      # 0x10 once
    "LDG.E R2, desc[UR4][R4.64]",                       # 0x20 tile loop starts: a code-term load
    "LDGSTS.E.BYPASS.LTC128B.128 [R1], desc[UR4][R6.64]",  # 0x30 step loop starts
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT",   # 0x40
    "BAR.SYNC.DEFER_BLOCKING 0x0",                      # 0x50
    "@P0 BRA 0x30",                                     # 0x60 step loop back
    "FSETP.GEU.AND P1, PT, R3, R5, PT",                 # 0x70 epilogue
    "@P1 BRA 0xb0",                                     # 0x80 if: then arm 0x90..0xa0, else arm 0xb0..0xd0
    "FMNMX R3, R3, R5, PT",                             # 0x90
    "BRA 0xe0",                                         # 0xa0
    "FADD R3, R3, R5",                                  # 0xb0
    "FADD R3, R3, R5",                                  # 0xc0
    "FADD R3, R3, R5",                                  # 0xd0
    "@P2 BRA 0x20",                                     # 0xe0 tile loop back
    "STG.E.64 desc[UR4][R8.64], R2",                    # 0xf0 once
    "EXIT",                                             # 0x100 once
)


def test_sass_flow_splits_step_tile_and_once_parts():
    from benchmarks.static.sass_flow import flow_counts

    flow = flow_counts(NESTED)
    assert not flow.flat and flow.has_step_loop
    assert flow.step == {"LDGSTS.E.BYPASS.LTC128B.128": 1, "HGMMA.64x64x16.F32.BF16": 1,
                         "BAR.SYNC.DEFER_BLOCKING": 1, "BRA": 1}
    # the shorter arm (FMNMX + BRA) of the if/else is not counted; the longer (3 FADD) is
    assert flow.tile == {"LDG.E": 1, "FSETP.GEU.AND": 1, "BRA": 2, "FADD": 3}
    assert flow.once == {"S2R": 1, "MOV": 1, "STG.E.64": 1, "EXIT": 1}
    assert sum(flow.per_tile(4).values()) == 4 * 4 + 7
    assert sum(flow.per_cta(3, 4).values()) == 3 * (4 * 4 + 7) + 4


FLAT = _listing(
    "S2R R0, SR_TID.X",                                 # 0x00 once
    "LDSM.16.M88.4 R8, [R2]",                           # 0x10 step loop starts
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",              # 0x20
    "HMMA.16816.F32.BF16 R4, R8, R14, R4",              # 0x30
    "@P0 BRA 0x80",                                     # 0x40 skip the per-tile epilogue
    "LDS R9, [R16+0x2800]",                             # 0x50 epilogue
    "FADD R15, -R96, R9",                               # 0x60
    "FMNMX R3, R3, R15, PT",                            # 0x70
    "BAR.SYNC.DEFER_BLOCKING 0x0",                      # 0x80
    "@P1 BRA 0x10",                                     # 0x90 step loop back
    "EXIT",                                             # 0xa0
)


def test_sass_flow_finds_the_per_tile_epilogue_of_a_flat_step_loop():
    from benchmarks.static.sass_flow import flow_counts

    flow = flow_counts(FLAT)
    assert flow.flat
    assert flow.tile == {"LDS": 1, "FADD": 1, "FMNMX": 1}  # once per tile, not per step
    assert flow.step == {"LDSM.16.M88.4": 1, "HMMA.16816.F32.BF16": 2, "BRA": 2, "BAR.SYNC.DEFER_BLOCKING": 1}
    assert flow.once == {"S2R": 1, "EXIT": 1}


RESIDENT = _listing(
    "S2R R0, SR_TID.X",                                 # 0x00 once
    "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R6.64]",       # 0x10 loop starts: one code tile per iteration
    "WARPGROUP.ARRIVE",                                 # 0x20
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT",   # 0x30
    "LDG.E.64 R2, desc[UR4][R4.64]",                    # 0x40 overlaps the asynchronous MMA
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0",  # 0x50
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",                    # 0x60 the scores are ready
    "FADD R15, -R24, R2",                               # 0x70 epilogue: needs the scores
    "FMNMX R3, R3, R15, PT",                            # 0x80
    "@P1 BRA 0x10",                                     # 0x90 loop back
    "EXIT",                                             # 0xa0
)


def test_sass_flow_takes_the_code_after_the_mma_wait_as_the_epilogue_of_a_resident_loop():
    """No conditional block in the flat loop: the tile's epilogue is what follows the last MMA's wait (it
    cannot overlap this CTA's MMAs), the rest of the loop is the step."""
    from benchmarks.static.sass_flow import flow_counts

    flow = flow_counts(RESIDENT)
    assert flow.flat
    assert flow.tile == {"FADD": 1, "FMNMX": 1, "BRA": 1}
    assert flow.step == {"LDGSTS.E.BYPASS.128": 1, "WARPGROUP.ARRIVE": 1, "HGMMA.64x64x16.F32.BF16": 2,
                         "LDG.E.64": 1, "WARPGROUP.DEPBAR.LE": 1}


def test_moving_loads_count_every_load_inside_a_loop_and_no_pipeline_prologue():
    """Nested loops: the cp.async before the step loop (inside the tile loop) is the pipeline's prologue, it
    stands in for the step loads the last iterations predicate off, so it is not added. Flat loop: its tile
    part lies inside the loop, so a cp.async there is a load of every tile."""
    from benchmarks.static.cost_budget import Geometry, moving_loads
    from benchmarks.static.sass_flow import flow_counts

    geometry = Geometry(ctas=1, tiles_per_cta=3, steps_per_tile=4, warps=8, registers=128, shared_bytes=0)
    prologue = _listing("S2R R0, SR_TID.X", "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R6.64]",  # tile loop, prologue
                        "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R6.64]",                    # step loop
                        "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT", "@P0 BRA 0x20",
                        "LDG.E R2, desc[UR4][R4.64]", "@P1 BRA 0x10", "EXIT")
    assert moving_loads(flow_counts(prologue), geometry) == {"LDGSTS.E.BYPASS.128": 3 * 4, "LDG.E": 3}
    flat = _listing("S2R R0, SR_TID.X", "WARPGROUP.ARRIVE",
                    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
                    "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R6.64]", "@P1 BRA 0x10", "EXIT")
    resident = Geometry(ctas=1, tiles_per_cta=3, steps_per_tile=1, warps=8, registers=128, shared_bytes=0)
    assert moving_loads(flow_counts(flat), resident) == {"LDGSTS.E.BYPASS.128": 3}


def test_cost_model_shapes_and_widths():
    from benchmarks.static.cost_model import load_bytes_per_lane, mma_flops

    assert mma_flops("HMMA.16816.F32.BF16") == (2 * 16 * 8 * 16, False)
    assert mma_flops("HMMA.1688.F32.TF32") == (2 * 16 * 8 * 8, False)
    assert mma_flops("HGMMA.64x128x16.F32.BF16") == (2 * 64 * 128 * 16, True)
    with pytest.raises(ValueError):
        mma_flops("FFMA")
    assert [load_bytes_per_lane(op) for op in ("LDGSTS.E.BYPASS.LTC128B.128", "LDG.E.64", "LDG.E.U16", "LDG.E")] \
        == [16, 8, 2, 4]


def _machine(**changes):
    from dataclasses import replace

    from benchmarks.static.cost_model import H100, Constant

    unit = dict(sms=Constant(2, 2, 2, "test"), dense_tflops=Constant(1, 1, 1, "test"),
                mma_sync_fraction=Constant(0.5, 0.5, 0.5, "test"), hbm_tbps=Constant(1, 1, 1, "test"),
                l2_tbps=Constant(2, 2, 2, "test"), clock_ghz=Constant(1, 1, 1, "test"),
                schedulers=Constant(4, 4, 4, "test"))
    return replace(H100, **{**unit, **changes})


def test_cost_model_bounds_from_counts():
    """Every bound by hand: 2 SMs at 1 TFLOP/s (0.5e12 per SM), 1 GHz, 4 schedulers, L2 2 TB/s, HBM 1 TB/s."""
    from collections import Counter

    from benchmarks.static.cost_model import Launch, Workload, budget

    opcodes = Counter({"HGMMA.64x64x16.F32.BF16": 1000, "LDGSTS.E.BYPASS.LTC128B.128": 100, "FADD": 2900})
    launch = Launch(ctas=5, warps=8, registers=128, shared_bytes=100 * 1024, opcodes=opcodes,
                    loads=Counter({"LDGSTS.E.BYPASS.LTC128B.128": 100}), epilogue=Counter({"FADD": 400}))
    work = Workload(flops=1e9, hbm_bytes=2e6)
    result = budget(launch, work, _machine())
    busiest = 3  # ceil(5 CTAs / 2 SMs)
    flops_per_cta = 1000 * (2 * 64 * 64 * 16) * 2  # per-warp count x 2 warpgroups
    assert result.ctas_per_sm == 2  # shared memory: 233472 // (102400 + 1024)
    assert result.tensor_us[0] == pytest.approx(busiest * flops_per_cta / 0.5e12 * 1e6)
    assert result.exposed_epilogue_us[0] == 0.0  # two CTAs per SM overlap one's epilogue with the other's MMAs
    assert result.issue_us[0] == pytest.approx(busiest * 4000 * 8 / 4 / 1e3)  # slots per scheduler / 1 GHz
    assert result.l2_us[0] == pytest.approx(5 * 100 * 16 * 32 * 8 / 2e12 * 1e6)
    assert result.hbm_us[0] == pytest.approx(2.0)
    assert result.floor_us == pytest.approx(1e3)  # 1e9 FLOP at 1 TFLOP/s
    assert result.dominant == "tensor" and result.estimate_us == pytest.approx(result.tensor_us[0])

    # one CTA per SM (registers: 255 x 8 warps leave no room for a second) and mma.sync at half the rate:
    # the epilogue's issue time adds to the tensor time
    sync = Launch(ctas=2, warps=8, registers=255, shared_bytes=1024, opcodes=Counter({"HMMA.16816.F32.BF16": 4096}),
                  loads=Counter(), epilogue=Counter({"FADD": 1000}))
    result = budget(sync, Workload(flops=0.0, hbm_bytes=0.0), _machine())
    assert result.ctas_per_sm == 1
    assert result.tensor_us[0] == pytest.approx(4096 * 4096 * 8 / (0.5e12 * 0.5) * 1e6)
    assert result.exposed_epilogue_us[0] == pytest.approx(1000 * 8 / 4 / 1e3)
    assert result.bounds()["tensor"] == pytest.approx(result.tensor_us[0] + result.exposed_epilogue_us[0])


def test_cost_model_estimate_range_follows_the_constants():
    from collections import Counter

    from benchmarks.static.cost_model import Constant, Launch, Workload, budget

    launch = Launch(ctas=2, warps=4, registers=32, shared_bytes=0, opcodes=Counter({"FADD": 1000}),
                    loads=Counter())
    result = budget(launch, Workload(0.0, 0.0), _machine(clock_ghz=Constant(1.0, 0.5, 2.0, "test")))
    assert result.dominant == "issue"
    assert result.estimate_range_us == pytest.approx((1000 * 4 / 4 / 2e3, 1000 * 4 / 4 / 0.5e3))


def test_ranking_tile_constants_evaluate_the_header(tmp_path):
    from benchmarks.static.cost_budget import ranking_tile_constants

    header = tmp_path / "tiles.h"
    header.write_text("constexpr int kA = 4;\nconstexpr int kB = 2 * kA + 1;  // note\nconstexpr int kC = (kB - 1) / 4;\n")
    assert ranking_tile_constants(header) == {"kA": 4, "kB": 9, "kC": 2}
    tiles = ranking_tile_constants()
    assert tiles["kThreads"] == 32 * tiles["kWarpsM"] * tiles["kWarpsN"]  # the real header parses
