"""Benchmark rows kept as they are measured: one JSON Lines file per family, the family JSON rebuilt from it.

``{family}.jsonl`` gets one record per line, appended and flushed the moment it exists:

* ``{"record": "run", ...}`` when a run of the family starts: tier, note, whether it holds
  performance numbers, environment, ceilings, which shapes it runs (``selection``);
* ``{"record": "row", ...}`` for every measured row (shape x implementation);
* ``{"record": "skip", "family", "impl", "reason"}`` for a backend or peer that could not run;
* ``{"record": "end", "status", "error"}`` when the run ends; a run killed before has none.

Several runs can share a file (the GPU check measures the headline shapes first and the rest
later, each in its own process). ``{family}.json`` is the payload :mod:`benchmarks.report` and
:mod:`benchmarks.plots` read; :func:`write_payload` rebuilds it from the JSON Lines file, so a run
that was killed still leaves its finished rows in it (status ``incomplete``). This module needs
neither torch nor a GPU: the GPU check's orchestrator uses it between stages.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.row_log")

JSON_SCHEMA = 2  #: 2: "runs" lists the runs the rows came from; the family JSON is rebuilt from the JSONL
#: a family's status is the worst of its runs' (a run without an end record is "incomplete")
STATUS_ORDER: tuple[str, ...] = ("failed", "interrupted", "incomplete", "ok")


def jsonl_path(out_dir: str | os.PathLike, family: str) -> Path:
    """``{out_dir}/{family}.jsonl``."""
    return Path(out_dir) / f"{family}.jsonl"


def append(path: Path, record: dict[str, Any]) -> None:
    """Append one record as one line and flush it to the file at once."""
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
        out.flush()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file; a line cut short by a kill is skipped with a warning."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d: not a whole JSON record (cut short by a kill?); skipped", path, number)
    return records


def _unique(items: list[Any]) -> list[Any]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group records into runs: header, rows, skips and end of each."""
    runs: list[dict[str, Any]] = []
    for record in records:
        kind = record.get("record")
        if kind == "run":
            runs.append({"header": record, "rows": [], "skipped": [], "end": None})
            continue
        if not runs:
            logger.warning("a %r record before any run record; skipped", kind)
            continue
        run = runs[-1]
        if kind == "row":
            run["rows"].append({key: value for key, value in record.items() if key != "record"})
        elif kind == "skip":
            run["skipped"].append({key: value for key, value in record.items() if key != "record"})
        elif kind == "end":
            run["end"] = record
    return runs


def payload(family: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The family JSON of these records (see the module docstring); raises ValueError with no run in them."""
    runs = _runs(records)
    if not runs:
        raise ValueError(f"{family}: the row log holds no run record")
    first = runs[0]["header"]
    summaries, errors = [], []
    for run in runs:
        end = run["end"] or {"status": "incomplete",
                             "error": f"stopped before its end; {len(run['rows'])} finished rows kept"}
        summaries.append({"selection": run["header"].get("selection"), "started": run["header"].get("started"),
                          "status": end["status"], "error": end.get("error"), "rows": len(run["rows"])})
        if end.get("error"):
            errors.append(end["error"])
    statuses = {summary["status"] for summary in summaries}
    status = next((name for name in STATUS_ORDER if name in statuses), "ok")
    rows = [row for run in runs for row in run["rows"]]
    return {
        "schema": JSON_SCHEMA,
        "family": family,
        "tier": first["tier"],
        "performance": all(run["header"]["performance"] for run in runs),
        "note": first["note"],
        "status": status,
        "error": "; ".join(errors) or None,
        "environment": first["environment"],
        "ceilings": first["ceilings"],
        "runs": summaries,
        "shapes": _unique([row["shape"] for row in rows]),
        "skipped": _unique([entry for run in runs for entry in run["skipped"]]),
        "rows": rows,
    }


def write_payload(path: Path) -> Path:
    """Rebuild ``{family}.json`` beside the JSON Lines file ``path`` (atomically); return its path."""
    family = path.stem
    target = path.with_suffix(".json")
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload(family, read_records(path)), indent=2), encoding="utf-8")
    os.replace(partial, target)
    return target


def refresh_folder(folder: Path) -> list[Path]:
    """Rebuild the family JSON of every JSON Lines file in ``folder``; return the JSON paths written."""
    written = []
    for path in sorted(folder.glob("*.jsonl")):
        try:
            written.append(write_payload(path))
        except (OSError, ValueError) as err:
            logger.warning("%s: not rebuilt (%s)", path, err)
    return written
