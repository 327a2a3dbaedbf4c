"""Run the benchmark families side by side and write one JSON per family.

    python -m benchmarks.run --quick --out benchmarks/results/<date>-<device>   # GPU, ~minutes per family
    python -m benchmarks.run --full --only nearest_token --out DIR              # GPU, the whole matrix
    python -m benchmarks.run --cpu-smoke --out /tmp/smoke                       # no GPU needed
    python -m benchmarks.run --cpu --out benchmarks/results/<date>-cpu-2core      # CPU timings (bench_cpu)

Each family module ``benchmarks/bench_<family>.py`` exposes ``run(tier, bench) -> None`` that
checks every implementation against the torch reference and then records rows into ``bench`` (see
:mod:`benchmarks.harness`). Rows are appended to ``DIR/<family>.jsonl`` the moment they are measured
and ``DIR/<family>.json`` is rebuilt from it when the family ends (:mod:`benchmarks.row_log`), so a
run stopped part-way keeps its finished rows; Ctrl-C (SIGINT) ends the family with status
``interrupted`` and exit status 130.

Options the GPU check (:mod:`benchmarks.gpu_check`) uses to bring the most valuable evidence first:
``--shapes headline`` runs each family's headline shape only (the first of its tier), ``--shapes
rest`` the others; ``torch.compile`` baselines are built for the headline shape only unless
``--compile-all`` (or none with ``--no-compile``); ``--check-only`` checks every implementation on
the GPU and runs it once without timing it; ``--fused-backends triton`` leaves ``cuda`` out (a
skipped row says so) and ``--no-peers`` the peer libraries; ``--append`` adds runs to the family
files in ``--out`` instead of starting them afresh; ``--ceilings FILE`` reads the device ceilings
from FILE, or measures and writes them there, so the stages of one check measure them once.

The quick and full tiers need a CUDA device (without one this exits with status 2 and says so).
``--cpu-smoke`` runs every family on tiny shapes with the CPU backends (torch eager; triton through
its interpreter, switched on here when no GPU is visible and TRITON_INTERPRET is unset) to keep the
code paths tested: its JSON is marked ``"tier": "cpu-smoke"`` and holds no times: GPU numbers need
a GPU. ``--cpu`` runs the CPU family (:mod:`benchmarks.bench_cpu`: the torch backend beside faiss-cpu,
``torch.cdist`` + ``topk``, pykeops and the dense baseline) with wall-clock timings; it is the only
family of that tier, and the GPU families do not run in it.

Exit status: 0 when every family ran and passed its checks, 1 when one failed (its JSON then
has ``"status": "failed"`` and the error), 2 for a usage error or a missing GPU, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from benchmarks.harness import CPU_TIER, FUSED_BACKENDS, NO_GPU_MESSAGE, SELECTIONS, Bench, has_cuda

FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches", "train_step")
CPU_FAMILIES: tuple[str, ...] = ("cpu",)
INTERRUPTED_EXIT = 130
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
    compiled = parser.add_mutually_exclusive_group()
    compiled.add_argument("--no-compile", dest="compile_policy", action="store_const", const="none",
                          help="no torch.compile baselines")
    compiled.add_argument("--compile-all", dest="compile_policy", action="store_const", const="all",
                          help="torch.compile baselines for every shape (default: the headline shape of each family)")
    parser.add_argument("--shapes", choices=SELECTIONS, default="all",
                        help="all shapes of the tier (default), each family's headline shape only, or the rest")
    parser.add_argument("--check-only", action="store_true",
                        help="GPU tiers: check every implementation and run it once, time nothing")
    parser.add_argument("--fused-backends", choices=FUSED_BACKENDS, action="append",
                        help="fused backends to run (repeatable; default: triton and cuda)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="leave out the peer libraries (flash-kmeans, KeOps, vector-quantize-pytorch)")
    parser.add_argument("--append", action="store_true",
                        help="add this run to the family files in --out instead of starting them afresh")
    parser.add_argument("--ceilings", type=Path,
                        help="GPU tiers: read the device ceilings from this JSON file, or measure and write them there")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the requested families; see the module docstring for the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tier = args.tier or "quick"
    smoke = tier == "cpu-smoke"
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
    bench = Bench.start(smoke=smoke, cpu=cpu, check_only=args.check_only and not (smoke or cpu),
                        ceilings_file=args.ceilings, fused=tuple(args.fused_backends or FUSED_BACKENDS),
                        selection=args.shapes, compile_policy=args.compile_policy or "headline", peers=args.peers)
    if bench.ceilings:
        logger.info("ceilings of this device: %s", bench.ceilings)
    failed = []
    for family in dict.fromkeys(args.only or tier_families):
        module = importlib.import_module(f"benchmarks.bench_{family}")
        bench.open(args.out, family, tier, append=args.append)
        status, error = "ok", None
        try:
            module.run(tier, bench)
        except KeyboardInterrupt:
            path = bench.write(args.out, family, tier, status="interrupted", error="interrupted (SIGINT)")
            logger.error("%s: interrupted after %d rows -> %s", family, len(bench.rows), path)
            return INTERRUPTED_EXIT
        except Exception as err:  # noqa: BLE001 - recorded in the JSON, reported in the exit status
            logger.exception("%s failed", family)
            status, error = "failed", f"{type(err).__name__}: {err}"
            failed.append(family)
        path = bench.write(args.out, family, tier, status=status, error=error)
        logger.info("%s: %s, %d rows -> %s", family, status, len(bench.rows), path)
    if not bench.timed:
        logger.info("%s: these JSON files hold correctness results, not performance numbers",
                    "cpu-smoke" if smoke else "check-only")
    if failed:
        logger.error("failed families: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
