"""Scores of predictions per target kind, and the summary over seeds.

Reporting rule: the number that counts is the score on test **after the final epoch** of a head
trained with hyper-parameters picked on the validation split, given as mean and population
standard deviation over seeds. The test split never selects anything.

| kind | score | unit | better |
|---|---|---|---|
| ``class`` | top-1 accuracy (ties: the smaller class index) | % | higher |
| ``multi`` | mean per-attribute accuracy (logit > 0) | % | higher |
| ``regression`` | mean absolute error | the label's unit | lower |
| ``landmarks`` | NME: mean point error / distance of ``iod_points`` | % | lower |
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pacofr.eval.labelled import Targets


@dataclass(frozen=True)
class Metric:
    """How a kind of target is scored: ``name``, ``unit``, and whether higher is better."""

    name: str
    unit: str
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is strictly better than ``b`` (NaN is never better)."""
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a > b if self.higher_is_better else a < b


def metric_of(targets: Targets) -> Metric:
    """The :class:`Metric` of ``targets``' kind."""
    if targets.kind == "class":
        return Metric("accuracy", "%", True)
    if targets.kind == "multi":
        return Metric("attribute accuracy", "%", True)
    if targets.kind == "regression":
        return Metric("MAE", targets.unit, False)
    return Metric("NME", f"% of the distance between points {targets.iod_points[0]} and {targets.iod_points[1]}", False)


def score(outputs: torch.Tensor, targets: Targets) -> float:
    """The score of head outputs (N, width) against ``targets``: class / attribute logits, or
    predicted values in the targets' own units (regression values, landmark fractions flattened
    x, y per point). NaN for no samples."""
    if len(targets) == 0:
        return float("nan")
    y = targets.values
    outputs = outputs.float()
    if targets.kind == "class":
        return 100.0 * (outputs.argmax(1) == y).double().mean().item()
    if targets.kind == "multi":
        return 100.0 * ((outputs > 0).float() == y).double().mean().item()
    if targets.kind == "regression":
        return (outputs.double() - y.double()).abs().mean().item()
    points = outputs.double().reshape(y.shape)
    a, b = targets.iod_points  # type: ignore[misc]
    iod = (y[:, a].double() - y[:, b].double()).norm(dim=-1).clamp_min(1e-12)
    return 100.0 * ((points - y.double()).norm(dim=-1).mean(1) / iod).mean().item()


def classification_loss(logits: torch.Tensor, values: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy (class) or binary cross-entropy with logits (multi)."""
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(logits, values)
    return F.cross_entropy(logits, values)


@dataclass
class SeedRun:
    """One seed's outcome: the final-epoch test score (and val score, an extra) plus curves."""

    seed: int
    test: float
    val: float = float("nan")
    train_loss_curve: list[float] = field(default_factory=list)


def summarise(runs: list[SeedRun], metric: Metric, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean and population std of the final test scores of ``runs`` (one per seed), with the runs."""
    if not runs:
        raise ValueError("summarise needs at least one seed run")
    tests = [r.test for r in runs]
    return {
        "metric": metric.name, "unit": metric.unit, "higher_is_better": metric.higher_is_better,
        "mean": statistics.fmean(tests), "std": statistics.pstdev(tests) if len(tests) > 1 else 0.0,
        "min": min(tests), "max": max(tests), "seeds": [r.seed for r in runs],
        "val_mean": statistics.fmean(r.val for r in runs),
        "runs": [asdict(r) for r in runs], **(extra or {}),
    }
