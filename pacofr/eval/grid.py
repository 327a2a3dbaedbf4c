"""Many rows (encoders and baselines) on many labelled sets: one table of results.

:func:`evaluate_grid` runs :func:`pacofr.eval.evaluate.evaluate_sets` for every row, so every row
goes through the same code path. A row is opened only when its turn comes (an encoder is loaded,
evaluated and dropped), and with ``cache_dir`` each finished row is kept as JSON: a grid run again
with the same plan and sets reuses it instead of evaluating it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pacofr.eval.evaluate import EvalPlan, evaluate_sets
from pacofr.eval.extractors import Extractor
from pacofr.eval.labelled import LabelledSet, describe_data
from pacofr.eval.report import clean_json, write_json

logger = logging.getLogger(__name__)


@dataclass
class Row:
    """A row of the grid: its label, how to open it, and JSON-friendly facts shown beside it
    (``info``: e.g. how it was pre-trained)."""

    name: str
    open: Callable[[], Extractor]
    info: dict[str, Any] = field(default_factory=dict)
    kind: str = "encoder"  # "encoder" or "baseline"


def plan_dict(plan: EvalPlan) -> dict[str, Any]:
    """``plan`` as JSON-friendly data."""
    return {"protocols": list(plan.protocols), "probe": asdict(plan.probe),
            "finetune": asdict(plan.finetune) if plan.finetune is not None else None,
            "pools": list(plan.pools) if plan.pools else None, "finetune_pool": plan.finetune_pool,
            "batch_size": plan.batch_size}


def _fingerprint(row: Row, sets: Sequence[tuple[str, LabelledSet]], plan: EvalPlan) -> str:
    described = {name: describe_data(data) for name, data in sets}
    text = json.dumps({"row": row.name, "info": row.info, "plan": plan_dict(plan), "sets": described},
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def evaluate_grid(rows: Sequence[Row], sets: Sequence[tuple[str, LabelledSet]], plan: EvalPlan,
                  cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every row on every set; returns one entry per row: ``name``, ``kind``, ``info``, the
    extractor's description and ``tasks`` (see :func:`~pacofr.eval.evaluate.evaluate_sets`)."""
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    out = []
    for row in rows:
        fingerprint = _fingerprint(row, sets, plan)
        cached = Path(cache_dir) / f"row-{fingerprint[:16]}.json" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            logger.info("row %s: reusing %s", row.name, cached)
            out.append(json.loads(cached.read_text()))
            continue
        start = time.perf_counter()
        extractor = row.open()
        extractor.name = row.name
        entry = clean_json({"name": row.name, "kind": row.kind, "info": row.info, "row": extractor.describe(),
                            "tasks": evaluate_sets(extractor, sets, plan),
                            "seconds": round(time.perf_counter() - start, 1), "fingerprint": fingerprint})
        if cached is not None:
            write_json(cached, entry)
        out.append(entry)
        logger.info("row %s done in %.0f s", row.name, entry["seconds"])
    return out
