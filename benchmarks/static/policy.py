"""The rules the static check enforces, and its tables.

Rules (a violation makes ``python -m benchmarks.static --check`` exit 1):

* ``compile``: every recorded Triton variant compiles for every architecture checked;
* ``shared-memory``: static + dynamic shared memory of a kernel fits the architecture's per-block
  limit (:data:`SHARED_LIMIT_BYTES`);
* ``spills``: no kernel uses a stack frame or local-memory loads/stores (register spills), Triton
  variants and ``pacofr._C`` kernels alike (``--spills training``: only kernels on a model
  preset's training path break it; other spills are listed as warnings);
* ``tensor-cores``: a Triton variant whose ``tt.dot`` has 16-bit operands, or fp32 operands with
  TF32/3xTF32 precision, contains tensor-core instructions (``HMMA`` / ``HGMMA``) in its SASS.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from benchmarks.static.cuda_sass import CudaKernel
from benchmarks.static.triton_aot import Variant

#: largest shared memory one block may use (opt-in maximum), bytes: A100 163 KiB, H100/H200 227 KiB
SHARED_LIMIT_BYTES: dict[str, int] = {"sm_80": 166912, "sm_90": 232448, "sm_90a": 232448}


@dataclass(frozen=True)
class Violation:
    """One broken rule: which rule, which kernel (and variant), why."""

    rule: str
    kernel: str
    arch: str
    detail: str


def _spill_text(stack: int, stores: int, loads: int) -> str | None:
    if stack == 0 and stores == 0 and loads == 0:
        return None
    return f"stack {stack} B, {stores} local stores, {loads} local loads"


def triton_violations(variant: Variant) -> list[Violation]:
    """The rules a compiled Triton variant breaks."""
    arch = f"sm_{variant.arch}"
    label = variant_label(variant)
    if variant.error is not None:
        return [Violation("compile", label, arch, variant.error)]
    found = []
    report = variant.report
    shared = variant.shared_dynamic + (report.resources.shared_static if report else 0)
    limit = SHARED_LIMIT_BYTES.get(arch)
    if limit is not None and shared > limit:
        found.append(Violation("shared-memory", label, arch, f"{shared} B > {limit} B"))
    if report is not None:
        spill = _spill_text(report.resources.stack, report.sass.local_stores, report.sass.local_loads)
        if spill:
            found.append(Violation("spills", label, arch, spill))
        wanted = [d for d in variant.dots if d.wants_tensor_cores]
        if wanted and report.sass.mma_total == 0:
            kinds = ", ".join(sorted({f"{d.operand}/{d.precision}" for d in wanted}))
            found.append(Violation("tensor-cores", label, arch, f"tt.dot on {kinds} lowered without HMMA/HGMMA"))
    return found


def triton_checks(variants: list[Variant], spills: str = "all") -> tuple[list[Violation], list[Violation]]:
    """(violations, warnings) of ``variants``: with ``spills="training"`` a spill breaks the rules only in
    a variant on a model preset's training path, and the others become warnings."""
    violations: list[Violation] = []
    warnings: list[Violation] = []
    for variant in variants:
        for found in triton_violations(variant):
            tolerated = spills == "training" and found.rule == "spills" and not on_training_path(variant)
            (warnings if tolerated else violations).append(found)
    return violations, warnings


def cuda_violations(kernel: CudaKernel) -> list[Violation]:
    """The rules a ``pacofr._C`` kernel breaks (shared memory here is its static part only)."""
    found = []
    res, sass = kernel.report.resources, kernel.report.sass
    limit = SHARED_LIMIT_BYTES.get(kernel.report.arch)
    if limit is not None and res.shared_static > limit:
        found.append(Violation("shared-memory", kernel.name, kernel.report.arch, f"{res.shared_static} B > {limit} B"))
    spill = _spill_text(res.stack, sass.local_stores, sass.local_loads)
    if spill:
        found.append(Violation("spills", kernel.name, kernel.report.arch, spill))
    return found


def on_training_path(variant: Variant) -> bool:
    """Whether a recorded model training step launches ``variant``."""
    return any(o.startswith("model ") for o in variant.origins)


