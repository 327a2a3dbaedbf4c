"""What a model's training forward returns (every method's model: :class:`ModelOutput`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pacofr.models.maintenance import CodebookWork


@dataclass
class ModelOutput:
    """Result of a model's ``forward`` (satisfies :class:`pacofr.train.contract.TrainingOutput`).

    Attributes:
        loss: 0-d fp32 tensor with grad, the weighted sum of the active losses.
        losses: detached 0-d tensors of the active losses, unweighted (which are present depends on
            the method and phase: each model's ``loss_names()``).
        stats: detached 0-d tensors (each model's ``stat_names()``), e.g. PaCo-FR's codebook
            ``perplexity`` and ``usage_entropy_norm`` of this batch, ``bp_accuracy`` (with L_bp),
            ``bp_weight``, ``proto_mse`` (patches against their nearest prototype), the soft tokens'
            ``cand_entropy`` / ``cand_top1_weight`` / ``cand_dup_fraction`` and
            ``bp_top1_agreement`` (BP's top-1 code is the nearest prototype's), SC parts.
        step_work: the detached codebook statistics a PaCo-FR training forward (``training`` and
            grad enabled) leaves for the maintenance after the optimiser step; None otherwise.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    step_work: CodebookWork | None = None
