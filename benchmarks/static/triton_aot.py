"""Ahead-of-time compilation of recorded Triton launches for a GPU architecture, and what the cubin says.

A launch, bound as ``JITFunction.run`` binds it (:func:`~benchmarks.static.launches.bind_launch`:
argument types, integer and pointer-alignment specialisations, constexprs, options), is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. From the result: the
dynamic shared memory Triton allocates (``metadata.shared``), and, through ``cuobjdump``, registers,
stack, static shared memory, local-memory instructions and tensor-core instructions. The ``tt.dot``
operations of the TTIR tell which dots were asked to run on tensor cores (16-bit operands, or fp32
with TF32 / 3xTF32 input precision).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.static.launches import WARP_SIZE, KernelLaunch
from benchmarks.static.sass_flow import FlowCounts, flow_counts
from benchmarks.static.toolchain import FunctionReport, inspect_binary, sass_listings

_PRECISION_RE = re.compile(r"inputPrecision\s*=\s*(\w+)")
_OPERAND_RE = re.compile(r":\s*tensor<[0-9x]+x(\w+)>")


@dataclass(frozen=True)
class DotOp:
    """One ``tt.dot`` of a kernel's TTIR: operand element type and input precision."""

    operand: str  #: e.g. "bf16", "f16", "f32"
    precision: str  #: "ieee" (the IR default, not printed), "tf32" or "tf32x3"

    @property
    def wants_tensor_cores(self) -> bool:
        """16-bit operands always, fp32 operands unless the exact IEEE path was asked for."""
        return self.operand in ("bf16", "f16") or (self.operand == "f32" and self.precision != "ieee")


@dataclass
class Variant:
    """One distinct compiled specialisation of a kernel for one architecture."""

    kernel: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    origins: list[str] = field(default_factory=list)
    error: str | None = None
    shared_dynamic: int = 0
    dots: list[DotOp] = field(default_factory=list)
    report: FunctionReport | None = None
    flow: FlowCounts | None = None  #: executed opcodes by part (benchmarks.static.sass_flow)

    @property
    def key(self) -> tuple:
        return variant_key(self.kernel, self.arch, self.signature, self.constexprs, self.num_warps, self.num_stages)


def variant_key(kernel: str, arch: int, signature: dict, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    return (kernel, arch, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
            num_warps, num_stages)


def _named_constexprs(kernel: Any, constexprs: dict) -> dict[str, Any]:
    """Constexpr values by argument name (the runtime keys them by argument path)."""
    names = kernel.arg_names
    return {names[path[0]]: getattr(value, "value", value) for path, value in constexprs.items() if len(path) == 1}


def dots_of(ttir: str) -> list[DotOp]:
    """The ``tt.dot`` operations of a TTIR listing."""
    dots = []
    for line in ttir.splitlines():
        if " tt.dot " not in line:
            continue
        operand = _OPERAND_RE.search(line)
        precision = _PRECISION_RE.search(line)
        dots.append(DotOp(operand=operand.group(1) if operand else "unknown",
                          precision=precision.group(1) if precision else "ieee"))
    return dots


def describe(launch: KernelLaunch) -> Variant:
    """The variant ``launch`` compiles to (not yet compiled)."""
    return Variant(kernel=launch.name, arch=launch.arch, signature=dict(launch.signature),
                   constexprs=_named_constexprs(launch.kernel, launch.constexprs),
                   num_warps=launch.options.num_warps, num_stages=launch.options.num_stages)


@dataclass(frozen=True)
class CompileJob:
    """What a worker process needs to compile one launch (the kernel is re-imported there by name)."""

    module: str
    name: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]

    @classmethod
    def of(cls, launch: KernelLaunch) -> CompileJob:
        return cls(launch.kernel.__module__, launch.kernel.__name__, launch.arch, launch.signature,
                   launch.constexprs, launch.attrs, dict(launch.options.__dict__))


@dataclass(frozen=True)
class CompileResult:
    """What compiling a job produced (or the error it raised)."""

    error: str | None
    shared_dynamic: int = 0
    dots: tuple[DotOp, ...] = ()
    report: FunctionReport | None = None
    flow: FlowCounts | None = None


def compile_job(job: CompileJob) -> CompileResult:
    """Compile ``job`` for its architecture; read shared memory, dots, resources, SASS counts and flow."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job.module), job.name)
    try:
        compiled = triton.compile(ASTSource(kernel, job.signature, job.constexprs, job.attrs),
                                  target=GPUTarget("cuda", job.arch, WARP_SIZE), options=job.options)
    except Exception as err:  # noqa: BLE001 - a compile failure is a result of the check
        return CompileResult(error=f"{type(err).__name__}: {err}".splitlines()[0][:500])
    with tempfile.TemporaryDirectory() as scratch:
        cubin = Path(scratch) / f"{job.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        reports = inspect_binary(cubin, default_arch=f"sm_{job.arch}")
        listings = sass_listings(cubin, default_arch=f"sm_{job.arch}")
    matching = [r for r in reports if r.name == compiled.metadata.name] or reports
    report = matching[0] if matching else None
    listing = listings.get((report.arch, report.name)) if report is not None else None
    return CompileResult(error=None, shared_dynamic=int(compiled.metadata.shared),
                         dots=tuple(dots_of(compiled.asm["ttir"])), report=report,
                         flow=flow_counts(listing) if listing is not None else None)


def apply_result(variant: Variant, result: CompileResult) -> Variant:
    """Fill ``variant`` with a :class:`CompileResult`."""
    variant.error, variant.shared_dynamic = result.error, result.shared_dynamic
    variant.dots, variant.report, variant.flow = list(result.dots), result.report, result.flow
    return variant
