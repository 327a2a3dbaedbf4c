"""The NVIDIA binary tools the static check uses, and parsers of their output.

``cuobjdump`` comes with the triton wheel (``triton/backends/nvidia/bin``) and with a CUDA toolkit;
the first one found is used. Nothing here needs a GPU.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: SASS opcodes that use tensor cores (Ampere ``HMMA``; Hopper warpgroup ``HGMMA``; integer ``IMMA``).
MMA_OPCODES: tuple[str, ...] = ("HGMMA", "HMMA", "IMMA")
#: SASS opcodes that touch thread-local memory: spills (or local arrays) when present.
LOCAL_OPCODES: tuple[str, ...] = ("STL", "LDL")


class ToolMissingError(RuntimeError):
    """No ``cuobjdump`` could be found."""


@functools.lru_cache(maxsize=1)
def cuobjdump() -> str:
    """Path of a ``cuobjdump`` executable (the triton wheel's first, then the CUDA toolkit's)."""
    candidates = []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    which = shutil.which("cuobjdump")
    if which:
        candidates.append(Path(which))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise ToolMissingError("cuobjdump was not found: install triton (it ships one) or a CUDA toolkit")


def run_tool(*args: str) -> str:
    """stdout of ``cuobjdump ARGS``; RuntimeError with its stderr when it fails."""
    done = subprocess.run([cuobjdump(), *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Resources:
    """Per-function resource usage of one cubin function (``cuobjdump -res-usage``), in registers/bytes."""

    registers: int
    stack: int
    shared_static: int
    local: int


@dataclass(frozen=True)
class SassCounts:
    """Instruction counts in one function's SASS (``opcodes``: by base opcode, ``HMMA``, and by full
    opcode with its modifiers, ``HMMA.16816.F32.BF16``)."""

    mma: dict[str, int]
    local_stores: int
    local_loads: int
    instructions: int
    opcodes: dict[str, int] = field(default_factory=dict)

    @property
    def mma_total(self) -> int:
        return sum(self.mma.values())


@dataclass(frozen=True)
class FunctionReport:
    """What the static check knows of one compiled GPU function for one architecture."""

    arch: str
    name: str
    resources: Resources
    sass: SassCounts


_ARCH_RE = re.compile(r"^arch = (sm_\d+a?)", re.M)
_FUNC_RES_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_FUNC_RE = re.compile(r"^\s*Function : (\S+)\s*$", re.M)
_OPCODE_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_.]+)?)")


def _fatbin_sections(text: str) -> Iterator[tuple[str, str]]:
    """(arch, section text) for every "Fatbin elf code" block of cuobjdump's output (a cubin has one)."""
    blocks = re.split(r"\n(?=Fatbin elf code:)", text)
    for block in blocks:
        found = _ARCH_RE.search(block)
        yield (found.group(1) if found else "unknown"), block


def parse_resource_usage(text: str, default_arch: str = "unknown") -> dict[tuple[str, str], Resources]:
    """``{(arch, mangled function name): Resources}`` from ``cuobjdump -res-usage`` output."""
    usage = {}
    for arch, block in _fatbin_sections(text):
        arch = default_arch if arch == "unknown" else arch
        for match in _FUNC_RES_RE.finditer(block):
            name, regs, stack, shared, local = match.groups()
            usage[(arch, name)] = Resources(int(regs), int(stack), int(shared), int(local))
    return usage


def count_sass(function_text: str) -> SassCounts:
    """Opcode counts of one function's SASS listing."""
    full = _OPCODE_RE.findall(function_text)
    counts = Counter(op.split(".", 1)[0] for op in full)
    counts.update(op for op in full if "." in op)
    mma = {op: counts[op] for op in MMA_OPCODES if counts[op]}
    return SassCounts(mma=mma, local_stores=counts["STL"], local_loads=counts["LDL"], instructions=len(full),
                      opcodes=dict(counts))


def split_functions(text: str, default_arch: str = "unknown") -> dict[tuple[str, str], str]:
    """``{(arch, mangled function name): its SASS listing}`` from ``cuobjdump -sass`` output."""
    listings = {}
    for arch, block in _fatbin_sections(text):
        arch = default_arch if arch == "unknown" else arch
        heads = list(_SASS_FUNC_RE.finditer(block))
        for head, nxt in zip(heads, [*heads[1:], None]):
            listings[(arch, head.group(1))] = block[head.end(): nxt.start() if nxt is not None else len(block)]
    return listings


def parse_sass(text: str, default_arch: str = "unknown") -> dict[tuple[str, str], SassCounts]:
    """``{(arch, mangled function name): SassCounts}`` from ``cuobjdump -sass`` output."""
    return {key: count_sass(body) for key, body in split_functions(text, default_arch).items()}


def sass_listings(path: str | os.PathLike, default_arch: str = "unknown") -> dict[tuple[str, str], str]:
    """The SASS listing of every GPU function in a cubin or a host binary with an embedded fatbin."""
    return split_functions(run_tool("-sass", str(path)), default_arch)


def inspect_binary(path: str | os.PathLike, default_arch: str = "unknown") -> list[FunctionReport]:
    """Every GPU function in a cubin or a host binary with an embedded fatbin (e.g. ``pacofr._C``)."""
    usage = parse_resource_usage(run_tool("-res-usage", str(path)), default_arch)
    sass = parse_sass(run_tool("-sass", str(path)), default_arch)
    empty = SassCounts(mma={}, local_stores=0, local_loads=0, instructions=0)
    return [FunctionReport(arch=arch, name=name, resources=res, sass=sass.get((arch, name), empty))
            for (arch, name), res in sorted(usage.items())]


def demangle(names: list[str]) -> dict[str, str]:
    """C++ demangled form of every name (one ``c++filt`` call), each name itself where that is unavailable."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {name: name for name in names}
    done = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(names):
        return {name: name for name in names}
    return dict(zip(names, lines))
