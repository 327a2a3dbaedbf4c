"""Short full fine-tuning: the whole encoder plus a linear head, AdamW with a cosine schedule.

Every seed starts again from the given encoder weights (a deep copy), draws its own head
initialisation, batch order and flips, trains on the train split, is evaluated on val after every
epoch and on test after the **final** epoch only (:mod:`pacofr.eval.metrics`).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pacofr.eval.features import pooled_features
from pacofr.eval.metrics import (
    SPLITS,
    SeedRun,
    accuracy,
    best_of,
    loss_value,
    summarise,
    task_loss,
)
from pacofr.models.vit import normalise_pixels
from pacofr.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)

_NO_DECAY = ("pos_embed", "cls_token")


@dataclass
class FinetuneConfig:
    """Optimisation of a fine-tune: ``lr`` for the encoder, ``head_lr`` for the new linear head."""

    epochs: int = 10
    lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup_epochs: float = 1.0
    flip: bool = True  # random horizontal flips of training images
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "head_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FinetuneConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("FinetuneConfig.weight_decay and warmup_epochs must be >= 0")
        if not self.seeds:
            raise ValueError("FinetuneConfig.seeds must name at least one seed")


class _Classifier(nn.Module):
    """Encoder -> pooled features -> linear head."""

    def __init__(self, encoder: nn.Module, pool: str, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.encoder, inputs, self.pool))


def _param_groups(model: _Classifier, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Encoder / head groups; no weight decay on biases, norms, positions and the class token."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        is_head = name.startswith("head.")
        decay = param.ndim >= 2 and not any(key in name for key in _NO_DECAY)
        groups.setdefault((is_head, decay), []).append(param)
    return [{"params": params, "lr": cfg.head_lr if is_head else cfg.lr,
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (is_head, decay), params in groups.items()]


@torch.no_grad()
def _predict(model: _Classifier, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
             batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    outs = [model(normalise_pixels(images[i:i + batch_size].to(device), mean, std)).float().cpu()
            for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, model.head.out_features)


def finetune_once(encoder: nn.Module, images: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                  num_classes: int, multi_label: bool, *, mean: Sequence[float], std: Sequence[float],
                  pool: str, cfg: FinetuneConfig, seed: int, device: torch.device | str = "cpu") -> SeedRun:
    """Fine-tune a copy of ``encoder`` (left untouched) for one seed.

    ``images``: split -> float32 (N, 3, S, S) in [0, 1] at the encoder's input size; ``labels``:
    split -> int64 (N,) or float32 (N, C) multi-hot.
    """
    device = torch.device(device)
    x, y = images["train"], labels["train"]
    if x.shape[0] == 0:
        raise ValueError("the train split is empty: fine-tuning needs labelled training images")
    gen = torch.Generator().manual_seed(seed)
    backbone = copy.deepcopy(encoder).requires_grad_(True)
    with torch.no_grad():
        probe = x[:1].to(next(backbone.parameters()).device)
        dim = pooled_features(backbone.eval(), normalise_pixels(probe, mean, std), pool).shape[1]
    model = _Classifier(backbone, pool, num_classes, dim)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.01, generator=gen)
        model.head.bias.zero_()
    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    base_lrs = [group["lr"] for group in opt.param_groups]
    steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    step = 0
    val_curve: list[float] = []
    loss_curve: list[float] = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        seen = 0.0
        for start in range(0, x.shape[0], cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = x[idx]
            if cfg.flip:
                flip = torch.rand(idx.numel(), generator=gen) < 0.5
                batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * warmup_cosine(step, total, warmup, 1.0)
            opt.zero_grad(set_to_none=True)
            loss = task_loss(model(normalise_pixels(batch.to(device), mean, std)), y[idx].to(device), multi_label)
            loss.backward()
            opt.step()
            step += 1
            seen += loss.item() * idx.numel()
        loss_curve.append(seen / x.shape[0])
        val_curve.append(accuracy(_predict(model, images["val"], mean, std, cfg.batch_size, device),
                                  labels["val"], multi_label))
        logger.debug("fine-tune seed %d epoch %d: loss %.4f val %.4f", seed, epoch + 1, loss_curve[-1], val_curve[-1])
    logits = _predict(model, images["test"], mean, std, cfg.batch_size, device)
    best_val, best_epoch = best_of(val_curve)
    return SeedRun(seed=seed, final_test=accuracy(logits, labels["test"], multi_label),
                   final_test_loss=loss_value(logits, labels["test"], multi_label), final_val=val_curve[-1],
                   best_val=best_val, best_val_epoch=best_epoch, val_curve=val_curve, train_loss_curve=loss_curve)


def run_finetune(encoder: nn.Module, images: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                 num_classes: int, multi_label: bool, *, mean: Sequence[float], std: Sequence[float],
                 pool: str, cfg: FinetuneConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """One :func:`finetune_once` per seed of ``cfg``, summarised like the linear probe."""
    missing = [s for s in SPLITS if s not in images or s not in labels]
    if missing:
        raise ValueError(f"images and labels need the splits {SPLITS}; missing {missing}")
    runs = [finetune_once(encoder, images, labels, num_classes, multi_label, mean=mean, std=std, pool=pool,
                          cfg=cfg, seed=seed, device=device) for seed in cfg.seeds]
    return summarise(runs, {s: int(images[s].shape[0]) for s in SPLITS}, asdict(cfg))
