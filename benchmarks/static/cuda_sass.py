"""Registers, spills, shared memory and tensor-core instructions of every kernel in the built ``pacofr._C``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from benchmarks.static.toolchain import FunctionReport, demangle, inspect_binary, sass_listings


@dataclass(frozen=True)
class CudaKernel:
    """One kernel of ``pacofr._C`` for one architecture."""

    name: str  #: demangled, without the argument list
    report: FunctionReport


def extension_path() -> Path | None:
    """The shared library of ``pacofr._C`` (found, not loaded), or None when it is not built."""
    spec = importlib.util.find_spec("pacofr._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def short_name(full: str) -> str:
    """``pacofr::(anonymous namespace)::kernel<c10::BFloat16, 4>(...)`` -> ``kernel<c10::BFloat16, 4>``."""
    depth, start = 0, 0
    for i, ch in enumerate(full):  # scope separators and the argument list outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and ch == ":" and full.startswith("::", i):
            start = i + 2
        elif depth == 0 and ch == "(" and not full.startswith("(anonymous", i):
            return full[start:i]
    return full[start:]


def cuda_kernels(path: Path | None = None) -> list[CudaKernel]:
    """Every kernel in the fatbin of ``path`` (default: the importable ``pacofr._C``); [] when not built."""
    path = path or extension_path()
    if path is None:
        return []
    reports = inspect_binary(path)
    names = demangle([r.name for r in reports])
    return [CudaKernel(short_name(names[r.name]), r) for r in reports]


def cuda_listings(path: Path | None = None) -> dict[tuple[str, str], str]:
    """SASS listing of every kernel of ``path`` (default: the importable ``pacofr._C``) by (arch, mangled name)."""
    path = path or extension_path()
    return {} if path is None else sass_listings(path)
