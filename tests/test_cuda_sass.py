"""Static evidence from the built pacofr._C (no GPU needed): what its machine code does.

``cuobjdump`` (shipped with triton and with the CUDA toolkit) reads the SASS and the resource
usage of every kernel for sm_80 and sm_90:
* the code-ranking kernels shared by nearest_token and soft_assign run on tensor cores (HMMA,
  fed by ldmatrix and cp.async) for fp16/bf16/tf32/3xTF32, and the exact-fp32 variant on FFMA;
* the sm_90a image holds the Hopper ranking kernel on warpgroup MMAs (HGMMA), and only there: the
  sm_80 / sm_90 images of it are trapping stubs;
* the epilogues read the code terms from shared memory (LDS), not with per-tile global loads;
* no kernel spills or keeps arrays in local memory (no stack, no local bytes);
* the element-wise patch kernels contain no integer-division sequence (FastDivmod and 2-D grids).
"""

from __future__ import annotations

import pytest

from benchmarks.static.cuda_sass import extension_path
from benchmarks.static.toolchain import ToolMissingError, cuobjdump, inspect_binary

ARCHES = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def reports() -> list:
    path = extension_path()
    if path is None:
        pytest.skip("pacofr._C is not built here")
    try:
        cuobjdump()
    except ToolMissingError as err:
        pytest.skip(str(err))
    return inspect_binary(path)


@pytest.fixture(scope="module")
def sass(reports) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, kernel) -> counts of base opcodes (HMMA) and of full ones (I2F.U32.RP)."""
    return {(r.arch, r.name): r.sass.opcodes for r in reports}


@pytest.fixture(scope="module")
def resources(reports) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, kernel) -> REG, STACK, SHARED, LOCAL."""
    return {(r.arch, r.name): {"REG": r.resources.registers, "STACK": r.resources.stack,
                               "SHARED": r.resources.shared_static, "LOCAL": r.resources.local} for r in reports}


def kernels(table: dict, arch: str, fragment: str) -> dict[str, object]:
    found = {name: value for (a, name), value in table.items() if a == arch and fragment in name}
    assert found, f"no kernel matching {fragment!r} for {arch}"
    return found


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("math,mma_per_chunk", [("8Mma16BitILb0", 16), ("8Mma16BitILb1", 16), ("7MmaTf32ILb0", 16),
                                                ("7MmaTf32ILb1", 48)])
def test_ranking_kernels_run_on_tensor_cores(sass, arch: str, math: str, mma_per_chunk: int) -> None:
    found = kernels(sass, arch, f"rank_codes_kernelINS0_{math}")
    assert len(found) == 10, sorted(found)  # KP = 1, 2, 4, 8, 16, each with a resident and a streaming query tile
    for name, ops in found.items():
        assert ops.get("HMMA", 0) >= mma_per_chunk, (name, ops.get("HMMA"))  # one warp tile of one chunk
        assert ops.get("LDSM", 0) > 0 and ops.get("LDGSTS", 0) > 0, name  # ldmatrix from a cp.async ring


@pytest.mark.parametrize("arch", ARCHES)
def test_exact_fp32_ranking_uses_fma_and_no_tensor_core(sass, arch: str) -> None:
    for name, ops in kernels(sass, arch, "rank_codes_kernelINS0_8SimtFp32").items():
        assert ops.get("HMMA", 0) == 0 and ops.get("FFMA", 0) >= 512, name  # 2 m-tiles x 8 n-tiles x 4 x 8 per chunk


@pytest.mark.parametrize("arch", ARCHES)
def test_no_kernel_spills_or_uses_local_memory(resources, arch: str) -> None:
    pacofr_kernels = {name: use for (a, name), use in resources.items() if a == arch and "pacofr" in name}
    assert pacofr_kernels
    bad = {name: use for name, use in pacofr_kernels.items() if use.get("STACK", 0) or use.get("LOCAL", 0)}
    assert not bad, bad


ELEMENT_KERNELS = ("gather_patches_kernel", "gather_patches_backward_kernel", "masked_patch_loss_backward_kernel",
                   "scatter_tokens_kernel", "scatter_tokens_visible_grad_kernel", "scatter_tokens_column_grad_kernel")


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kernel", ELEMENT_KERNELS)
def test_patch_element_kernels_do_no_integer_division(sass, arch: str, kernel: str) -> None:
    """An integer division compiles to a float-reciprocal sequence starting with I2F.*.RP (32-bit
    inline, 64-bit as a called routine); FastDivmod needs only IMAD.HI and shifts."""
    for name, ops in kernels(sass, arch, kernel + "I").items():
        divisions = {op: n for op, n in ops.items() if op.startswith("I2F") and ".RP" in op}
        assert not divisions, (name, divisions)


WGMMA_KERNEL = "rank_codes_wgmma_kernel"


@pytest.fixture(scope="module")
def sm90a(sass) -> dict[str, dict[str, int]]:
    found = {name: ops for (a, name), ops in sass.items() if a == "sm_90a" and WGMMA_KERNEL in name}
    if not found:
        pytest.skip("pacofr._C was built without an sm_90a image (TORCH_CUDA_ARCH_LIST lacks 9.0a)")
    return found


def test_hopper_ranking_kernel_runs_on_warpgroup_mmas(sm90a) -> None:
    assert len(sm90a) == 10, sorted(sm90a)  # fp16 / bf16 x KP = 1, 2, 4, 8, 16
    for name, ops in sm90a.items():
        # one m64n128k16 per 32-byte k-slab: two per 64-byte D chunk, no mma.sync
        shapes = {op for op in ops if op.startswith("HGMMA.")}
        assert ops.get("HGMMA", 0) >= 2 and shapes and all(op.startswith("HGMMA.64x128x16.F32") for op in shapes), name
        assert ops.get("HMMA", 0) == 0 and ops.get("LDGSTS", 0) > 0, name


@pytest.mark.parametrize("arch", ARCHES)
def test_hopper_ranking_kernel_is_a_stub_off_sm90a(sass, arch: str) -> None:
    for name, ops in kernels(sass, arch, WGMMA_KERNEL).items():
        assert ops.get("HGMMA", 0) == 0 and ops.get("BPT", 0) >= 1, name  # the wgmma wrappers compile to traps


@pytest.mark.parametrize("arch", ARCHES)
def test_ranking_epilogue_reads_code_terms_from_shared_memory(sass, arch: str) -> None:
    """The k = 1 bf16 kernel with a resident query tile: its only global loads are cp.async copies (the
    code terms travel with the last D chunk of each tile), no LDG in the score loop's epilogue."""
    for name, ops in kernels(sass, arch, "rank_codes_kernelINS0_8Mma16BitILb1EEELi1ELb1EEE").items():
        assert ops.get("LDGSTS", 0) > 0 and ops.get("LDS", 0) >= 16, (name, ops.get("LDS"))
        # the four rows' squared norms at the store (distances) are the only plain global loads left
        assert ops.get("LDG", 0) <= 4, (name, ops.get("LDG"))
