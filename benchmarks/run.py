"""Run the benchmark families side by side and write one JSON per family.

    python -m benchmarks.run --quick --out benchmarks/results/<date>-<device>
    python -m benchmarks.run --full --only nearest_token --out DIR

Each family module ``benchmarks/bench_<family>.py`` exposes ``run(tier, bench) -> None`` that
records rows into ``bench`` (see :mod:`benchmarks.harness`). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from benchmarks.harness import Bench

FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches")
logger = logging.getLogger("benchmarks")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick", help="about 5 minutes (default)")
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="the whole shape matrix")
    parser.add_argument("--only", choices=FAMILIES, action="append", help="run only these families")
    parser.add_argument("--out", required=True, help="folder for the JSON files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    tier_name = args.tier or "quick"
    bench = Bench.start()
    logger.info("ceilings on this device: %s", bench.ceilings)
    for family in args.only or FAMILIES:
        module = importlib.import_module(f"benchmarks.bench_{family}")
        bench.rows = []
        module.run(tier_name, bench)
        path = bench.write(args.out, family, tier_name)
        logger.info("%s: %d rows -> %s", family, len(bench.rows), path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
