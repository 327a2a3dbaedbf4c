"""PNG plots of one GPU benchmark run (matplotlib, no display needed).

    python -m benchmarks.plots RUN_DIR [--out DIR]

For every family JSON of a GPU tier in ``RUN_DIR`` (cpu-smoke files are skipped: they hold no
numbers) it writes into ``--out`` (default ``RUN_DIR``):

- ``<family>_speedup.png``: per shape, each implementation's speedup over the eager baseline of
  that shape (``dense``, ``mae``, ``torch``, else ``reference``), log scale, 1x marked;
- ``<family>_floor.png`` (kernel families): per shape, % of the floor each implementation reaches
  (100% = the roofline time at the ceilings measured in that run).

Exit status 0 when at least one plot was written, 1 when the folder holds no GPU results.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.result_files import by_shape, is_performance, load_payloads, ordered_impls, speedup

logger = logging.getLogger("benchmarks.plots")
_LOG_TICKS = tuple(m * 10.0**e for e in range(-3, 4) for m in (1, 2, 5))
Metric = Callable[[dict[str, dict[str, Any]], str], float | None]


def _bar_chart(table: dict[str, dict[str, dict[str, Any]]], metric: Metric, title: str, xlabel: str,
               path: Path, *, log: bool, reference_line: float) -> Path | None:
    """Horizontal grouped bars: one group per shape, one bar per implementation with a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    impls = ordered_impls({impl for row in table.values() for impl in row})
    values = {impl: [metric(row, impl) for row in table.values()] for impl in impls}
    impls = [impl for impl in impls if any(v is not None for v in values[impl])]
    if not impls:
        return None
    labels = list(table)
    height = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.25 * len(labels) * len(impls) + 0.4 * len(labels)))
    origin = reference_line if log else 0.0  # log bars grow from 1x to either side
    for i, impl in enumerate(impls):
        ys = [pos + (i - (len(impls) - 1) / 2) * height for pos in range(len(labels))]
        widths = [math.nan if v is None else v - origin for v in values[impl]]
        ax.barh(ys, widths, left=origin, height=height, label=impl)
    ax.axvline(reference_line, color="black", linewidth=0.8, linestyle="--")
    if log:
        present = [v for vs in values.values() for v in vs if v is not None and v > 0] + [reference_line]
        low, high = min(present) / 1.5, max(present) * 1.5
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.set_xticks([t for t in _LOG_TICKS if low <= t <= high], minor=False)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_family(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """The plots of one GPU family payload; returns the files written."""
    family = data["family"]
    table = by_shape(row for row in data["rows"] if row.get("median_ms"))
    if not table:
        return []
    device = data["environment"].get("device", "?")
    written = [_bar_chart(table, speedup, f"{family} on {device}: speedup over the eager baseline",
                          "speedup (x, log scale)", out_dir / f"{family}_speedup.png", log=True, reference_line=1.0)]
    if family != "train_step":
        def floor(row: dict[str, dict[str, Any]], impl: str) -> float | None:
            return row.get(impl, {}).get("pct_of_floor")

        written.append(_bar_chart(table, floor, f"{family} on {device}: % of the measured-ceiling floor",
                                  "% of floor (100 = roofline)", out_dir / f"{family}_floor.png", log=False,
                                  reference_line=100.0))
    return [path for path in written if path is not None]


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    """Plots of every GPU family JSON directly in ``run_dir``; cpu-smoke files are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path, data in load_payloads(run_dir):
        if path.parent != run_dir:
            continue
        if not is_performance(data):
            logger.info("skipping %s: %s tier, no performance numbers to plot", path, data.get("tier"))
            continue
        written += plot_family(data, out_dir)
    return written


def main(argv: list[str] | None = None) -> int:
    """See the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="folder of one run's family JSON files")
    parser.add_argument("--out", type=Path, help="folder for the PNG files (default: run_dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = plot_run(args.run_dir, args.out or args.run_dir)
    for path in written:
        logger.info("wrote %s", path)
    if not written:
        print(f"python -m benchmarks.plots: no GPU results in {args.run_dir} (cpu-smoke files hold no "
              "performance numbers; GPU numbers need a GPU)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
