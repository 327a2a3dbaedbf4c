"""Run the benchmark families side by side and write one JSON per family.

    python -m benchmarks.run --quick --out benchmarks/results/<date>-<device>   # GPU, ~minutes per family
    python -m benchmarks.run --full --only nearest_token --out DIR              # GPU, the whole matrix
    python -m benchmarks.run --cpu-smoke --out /tmp/smoke                       # no GPU needed
    python -m benchmarks.run --cpu --out benchmarks/results/<date>-cpu-2core      # CPU timings (bench_cpu)

Each family module ``benchmarks/bench_<family>.py`` exposes
``run(tier, bench, *, with_compile=True) -> None`` that checks every implementation against the
torch reference and then records rows into ``bench`` (see :mod:`benchmarks.harness`).

The quick and full tiers need a CUDA device (without one this exits with status 2 and says so).
``--cpu-smoke`` runs every family on tiny shapes with the CPU backends (torch eager; triton through
its interpreter, switched on here when no GPU is visible and TRITON_INTERPRET is unset) to keep the
code paths tested: its JSON is marked ``"tier": "cpu-smoke"`` and holds no times: GPU numbers need
a GPU. ``--cpu`` runs the CPU family (:mod:`benchmarks.bench_cpu`: the torch backend beside faiss-cpu,
``torch.cdist`` + ``topk``, pykeops and the dense baseline) with wall-clock timings; it is the only
family of that tier, and the GPU families do not run in it.

Exit status: 0 when every family ran and passed its checks, 1 when one failed (its JSON then
has ``"status": "failed"`` and the error), 2 for a usage error or a missing GPU.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches", "train_step")
CPU_FAMILIES: tuple[str, ...] = ("cpu",)
logger = logging.getLogger("benchmarks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick",
                      help="GPU: a few minutes per family (default)")
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="GPU: the whole shape matrix")
    tier.add_argument("--cpu-smoke", dest="tier", action="store_const", const="cpu-smoke",
                      help="CPU: tiny shapes, correctness and code paths only, no performance numbers")
    tier.add_argument("--cpu", dest="tier", action="store_const", const="cpu",
                      help="CPU: wall-clock timings of the CPU family against faiss-cpu, cdist + topk, pykeops")
    parser.add_argument("--only", choices=FAMILIES + CPU_FAMILIES, action="append",
                        help="run only these families (repeatable)")
    parser.add_argument("--out", required=True, help="folder for the JSON files (one per family)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the requested families; see the module docstring for the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tier = args.tier or "quick"
    smoke = tier == "cpu-smoke"
    from benchmarks.harness import CPU_TIER, NO_GPU_MESSAGE, Bench, has_cuda

    cpu = tier == CPU_TIER
    tier_families = CPU_FAMILIES if cpu else FAMILIES
    wrong = [family for family in args.only or () if family not in tier_families]
    if wrong:
        print(f"python -m benchmarks.run: the {tier} tier runs the families {tier_families}, not {wrong}",
              file=sys.stderr)
        return 2

    if smoke and not has_cuda() and "triton.language" not in sys.modules:
        # before triton is first imported; never on a GPU machine, where it would switch this
        # process's triton (and any GPU work after it) to the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not smoke and not cpu and not has_cuda():
        print(f"python -m benchmarks.run: {NO_GPU_MESSAGE}", file=sys.stderr)
        return 2
    bench = Bench.start(smoke=smoke, cpu=cpu)
    if bench.ceilings:
        logger.info("ceilings measured on this device: %s", bench.ceilings)
    failed = []
    for family in dict.fromkeys(args.only or tier_families):
        module = importlib.import_module(f"benchmarks.bench_{family}")
        bench.reset()
        status, error = "ok", None
        try:
            module.run(tier, bench, with_compile=not args.no_compile)
        except Exception as err:  # noqa: BLE001 - recorded in the JSON, reported in the exit status
            logger.exception("%s failed", family)
            status, error = "failed", f"{type(err).__name__}: {err}"
            failed.append(family)
        path = bench.write(args.out, family, tier, status=status, error=error)
        logger.info("%s: %s, %d rows -> %s", family, status, len(bench.rows), path)
    if smoke:
        logger.info("cpu-smoke: these JSON files hold correctness results, not performance numbers")
    if failed:
        logger.error("failed families: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
