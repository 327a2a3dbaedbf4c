"""Losses, accuracies and the seed summary shared by every classification evaluation.

Reporting rule (issue 8): the number that counts is the **final-epoch** test accuracy, given as
mean and population standard deviation over seeds. The validation split may pick a "best epoch",
reported as an extra only; the test split never selects anything.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


@dataclass
class SeedRun:
    """One seed's outcome; metrics are accuracies in [0, 1] (mean per attribute for multi-label).

    ``final_test_loss`` is the task loss (cross-entropy) on test after the final epoch: finer-grained
    than accuracy on small test splits. ``best_val`` / ``best_val_epoch`` (1-based) come from the
    validation curve only.
    """

    seed: int
    final_test: float
    final_test_loss: float
    final_val: float
    best_val: float
    best_val_epoch: int
    val_curve: list[float] = field(default_factory=list)
    train_loss_curve: list[float] = field(default_factory=list)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """Top-1 accuracy (single-label, labels int64 (N,)) or mean per-attribute accuracy
    (multi-label, labels float32 (N, C) multi-hot, threshold at logit 0). NaN for no samples."""
    if labels.shape[0] == 0:
        return float("nan")
    if multi_label:
        return ((logits > 0).float() == labels).float().mean().item()
    return (logits.argmax(1) == labels).float().mean().item()


def task_loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy (single-label) or binary cross-entropy with logits (multi-label)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def loss_value(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """:func:`task_loss` as a float, NaN for no samples."""
    if labels.shape[0] == 0:
        return float("nan")
    return task_loss(logits.float(), labels, multi_label).item()


def best_of(val_curve: list[float]) -> tuple[float, int]:
    """(best validation accuracy, its 1-based epoch); the earliest epoch wins ties; (nan, 0) when
    every value is NaN (an empty validation split)."""
    scored = [(v, i) for i, v in enumerate(val_curve) if not math.isnan(v)]
    if not scored:
        return float("nan"), 0
    value, index = max(scored, key=lambda t: (t[0], -t[1]))
    return value, index + 1


def summarise(runs: list[SeedRun], split_sizes: dict[str, int], config: dict[str, Any]) -> dict[str, Any]:
    """The reported numbers of ``runs`` (one per seed): final-epoch test mean and std, extras, runs."""
    if not runs:
        raise ValueError("summarise needs at least one seed run")
    finals = [r.final_test for r in runs]
    return {
        "final_test_mean": statistics.fmean(finals),
        "final_test_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
        "final_test_min": min(finals),
        "final_test_max": max(finals),
        "final_test_loss_mean": statistics.fmean(r.final_test_loss for r in runs),
        "final_test_loss_std": statistics.pstdev(r.final_test_loss for r in runs) if len(runs) > 1 else 0.0,
        "final_val_mean": statistics.fmean(r.final_val for r in runs),
        "best_val_mean": statistics.fmean(r.best_val for r in runs),
        "seeds": [r.seed for r in runs],
        "split_sizes": dict(split_sizes),
        "config": config,
        "runs": [asdict(r) for r in runs],
    }