def variant_label(variant: Variant) -> str:
    """Kernel name with the constexprs that distinguish its variants, e.g. ``nearest_token_kernel[KP=4, ...]``."""
    shown = ", ".join(f"{k}={v}" for k, v in sorted(variant.constexprs.items()))
    return f"{variant.kernel}[{shown}] warps={variant.num_warps} stages={variant.num_stages}"


def variant_row(variant: Variant) -> dict[str, Any]:
    """JSON record of one variant."""
    report = variant.report
    row: dict[str, Any] = {
        "kernel": variant.kernel, "arch": f"sm_{variant.arch}", "constexprs": {k: repr(v) if not isinstance(
            v, (int, float, str, bool)) else v for k, v in variant.constexprs.items()},
        "signature": variant.signature, "num_warps": variant.num_warps, "num_stages": variant.num_stages,
        "error": variant.error, "shared_dynamic": variant.shared_dynamic,
        "dots": [f"{d.operand}/{d.precision}" for d in variant.dots],
        "tensor_core_dots": sum(d.wants_tensor_cores for d in variant.dots),
        "origins": variant.origins[:5], "origin_count": len(variant.origins),
        "training_path": on_training_path(variant),
    }
    if report is not None:
        row.update(registers=report.resources.registers, stack=report.resources.stack,
                   shared_static=report.resources.shared_static, local_stores=report.sass.local_stores,
                   local_loads=report.sass.local_loads, mma=report.sass.mma, instructions=report.sass.instructions)
    row["violations"] = [v.rule for v in triton_violations(variant)]
    return row


def cuda_row(kernel: CudaKernel) -> dict[str, Any]:
    """JSON record of one ``pacofr._C`` kernel."""
    res, sass = kernel.report.resources, kernel.report.sass
    return {"kernel": kernel.name, "arch": kernel.report.arch, "registers": res.registers, "stack": res.stack,
            "shared_static": res.shared_static, "local_stores": sass.local_stores, "local_loads": sass.local_loads,
            "mma": sass.mma, "instructions": sass.instructions,
            "violations": [v.rule for v in cuda_violations(kernel)]}


def _span(values: list[int]) -> str:
    return "-" if not values else (str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}")


def triton_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one line per (kernel, architecture) over all its variants."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["kernel"], row["arch"])].append(row)
    lines = ["| Triton kernel | arch | variants | training path | registers | stack B | shared KiB | "
             "tensor-core dots | MMA in SASS | violations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), group in sorted(groups.items()):
        compiled = [r for r in group if r["error"] is None]
        shared = [(r["shared_dynamic"] + r.get("shared_static", 0)) // 1024 for r in compiled]
        tc = [r for r in compiled if r["tensor_core_dots"]]
        with_mma = [r for r in tc if sum(r.get("mma", {}).values()) > 0]
        mma_ops = sorted({op for r in compiled for op in r.get("mma", {})})
        violations = sorted({v for r in group for v in r["violations"]})
        lines.append(f"| `{kernel}` | {arch} | {len(group)} | {sum(r['training_path'] for r in group)} | "
                     f"{_span([r['registers'] for r in compiled if 'registers' in r])} | "
                     f"{_span([r['stack'] for r in compiled if 'stack' in r])} | {_span(shared)} | "
                     f"{len(tc)} | {len(with_mma)} of {len(tc)} ({', '.join(mma_ops) or 'none'}) | "
                     f"{', '.join(violations) or 'none'} |")
    return lines


def cuda_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table: one line per ``pacofr._C`` kernel template and architecture."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["kernel"].split("<", 1)[0], row["arch"])].append(row)
    lines = ["| pacofr._C kernel | arch | instantiations | registers | stack B | static shared B | "
             "MMA instructions | violations |", "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), group in sorted(groups.items()):
        mma = sum(sum(r["mma"].values()) for r in group)
        ops = sorted({op for r in group for op in r["mma"]})
        violations = sorted({v for r in group for v in r["violations"]})
        lines.append(f"| `{kernel}` | {arch} | {len(group)} | {_span([r['registers'] for r in group])} | "
                     f"{_span([r['stack'] for r in group])} | {_span([r['shared_static'] for r in group])} | "
                     f"{mma} ({', '.join(ops) or 'none'}) | {', '.join(violations) or 'none'} |")
    return lines
