"""A short full fine-tune: the whole encoder plus a linear head, AdamW with warm-up and cosine decay.

Every run starts again from the given encoder weights (a deep copy), draws its own head
initialisation, batch order and flips, trains ``steps`` optimiser steps on the train split
(images decoded and resized one batch at a time), and is scored on val and test after the
**final** step. The encoder learning rate is picked on val from ``lrs`` with the first seed; the
other seeds train with the pick (the first seed's run is reused). Class and attribute targets
use (binary) cross-entropy; regression and landmark targets MSE on train-standardised values.
Horizontal flips are used for global targets only (a flip would mirror landmarks).
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

from pacofr.eval.encoders import LoadedEncoder
from pacofr.eval.features import image_batches, pooled_features, to_input
from pacofr.eval.probe_heads import Standardiser, regression_matrix
from pacofr.eval.labelled import LabelledSet, Targets
from pacofr.eval.metrics import SeedRun, classification_loss, metric_of, score, summarise
from pacofr.eval.probe_protocols import CLASSIFICATION_KINDS, pick_on_val
from pacofr.models.vit import normalise_pixels
from pacofr.train.schedule import warmup_cosine

logger = logging.getLogger(__name__)

_NO_DECAY = ("pos_embed", "cls_token")


@dataclass
class FinetuneConfig:
    """A fine-tune: ``steps`` optimiser steps of ``batch_size`` images (``epochs``, when set,
    replaces ``steps`` by that many passes over train); encoder lr from ``lrs`` (picked on val),
    head lr = ``head_lr_scale`` x encoder lr."""

    steps: int = 100
    epochs: int | None = None
    lrs: tuple[float, ...] = (2e-4, 1e-3)
    head_lr_scale: float = 10.0
    weight_decay: float = 0.05
    batch_size: int = 32
    warmup_fraction: float = 0.1
    flip: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.lrs = tuple(float(v) for v in self.lrs)
        if self.steps < 1 or self.batch_size < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"FinetuneConfig needs steps, batch_size and epochs >= 1, got {self.steps}, "
                             f"{self.batch_size}, {self.epochs}")
        if not self.lrs or min(self.lrs) <= 0 or self.head_lr_scale <= 0:
            raise ValueError(f"FinetuneConfig needs lrs > 0 and head_lr_scale > 0, got {self.lrs}, {self.head_lr_scale}")
        if self.weight_decay < 0 or not 0 <= self.warmup_fraction <= 1:
            raise ValueError("FinetuneConfig needs weight_decay >= 0 and warmup_fraction in [0, 1]")
        if not self.seeds:
            raise ValueError("FinetuneConfig.seeds must name at least one seed")

    def total_steps(self, train_images: int) -> int:
        """Optimiser steps of a run on ``train_images`` images."""
        if self.epochs is None:
            return self.steps
        return self.epochs * math.ceil(train_images / self.batch_size)


class TunedModel(nn.Module):
    """Encoder -> pooled features -> linear head."""

    def __init__(self, encoder: nn.Module, pool: str, width: int, feature_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.head = nn.Linear(feature_dim, width)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.encoder, inputs, self.pool))


def param_groups(model: TunedModel, lr: float, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Encoder / head groups; no weight decay on biases, norms, positions and the class token."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        is_head = name.startswith("head.")
        decay = param.ndim >= 2 and not any(key in name for key in _NO_DECAY)
        groups.setdefault((is_head, decay), []).append(param)
    return [{"params": params, "lr": lr * cfg.head_lr_scale if is_head else lr,
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (is_head, decay), params in groups.items()]


class _Loss:
    """Training loss and output scaling of a target kind."""

    def __init__(self, train: Targets) -> None:
        self.kind = train.kind
        self.scale = None if train.kind in CLASSIFICATION_KINDS else Standardiser.fit(regression_matrix(train))

    def __call__(self, outputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        if self.scale is None:
            return classification_loss(outputs, targets.values.to(outputs.device), self.kind)
        wanted = self.scale(regression_matrix(targets)).to(outputs.device)
        return nn.functional.mse_loss(outputs, wanted)

    def unscale(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs if self.scale is None else outputs * self.scale.std + self.scale.mean


@torch.no_grad()
def predict(model: TunedModel, data: LabelledSet, indices: Sequence[int], encoder: LoadedEncoder,
            batch_size: int, device: torch.device) -> torch.Tensor:
    """Head outputs (CPU, float32) for the images ``indices`` of ``data``, streamed."""
    model.eval()
    outs = [model(normalise_pixels(to_input(batch, encoder.img_size).to(device), encoder.mean, encoder.std)).float().cpu()
            for batch in image_batches(data.images, indices, batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, model.head.out_features)


def finetune_once(encoder: LoadedEncoder, data: LabelledSet, *, pool: str, lr: float, cfg: FinetuneConfig,
                  seed: int, device: torch.device | str = "cpu") -> SeedRun:
    """Fine-tune a copy of ``encoder`` (left untouched) for one seed; the final val and test scores."""
    device = torch.device(device)
    train_rows = data.indices("train")
    if not train_rows:
        raise ValueError("the train split is empty: fine-tuning needs labelled training images")
    targets = data.targets
    loss_fn = _Loss(targets.select(train_rows))
    flip = cfg.flip and targets.kind != "landmarks"
    gen = torch.Generator().manual_seed(seed)
    backbone = copy.deepcopy(encoder.model).requires_grad_(True).to(device)
    with torch.no_grad():
        probe = to_input([data.images.read(train_rows[0])], encoder.img_size).to(device)
        dim = pooled_features(backbone.eval(), normalise_pixels(probe, encoder.mean, encoder.std), pool).shape[1]
    model = TunedModel(backbone, pool, targets.width, dim)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.01, generator=gen)
        model.head.bias.zero_()
    model.to(device)
    opt = torch.optim.AdamW(param_groups(model, lr, cfg))
    base_lrs = [group["lr"] for group in opt.param_groups]
    total = cfg.total_steps(len(train_rows))
    warmup = min(total, round(cfg.warmup_fraction * total))
    losses: list[float] = []
    order: list[int] = []
    model.train()
    for step in range(total):
        if len(order) < cfg.batch_size:
            order += [train_rows[i] for i in torch.randperm(len(train_rows), generator=gen).tolist()]
        rows, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = to_input([data.images.read(r) for r in rows], encoder.img_size)
        if flip:
            flips = torch.rand(len(rows), generator=gen) < 0.5
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * warmup_cosine(step, total, warmup, 1.0)
        opt.zero_grad(set_to_none=True)
        outputs = model(normalise_pixels(batch.to(device), encoder.mean, encoder.std))
        loss = loss_fn(outputs, targets.select(rows))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            logger.debug("fine-tune seed %d step %d/%d: loss %.4f", seed, step + 1, total, losses[-1])
    val_rows, test_rows = data.indices("val"), data.indices("test")
    val = score(loss_fn.unscale(predict(model, data, val_rows, encoder, cfg.batch_size * 2, device)),
                targets.select(val_rows))
    test = score(loss_fn.unscale(predict(model, data, test_rows, encoder, cfg.batch_size * 2, device)),
                 targets.select(test_rows))
    return SeedRun(seed=seed, test=test, val=val, train_loss_curve=losses)


def run_finetune(encoder: LoadedEncoder, data: LabelledSet, *, pool: str, cfg: FinetuneConfig,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """Pick the lr on val with the first seed, then fine-tune every seed with it; summarised."""
    metric = metric_of(data.targets)
    runs: dict[tuple[float, int], SeedRun] = {}

    def run(lr: float, seed: int) -> SeedRun:
        if (lr, seed) not in runs:
            runs[(lr, seed)] = finetune_once(encoder, data, pool=pool, lr=lr, cfg=cfg, seed=seed, device=device)
            logger.info("fine-tune lr %.3g seed %d: val %.4g test %.4g", lr, seed, runs[(lr, seed)].val,
                        runs[(lr, seed)].test)
        return runs[(lr, seed)]

    grid = list(cfg.lrs)
    picked, scores = pick_on_val(grid, lambda lr: run(lr, cfg.seeds[0]).val, metric)
    result = [run(picked, seed) for seed in cfg.seeds]
    steps = cfg.total_steps(len(data.indices("train")))
    return summarise(result, metric, {
        "head": f"full fine-tune + linear head on {pool} features, {steps} steps of {cfg.batch_size}",
        "selection": {"grid": [{"lr": lr} for lr in grid], "val_scores": scores, "picked": {"lr": picked}},
        "config": asdict(cfg)})
