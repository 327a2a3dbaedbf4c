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
