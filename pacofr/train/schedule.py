"""Per-step schedules: learning rate (linear warm-up, then cosine) and EMA-teacher momentum."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def scaled_lr(base_lr: float, effective_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule: ``base_lr * effective_batch / reference_batch``."""
    if effective_batch <= 0:
        raise ValueError(f"effective_batch must be positive, got {effective_batch}")
    return base_lr * effective_batch / reference_batch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Value at optimiser step ``step`` (0-based) of a linear warm-up then a half-cosine decay.

    Warm-up: ``peak * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first step
    already moves). Then ``final + (peak - final) * (1 + cos(pi * t)) / 2`` with ``t`` going
    from 0 at the end of warm-up to 1 at ``total_steps``; steps past the end give ``final``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps == 0:
        return final
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (EMA momentum 0.996 -> 1)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    t = min(1.0, max(0.0, step / total_steps))
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class LRSchedule:
    """Sets each AdamW group's learning rate for an optimiser step.

    A group may carry ``lr_scale`` (e.g. layer-wise decay); its lr is ``lr_scale * schedule``.
    The schedule is a pure function of the step, so its checkpointed state is only the step.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps >= self.total_steps > 0:
            logger.warning("the warm-up (%d optimiser steps) covers the whole run of %d steps: the learning rate "
                           "rises to its peak and never decays; lower train.warmup_epochs below train.epochs "
                           "(or raise train.epochs / train.total_steps)", self.warmup_steps, self.total_steps)

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        return warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Write the lr of step ``step`` into every group of ``optimizer``; return it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, float | int]:
        return {"peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_lr": self.min_lr}
