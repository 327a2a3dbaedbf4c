"""Reading benchmark JSON back: runs, performance vs cpu-smoke files, shape labels, speedups.

A *run* is one folder of family JSON files written by :mod:`benchmarks.run` (other JSON files in
it, e.g. ``info.json``, are ignored; a family's JSON Lines file stands in for its JSON when a killed
run left no JSON). Only GPU-tier files (``"performance": true``, tier not
``cpu-smoke``) hold numbers; cpu-smoke files are correctness runs and never become a table or a
plot. Used by :mod:`benchmarks.report` and :mod:`benchmarks.plots`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import row_log
from benchmarks.harness import CPU_TIER, SMOKE_TIER

logger = logging.getLogger("benchmarks.result_files")

#: the eager baseline of a shape: the first of these present among its implementations
EAGER_BASELINES: tuple[str, ...] = ("dense", "mae", "torch", "reference")
#: column order of the implementations in tables and plots
IMPL_ORDER: tuple[str, ...] = ("reference", "reference_compiled", "dense", "dense_compiled", "mae",
                               "mae_compiled", "onehot", "torch", "auto", "triton", "cuda")
FUSED: tuple[str, ...] = ("triton", "cuda")
_SHORT_KEYS = {"n": "N", "codes": "K", "dim": "D", "batch": "B", "mask_ratio": "mask", "decoder_dim": "Dd",
               "image_dtype": "", "dtype": "", "metric": "", "preset": "", "step": "", "precision": ""}


def is_family_payload(data: Any) -> bool:
    """Whether ``data`` is a family JSON written by :meth:`benchmarks.harness.Bench.write`."""
    return isinstance(data, dict) and {"family", "tier", "rows", "environment"} <= set(data)


def is_performance(data: dict[str, Any]) -> bool:
    """GPU numbers (not a cpu-smoke correctness run, nor the CPU tier's wall-clock timings)."""
    return data.get("tier") not in (SMOKE_TIER, CPU_TIER) and bool(data.get("performance", True))


@dataclass
class Run:
    """The family payloads of one results folder (all from the same session)."""

    folder: Path
    families: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def environment(self) -> dict[str, Any]:
        return next(iter(self.families.values()))["environment"]

    @property
    def tier(self) -> str:
        return next(iter(self.families.values()))["tier"]

    @property
    def ceilings(self) -> dict[str, float] | None:
        return next(iter(self.families.values())).get("ceilings")


def load_payloads(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every family JSON under ``root`` (recursively), sorted by path; a family's JSON Lines file
    without its JSON beside it (a run killed before writing it) is read instead."""
    found = []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            logger.warning("skipping %s: not readable JSON (%s)", path, err)
            continue
        if is_family_payload(data):
            found.append((path, data))
    for path in sorted(root.rglob("*.jsonl")):
        if path.with_suffix(".json").exists():
            continue
        try:
            found.append((path.with_suffix(".json"), row_log.payload(path.stem, row_log.read_records(path))))
        except (OSError, ValueError) as err:
            logger.warning("skipping %s: no family rows in it (%s)", path, err)
    return sorted(found, key=lambda item: item[0])


def performance_runs(payloads: Iterable[tuple[Path, dict[str, Any]]]) -> list[Run]:
    """GPU-tier payloads grouped by folder, sorted by folder path."""
    runs: dict[Path, Run] = {}
    for path, data in payloads:
        if is_performance(data):
            runs.setdefault(path.parent, Run(path.parent)).families[data["family"]] = data
    return [runs[folder] for folder in sorted(runs)]


def shape_label(shape: dict[str, Any]) -> str:
    """Compact text of a shape dict: the stage first, then ``K=v`` pairs (bare values for names)."""
    parts = [str(shape["stage"])] if "stage" in shape else []
    for key, value in shape.items():
        if key == "stage" or value is False:
            continue
        short = _SHORT_KEYS.get(key, key)
        parts.append(str(value) if short == "" else (key if value is True else f"{short}={value}"))
    return " ".join(parts)


def ordered_impls(names: Iterable[str]) -> list[str]:
    """Implementation names in :data:`IMPL_ORDER` (unknown names last, alphabetically)."""
    names = set(names)
    known = [name for name in IMPL_ORDER if name in names]
    return known + sorted(names - set(known))


def by_shape(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """label -> impl -> row, in first-seen order of the labels."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        table.setdefault(shape_label(row["shape"]), {})[row["impl"]] = row
    return table


def eager_baseline(impls: dict[str, dict[str, Any]]) -> str | None:
    """The eager implementation that speedups of this shape are relative to."""
    return next((name for name in EAGER_BASELINES if name in impls and impls[name].get("median_ms")), None)


def speedup(impls: dict[str, dict[str, Any]], impl: str) -> float | None:
    """baseline time / ``impl`` time, or None when either is missing."""
    base = eager_baseline(impls)
    mine = impls.get(impl, {}).get("median_ms")
    if base is None or not mine:
        return None
    return impls[base]["median_ms"] / mine
