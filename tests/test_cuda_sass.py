"""Static evidence from the built pacofr._C (no GPU needed): what its machine code does.

``cuobjdump`` (shipped with triton and with the CUDA toolkit) reads the SASS and the resource
usage of every kernel for sm_80 and sm_90:
* the code-ranking kernels shared by nearest_token and soft_assign run on tensor cores (HMMA,
  fed by ldmatrix and cp.async) for fp16/bf16/tf32/3xTF32, and the exact-fp32 variant on FFMA;
* no kernel spills or keeps arrays in local memory (no stack, no local bytes);
* the element-wise patch kernels contain no integer-division sequence (FastDivmod and 2-D grids).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from pacofr import _extension

ARCHES = ("sm_80", "sm_90")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        triton = None
    candidates = [Path("/usr/local/cuda/bin/cuobjdump"), *Path("/usr/local").glob("cuda-*/bin/cuobjdump")]
    if triton is not None:
        candidates.insert(0, Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(p) for p in candidates if p.exists()), None)


@pytest.fixture(scope="module")
def extension_file() -> str:
    mod = _extension.module()
    if mod is None:
        pytest.skip("pacofr._C is not built here")
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel) to read pacofr._C")
    return mod.__file__


@pytest.fixture(scope="module")
def sass(extension_file: str) -> dict[tuple[str, str], Counter]:
    """(arch, kernel) -> counts of base opcodes (HMMA) and of full ones (I2F.U32.RP)."""
    text = subprocess.run([_cuobjdump(), "--dump-sass", extension_file], capture_output=True, text=True,
                          check=True, timeout=600).stdout
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    arch = name = None
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif "Function :" in line:
            name = line.split("Function :")[1].strip()
        elif name is not None and (match := re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)",
                                                      line)):
            opcode = match.group(1)
            counts[(arch, name)][opcode.split(".")[0]] += 1
            if "." in opcode:
                counts[(arch, name)][opcode] += 1
    return counts


@pytest.fixture(scope="module")
def resources(extension_file: str) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, kernel) -> REG, STACK, SHARED, LOCAL."""
    text = subprocess.run([_cuobjdump(), "-res-usage", extension_file], capture_output=True, text=True,
                          check=True, timeout=600).stdout
    usage: dict[tuple[str, str], dict[str, int]] = {}
    arch = name = None
    for line in text.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif line.strip().startswith("Function "):
            name = line.strip()[len("Function "):].rstrip(":")
        elif name is not None and "REG:" in line:
            usage[(arch, name)] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
    return usage


def kernels(table: dict, arch: str, fragment: str) -> dict[str, object]:
    found = {name: value for (a, name), value in table.items() if a == arch and fragment in name}
    assert found, f"no kernel matching {fragment!r} for {arch}"
    return found


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("math,mma_per_chunk", [("8Mma16BitILb0", 16), ("8Mma16BitILb1", 16), ("7MmaTf32ILb0", 16),
                                                ("7MmaTf32ILb1", 48)])
def test_ranking_kernels_run_on_tensor_cores(sass, arch: str, math: str, mma_per_chunk: int) -> None:
    found = kernels(sass, arch, f"rank_codes_kernelINS0_{math}")
    assert len(found) == 5, sorted(found)  # KP = 1, 2, 4, 8, 16
    for name, ops in found.items():
        assert ops["HMMA"] >= mma_per_chunk, (name, ops["HMMA"])  # at least one warp tile of one chunk
        assert ops["LDSM"] > 0 and ops["LDGSTS"] > 0, name  # ldmatrix from a cp.async ring


@pytest.mark.parametrize("arch", ARCHES)
def test_exact_fp32_ranking_uses_fma_and_no_tensor_core(sass, arch: str) -> None:
    for name, ops in kernels(sass, arch, "rank_codes_kernelINS0_8SimtFp32").items():
        assert ops["HMMA"] == 0 and ops["FFMA"] >= 512, name  # 2 m-tiles x 8 n-tiles x 4 x 8 per chunk


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
