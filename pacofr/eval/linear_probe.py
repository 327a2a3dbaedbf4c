"""Linear probe on frozen features: standardise, fit a linear classifier, report the final epoch.

The numbers reported are those of the **final** epoch on the test split, as mean and standard
deviation over seeds. The best epoch is chosen on the validation split only and reported as an
extra; the test split never selects anything.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


@dataclass
class ProbeConfig:
    """Optimisation of the linear classifier (AdamW, full data, mini-batches)."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    batch_size: int = 256
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass
class ProbeRun:
    """One seed's outcome; metrics are accuracies in [0, 1] (mean per attribute for multi-label)."""

    seed: int
    final_test: float
    final_val: float
    best_val: float
    best_val_epoch: int
    val_curve: list[float] = field(default_factory=list)


def standardise(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6) -> list[torch.Tensor]:
    """Standardise features (N, D) by the train split's per-dimension mean and std."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp_min(eps)
    return [(t - mean) / std for t in (train, *others)]


def accuracy(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> float:
    """Top-1 accuracy (single-label, labels int64 (N,)) or mean per-attribute accuracy
    (multi-label, labels float32 (N, C) multi-hot, threshold at logit 0)."""
    if labels.numel() == 0:
        return float("nan")
    if multi_label:
        return ((logits > 0).float() == labels).float().mean().item()
    return (logits.argmax(1) == labels).float().mean().item()


def _loss(logits: torch.Tensor, labels: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def fit_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int,
              multi_label: bool, cfg: ProbeConfig, seed: int) -> ProbeRun:
    """Train one linear classifier on ``features["train"]`` (float32 (N, D), already standardised)
    and evaluate it on val and test after every epoch."""
    if features["train"].shape[0] == 0:
        raise ValueError("the train split is empty: the probe needs labelled training images")
    gen = torch.Generator().manual_seed(seed)
    dim = features["train"].shape[1]
    head = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = features["train"], labels["train"]
    val_curve: list[float] = []
    for _ in range(cfg.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            _loss(head(x[idx]), y[idx], multi_label).backward()
            opt.step()
        with torch.no_grad():
            val_curve.append(accuracy(head(features["val"]), labels["val"], multi_label))
    with torch.no_grad():
        final_test = accuracy(head(features["test"]), labels["test"], multi_label)
    scored = [(v, i) for i, v in enumerate(val_curve) if v == v]  # drop NaN (empty val split)
    best_val, best_epoch = max(scored, key=lambda t: (t[0], -t[1])) if scored else (float("nan"), -1)
    return ProbeRun(seed=seed, final_test=final_test, final_val=val_curve[-1], best_val=best_val,
                    best_val_epoch=best_epoch + 1, val_curve=val_curve)


def run_probe(features: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_classes: int,
              multi_label: bool, cfg: ProbeConfig) -> dict:
    """Standardise, fit one probe per seed, and summarise: final-epoch test mean and std."""
    missing = [s for s in SPLITS if s not in features or s not in labels]
    if missing:
        raise ValueError(f"features and labels need the splits {SPLITS}; missing {missing}")
    std_feats = dict(zip(SPLITS, standardise(*(features[s].float() for s in SPLITS)), strict=True))
    runs = [fit_probe(std_feats, labels, num_classes, multi_label, cfg, seed) for seed in cfg.seeds]
    finals = [r.final_test for r in runs]
    return {
        "final_test_mean": statistics.fmean(finals),
        "final_test_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
        "final_val_mean": statistics.fmean(r.final_val for r in runs),
        "best_val_mean": statistics.fmean(r.best_val for r in runs),
        "split_sizes": {s: int(features[s].shape[0]) for s in SPLITS},
        "config": asdict(cfg),
        "runs": [asdict(r) for r in runs],
    }
