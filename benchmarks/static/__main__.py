"""``python -m benchmarks.static``: compile every kernel pacofr can launch for sm_80 / sm_90 and check it.

See :mod:`benchmarks.static` for how the variants are found and :mod:`benchmarks.static.policy` for
the rules. Writes a JSON record (``--json``) and a markdown table (``--markdown``; printed when
not given). Exit status: 0, or 1 with ``--check`` when a rule is broken, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import logging
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.static")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="80,90", help="compute capabilities to compile for (default 80,90)")
    parser.add_argument("--tiers", default="quick", help="benchmark tiers whose shapes are compiled (quick,full: all)")
    parser.add_argument("--presets", default=None, help="model presets whose training step is compiled (default all)")
    parser.add_argument("--no-benchmarks", action="store_true", help="only the model presets' training steps")
    parser.add_argument("--no-models", action="store_true", help="only the benchmark shapes")
    parser.add_argument("--no-cuda", action="store_true", help="skip the pacofr._C SASS table")
    parser.add_argument("--cuda-binary", action="append", type=Path,
                        help="read these CUDA binaries (objects or cubins of csrc/ compiled with nvcc, repeatable) "
                             "instead of the built pacofr._C")
    parser.add_argument("--no-budget", action="store_true",
                        help="skip the cost budget (estimates) of the headline rows (benchmarks.static.cost_budget; "
                             "also skipped with --no-benchmarks)")
    parser.add_argument("--budget-markdown", type=Path,
                        help="write the cost budget (machine constants and estimates) here as markdown")
    parser.add_argument("--only", action="append", help="only workloads whose name starts with this (repeatable)")
    parser.add_argument("--json", type=Path, help="write the full record here")
    parser.add_argument("--markdown", type=Path, help="write the tables here (default: print them)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    parser.add_argument("--spills", choices=("all", "training"), default="all",
                        help="which Triton spills break the rules: in any kernel (default) or only on a model "
                             "preset's training path (the others are listed as warnings)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    """Versions and machine of this run."""
    import torch
    import triton

    import pacofr

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "pacofr": pacofr.__version__,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "gpu": "none: compiled ahead of time, nothing was run"}


def record_launches(args: argparse.Namespace, arches: tuple[int, ...]) -> list:
    """Run every workload under the kernel recorder; the recorded launches."""
    from benchmarks.static.launches import KernelRecorder, compile_only_dispatch
    from benchmarks.static.cost_budget import headline_workloads
    from benchmarks.static.workloads import benchmark_workloads, model_workloads

    workloads = []
    if not args.no_models:
        presets = tuple(args.presets.split(",")) if args.presets else None
        workloads += model_workloads(presets)
    if not args.no_benchmarks:
        workloads += benchmark_workloads(tuple(args.tiers.split(",")))
    if not args.no_benchmarks and not args.no_budget:
        workloads += headline_workloads()
    if args.only:
        workloads = [w for w in workloads if w.name.startswith(tuple(args.only))]
    with KernelRecorder(arches) as recorder, compile_only_dispatch():
        for workload in workloads:
            recorder.origin = workload.name
            workload.run(recorder)
    logger.info("%d workloads made %d launches", len(workloads), len(recorder.launches))
    return recorder.launches


def compile_all(launches: list, jobs: int) -> dict:
    """One compiled :class:`Variant` per distinct specialisation and architecture (by its key), ``jobs``
    processes at a time."""
    from benchmarks.static.triton_aot import CompileJob, apply_result, compile_job, describe

    variants: dict[tuple, Any] = {}
    pending = []
    for launch in launches:
        variant = describe(launch)
        if variant.key not in variants:
            variants[variant.key] = variant
            pending.append((CompileJob.of(launch), variant))
        variants[variant.key].origins.append(launch.origin)
    start = time.monotonic()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(compile_job, job): variant for job, variant in pending}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            apply_result(futures[future], future.result())
            if i % 50 == 0 or i == len(pending):
                logger.info("compiled %d/%d variants (%.0f s)", i, len(pending), time.monotonic() - start)
    return variants


def cuda_binaries(args: argparse.Namespace) -> tuple[list, dict]:
    """The CUDA kernels and their SASS listings: of ``--cuda-binary`` files, else of the built pacofr._C."""
    from benchmarks.static.cuda_sass import cuda_kernels, cuda_listings

    if args.no_cuda:
        return [], {}
    paths = args.cuda_binary or [None]
    kernels, listings = [], {}
    for path in paths:
        kernels += cuda_kernels(path)
        listings.update(cuda_listings(path))
    return kernels, listings


def cost_budget(launches: list, variants: dict, kernels: list, listings: dict) -> list[dict[str, Any]]:
    """The cost budget rows of the headline calls (estimates): Triton variants, and the CUDA ranking kernels."""
    from benchmarks.static.cost_budget import cuda_budget_rows, triton_budget_rows

    rows = triton_budget_rows(launches, variants)
    if kernels:
        rows += cuda_budget_rows(kernels, listings)
    return rows


def budget_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The budget's markdown: the assumed constants, then the estimates."""
    from benchmarks.static.cost_budget import budget_table, machine_table

    return ["ESTIMATES from the compiled code (no GPU ran): see benchmarks/static/cost_model.py.", "",
            *machine_table(), "", *budget_table(rows)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("python -m benchmarks.static: unset TRITON_INTERPRET (the interpreter replaces the kernels "
              "this check compiles)", file=sys.stderr)
        return 2
    try:
        arches = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        print(f"python -m benchmarks.static: --arch must be a comma-separated list like 80,90, got {args.arch!r}",
              file=sys.stderr)
        return 2
    from benchmarks.static import policy

    launches = record_launches(args, arches)
    by_key = compile_all(launches, max(1, args.jobs))
    variants = list(by_key.values())
    triton_rows = [policy.variant_row(v) for v in variants]
    kernels, listings = cuda_binaries(args)
    budget = [] if args.no_budget or args.no_benchmarks else cost_budget(launches, by_key, kernels, listings)
    cuda_rows = [policy.cuda_row(k) for k in kernels]
    violations, warnings = policy.triton_checks(variants, spills=args.spills)
    violations += [v for kernel in kernels for v in policy.cuda_violations(kernel)]
    record = {"environment": environment(), "arches": [f"sm_{a}" for a in arches], "triton": triton_rows,
              "cuda": cuda_rows, "cuda_built": bool(kernels) or args.no_cuda,
              "violations": [vars(v) for v in violations], "warnings": [vars(v) for v in warnings],
              "cost_budget": budget}
    tables = [*policy.triton_summary(triton_rows), "", *(policy.cuda_summary(cuda_rows) if cuda_rows else
              ["pacofr._C: " + ("skipped (--no-cuda)" if args.no_cuda else "not built; no CUDA table")])]
    if violations:
        tables += ["", f"{len(violations)} violations:", *(f"- {v.rule}: {v.kernel} on {v.arch}: {v.detail}"
                                                           for v in violations)]
    if warnings:
        tables += ["", f"{len(warnings)} spills outside the training path (warnings with --spills training):",
                   *(f"- {v.kernel} on {v.arch}: {v.detail}" for v in warnings)]
    if budget:
        tables += ["", *budget_markdown(budget)]
    if args.budget_markdown and budget:
        args.budget_markdown.parent.mkdir(parents=True, exist_ok=True)
        args.budget_markdown.write_text("\n".join(budget_markdown(budget)) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    text = "\n".join(tables) + "\n"
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    else:
        print(text)
    logger.info("%d Triton variants, %d pacofr._C kernels, %d violations, %d warnings", len(triton_rows),
                len(cuda_rows), len(violations), len(warnings))
    return 1 if (args.check and violations) else 0


if __name__ == "__main__":
    sys.exit(main())
