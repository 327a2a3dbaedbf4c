"""Frozen-feature protocols: linear probe, k-NN and a small MLP head, hyper-parameters picked on val.

Each protocol takes features per split (float32 (N, F), already transformed for the row, see
:meth:`pacofr.eval.extractors.Extractor.fit_transform`) and targets per split, fits its head on
*train* (standardised with train's statistics) and reports the final test score per seed
(:func:`pacofr.eval.metrics.summarise`):

* ``linear``: class and attribute targets, a linear layer trained with Adam for ``probe_epochs``
  epochs on the cross-entropy plus an L2 penalty; every (lr, L2) of the grid is trained with the
  first seed and scored on val, the best is trained with the other seeds too (the first seed's run
  is reused). Regression and
  landmark targets: closed-form ridge, the penalty picked on val; it has no randomness, so every
  seed gives the same number (std 0);
* ``knn``: cosine k-NN (``knn_k`` = 20) with similarity-weighted votes; nothing to pick and no
  randomness (std 0);
* ``mlp``: regression and landmark targets, a one-hidden-layer MLP trained with AdamW, its
  weight decay picked on val like the linear probe's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pacofr.eval.probe_heads import (
    Ridge,
    Standardiser,
    knn_predict,
    predict_in_chunks,
    regression_matrix,
    train_linear_classifier,
    train_mlp,
)
from pacofr.eval.labelled import Targets
from pacofr.eval.metrics import Metric, SeedRun, metric_of, score, summarise
from pacofr.eval.choices import PROTOCOLS


FROZEN_PROTOCOLS = PROTOCOLS[:3]  # linear, knn, mlp
CLASSIFICATION_KINDS = ("class", "multi")


@dataclass
class ProbeConfig:
    """Hyper-parameters and grids of the frozen-feature protocols (grids are searched on val)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    probe_epochs: int = 100
    probe_batch_size: int = 256
    probe_lrs: tuple[float, ...] = (1e-2,)
    probe_l2s: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    ridge_alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # times the number of rows
    knn_k: int = 20
    mlp_hidden: int = 256
    mlp_epochs: int = 100
    mlp_lr: float = 1e-3
    mlp_weight_decays: tuple[float, ...] = (1e-4, 1e-1)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds:
            raise ValueError("ProbeConfig.seeds must name at least one seed")
        for name in ("probe_epochs", "probe_batch_size", "knn_k", "mlp_hidden", "mlp_epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ProbeConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("probe_lrs", "probe_l2s", "ridge_alphas", "mlp_weight_decays"):
            values = tuple(float(v) for v in getattr(self, name))
            if not values or any(not v >= 0 for v in values) or (name == "probe_lrs" and min(values) <= 0):
                raise ValueError(f"ProbeConfig.{name} must be a non-empty grid of values >= 0 (lrs > 0), got {values}")
            setattr(self, name, values)
        if not self.mlp_lr > 0:
            raise ValueError(f"ProbeConfig.mlp_lr must be > 0, got {self.mlp_lr}")


def pick_on_val(grid: Sequence[Any], val_score: Callable[[Any], float], metric: Metric) -> tuple[Any, list[float]]:
    """The grid point with the best validation score (the earliest wins ties and all-NaN scores),
    and every point's score."""
    scores = [val_score(point) for point in grid]
    best = 0
    for i, value in enumerate(scores):
        if metric.better(value, scores[best]):
            best = i
    return grid[best], scores


def _standardised(features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    scale = Standardiser.fit(features["train"])
    return {split: scale(x) for split, x in features.items()}


def _selection(grid: Sequence[Any], scores: list[float], picked: Any, names: Sequence[str]) -> dict[str, Any]:
    return {"grid": [dict(zip(names, p if isinstance(p, tuple) else (p,), strict=True)) for p in grid],
            "val_scores": scores,
            "picked": dict(zip(names, picked if isinstance(picked, tuple) else (picked,), strict=True))}


def _classifier_probe(x: dict[str, torch.Tensor], y: dict[str, Targets], cfg: ProbeConfig) -> dict[str, Any]:
    metric = metric_of(y["train"])
    trained: dict[tuple[float, float, int], tuple[torch.nn.Module, list[float]]] = {}

    def train(lr: float, l2: float, seed: int) -> tuple[torch.nn.Module, list[float]]:
        if (lr, l2, seed) not in trained:
            trained[(lr, l2, seed)] = train_linear_classifier(
                x["train"], y["train"], epochs=cfg.probe_epochs, lr=lr, l2=l2,
                batch_size=cfg.probe_batch_size, seed=seed)
        return trained[(lr, l2, seed)]

    grid = [(lr, l2) for lr in cfg.probe_lrs for l2 in cfg.probe_l2s]
    first = cfg.seeds[0]
    picked, scores = pick_on_val(grid, lambda p: score(predict_in_chunks(train(*p, first)[0], x["val"]), y["val"]),
                                 metric)
    runs = []
    for seed in cfg.seeds:
        head, curve = train(*picked, seed)
        runs.append(SeedRun(seed, score(predict_in_chunks(head, x["test"]), y["test"]),
                            score(predict_in_chunks(head, x["val"]), y["val"]), curve))
    return summarise(runs, metric, {"head": f"linear, Adam + L2, {cfg.probe_epochs} epochs",
                                    "selection": _selection(grid, scores, picked, ("lr", "l2"))})


def _ridge_probe(x: dict[str, torch.Tensor], y: dict[str, Targets], cfg: ProbeConfig) -> dict[str, Any]:
    metric = metric_of(y["train"])
    ridge = Ridge(x["train"], regression_matrix(y["train"]))
    grid = list(cfg.ridge_alphas)
    picked, scores = pick_on_val(grid, lambda a: score(ridge.predict(a, x["val"]), y["val"]), metric)
    test, val = score(ridge.predict(picked, x["test"]), y["test"]), score(ridge.predict(picked, x["val"]), y["val"])
    runs = [SeedRun(seed, test, val) for seed in cfg.seeds]
    return summarise(runs, metric, {"head": "ridge (closed form: the same for every seed)",
                                    "selection": _selection(grid, scores, picked, ("alpha_per_row",))})


def _mlp_probe(x: dict[str, torch.Tensor], y: dict[str, Targets], cfg: ProbeConfig) -> dict[str, Any]:
    metric = metric_of(y["train"])
    target = regression_matrix(y["train"])
    trained: dict[tuple[float, int], tuple[torch.nn.Module, list[float]]] = {}

    def train(wd: float, seed: int) -> tuple[torch.nn.Module, list[float]]:
        if (wd, seed) not in trained:
            trained[(wd, seed)] = train_mlp(x["train"], target, hidden=cfg.mlp_hidden, epochs=cfg.mlp_epochs,
                                            lr=cfg.mlp_lr, weight_decay=wd, batch_size=cfg.probe_batch_size,
                                            seed=seed)
        return trained[(wd, seed)]

    grid = list(cfg.mlp_weight_decays)
    first = cfg.seeds[0]
    picked, scores = pick_on_val(grid, lambda wd: score(predict_in_chunks(train(wd, first)[0], x["val"]), y["val"]),
                                 metric)
    runs = []
    for seed in cfg.seeds:
        net, curve = train(picked, seed)
        runs.append(SeedRun(seed, score(predict_in_chunks(net, x["test"]), y["test"]),
                            score(predict_in_chunks(net, x["val"]), y["val"]), curve))
    return summarise(runs, metric, {"head": f"MLP ({cfg.mlp_hidden} hidden, GELU), AdamW lr {cfg.mlp_lr}, "
                                            f"{cfg.mlp_epochs} epochs",
                                    "selection": _selection(grid, scores, picked, ("weight_decay",))})


def _knn(x: dict[str, torch.Tensor], y: dict[str, Targets], cfg: ProbeConfig) -> dict[str, Any]:
    metric = metric_of(y["train"])
    test = score(knn_predict(x["train"], y["train"], x["test"], cfg.knn_k), y["test"])
    val = score(knn_predict(x["train"], y["train"], x["val"], cfg.knn_k), y["val"])
    runs = [SeedRun(seed, test, val) for seed in cfg.seeds]
    return summarise(runs, metric, {"head": f"cosine k-NN, k = {cfg.knn_k}, votes weighted by exp(sim / 0.07) "
                                            "(no randomness: the same for every seed)"})


def applies(protocol: str, kind: str) -> bool:
    """Whether frozen ``protocol`` runs on targets of ``kind`` (``mlp``: regression and landmarks)."""
    if protocol not in FROZEN_PROTOCOLS:
        raise ValueError(f"protocol must be one of {FROZEN_PROTOCOLS}, got {protocol!r}")
    return protocol != "mlp" or kind not in CLASSIFICATION_KINDS


def run_frozen(protocol: str, features: dict[str, torch.Tensor], targets: dict[str, Targets],
               cfg: ProbeConfig) -> dict[str, Any]:
    """One frozen-feature protocol on ``features`` / ``targets`` (split -> tensor / Targets)."""
    kind = targets["train"].kind
    if not applies(protocol, kind):
        raise ValueError(f"the {protocol} protocol does not apply to {kind} targets")
    for split in ("train", "val", "test"):
        if split not in features or split not in targets:
            raise ValueError(f"features and targets need the split {split!r}")
    if protocol == "knn":
        return _knn(features, targets, cfg)
    x = _standardised(features)
    if protocol == "mlp":
        return _mlp_probe(x, targets, cfg)
    return _classifier_probe(x, targets, cfg) if kind in CLASSIFICATION_KINDS else _ridge_probe(x, targets, cfg)


def config_dict(cfg: ProbeConfig) -> dict[str, Any]:
    """``cfg`` as JSON-friendly data."""
    return asdict(cfg)
