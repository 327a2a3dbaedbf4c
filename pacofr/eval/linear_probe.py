"""Linear probe on frozen features: standardise, fit a linear classifier, report the final epoch.

Features are standardised with the train split's per-dimension mean and std (the same shift and
scale is applied to val and test). The numbers reported follow :mod:`pacofr.eval.metrics`:
final-epoch test accuracy, mean and std over seeds; the best validation epoch is an extra.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from pacofr.eval.metrics import (
    SPLITS,
    SeedRun,
    accuracy,
    best_of,
    loss_value,
    summarise,
    task_loss,
)


@dataclass
class ProbeConfig:
    """Optimisation of the linear classifier (AdamW on mini-batches of standardised features)."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"ProbeConfig needs lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if not self.seeds:
            raise ValueError("ProbeConfig.seeds must name at least one seed")


def standardise(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Standardise features (N, D) by the train split's per-dimension mean and std."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp_min(eps)
    return [(t - mean) / std for t in (train, *others)]


def fit_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int,
              multi_label: bool, cfg: ProbeConfig, seed: int) -> SeedRun:
    """Train one linear classifier on ``features["train"]`` (float32 (N, D), already standardised)
    and evaluate it on val after every epoch and on test after the last one."""
    if features["train"].shape[0] == 0:
        raise ValueError("the train split is empty: the probe needs labelled training images")
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(features["train"].shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = features["train"], labels["train"]
    val_curve: list[float] = []
    loss_curve: list[float] = []
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = task_loss(head(x[idx]), y[idx], multi_label)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
        loss_curve.append(total / x.shape[0])
        with torch.no_grad():
            val_curve.append(accuracy(head(features["val"]), labels["val"], multi_label))
    with torch.no_grad():
        logits = head(features["test"])
    best_val, best_epoch = best_of(val_curve)
    return SeedRun(seed=seed, final_test=accuracy(logits, labels["test"], multi_label),
                   final_test_loss=loss_value(logits, labels["test"], multi_label), final_val=val_curve[-1],
                   best_val=best_val, best_val_epoch=best_epoch, val_curve=val_curve, train_loss_curve=loss_curve)


def run_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int,
              multi_label: bool, cfg: ProbeConfig) -> dict[str, Any]:
    """Standardise, fit one probe per seed, and summarise (:func:`pacofr.eval.metrics.summarise`).

    ``features``: split name -> float (N, D); ``labels``: split name -> int64 (N,) or float32
    (N, C) multi-hot.
    """
    missing = [s for s in SPLITS if s not in features or s not in labels]
    if missing:
        raise ValueError(f"features and labels need the splits {SPLITS}; missing {missing}")
    std_feats = dict(zip(SPLITS, standardise(*(features[s].float() for s in SPLITS)), strict=True))
    runs = [fit_probe(std_feats, labels, num_classes, multi_label, cfg, seed) for seed in cfg.seeds]
    return summarise(runs, {s: int(features[s].shape[0]) for s in SPLITS}, asdict(cfg))
