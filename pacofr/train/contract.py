"""The contract between the trainer and a pre-training model, as :class:`typing.Protocol` classes.

Every method's model (:func:`pacofr.models.build_model`) satisfies :class:`PretrainingModel`; the
trainer relies on nothing else. Per optimiser step the trainer runs, for each micro-batch,
``output = model(images, region_ids, incubation=..., generator=...)``, backpropagates
``output.loss`` and hands ``output`` to ``maintenance.record``; after the optimiser step it calls
``maintenance.apply(teacher_momentum)`` (or ``maintenance.discard()`` when it skips the step), where
``maintenance = model.step_maintenance()`` was made once at the start.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingOutput(Protocol):
    """What a training forward returns. ``loss``: 0-d fp32 tensor with grad; ``losses`` and
    ``stats``: detached 0-d tensors by name (logged as ``loss/<name>`` and ``stat/<name>``)."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]


@runtime_checkable
class StepMaintenance(Protocol):
    """The model's work between optimiser steps (codebook upkeep, EMA teachers), owned by the trainer."""

    def record(self, output: TrainingOutput) -> None:
        """Keep what the maintenance needs from one training forward's ``output``."""

    def discard(self) -> None:
        """Forget what was recorded since the last :meth:`apply` (the step is skipped)."""

    def apply(self, teacher_momentum: float | None = None) -> dict[str, float]:
        """Run once after every optimiser step: update the model in place from what was recorded,
        and with ``teacher_momentum`` move its EMA copies. Returns numbers logged as stats."""


@runtime_checkable
class PretrainingModel(Protocol):
    """A pre-training model as the trainer uses it (an ``nn.Module``)."""

    def __call__(self, images: torch.Tensor, region_ids: torch.Tensor, *, incubation: bool,
                 generator: torch.Generator | None = None) -> TrainingOutput:
        """Losses of one batch: ``images`` (B, 3, S, S) float in [0, 1], ``region_ids`` (B, L) int64
        (the region of every patch); ``incubation``: the incubation phase; ``generator``: the masks'."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups (frozen parameters left out)."""

    def reconstruct(self, images: torch.Tensor, region_ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Panels for the reconstruction pictures: name -> (B, 3, S, S) float in [0, 1]."""

    def step_maintenance(self) -> StepMaintenance:
        """A new :class:`StepMaintenance` for this model (the trainer makes one per run)."""
