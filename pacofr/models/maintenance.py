"""The models' work between optimiser steps, as objects the trainer owns and calls.

- :class:`CodebookMaintenance` (PaCo-FR): from the :class:`CodebookWork` each training forward
  returns (``ModelOutput.step_work``), after the optimiser step: the usage EMA or EMA codes, the
  prototype EMA, the first step's data initialisation and distinct dead-code restarts
  (:meth:`PatchCodebook.maintain`), the post-incubation step count (``bp_after="decay"``), and the
  EMA teacher;
- :class:`TeacherUpdate` (every other model): the EMA teacher (and momentum heads) only.

Both satisfy :class:`pacofr.train.contract.StepMaintenance`. A skipped step calls ``discard``, so
its batches never reach the codebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pacofr.models.patch_codebook import MaintenanceInput, PatchCodebook


@dataclass
class CodebookWork:
    """Detached codebook statistics of one training forward (PaCo-FR with a codebook).

    ``labelled``: usage counted from the nearest-prototype labels k* (incubation) rather than the
    soft candidates; ``q`` (N, dc) / ``indices`` (N, m) int64 / ``weights`` (N, m) or None: the
    usage (and with ``ema_codes`` the EMA-code update); ``proto``: the nearest-prototype (counts
    (K,), sums (K, P)) of the prototype table, or None; ``seeds``: (q, x) candidate patches for new
    codes; ``incubation``: the forward's phase.
    """

    labelled: bool
    q: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor | None
    ema_codes: bool
    proto: tuple[torch.Tensor, torch.Tensor] | None
    seeds: tuple[torch.Tensor, torch.Tensor]
    incubation: bool


def maintenance_input(group: list[CodebookWork]) -> MaintenanceInput:
    """Concatenate recorded forwards of one kind; rows with non-finite beliefs or pixels are dropped
    (they must not reach the codebook). No early return on empty tensors: every rank must reach
    the same collectives."""
    q = torch.cat([w.q for w in group])
    indices = torch.cat([w.indices for w in group])
    weights = None if group[0].weights is None else torch.cat([w.weights for w in group])
    finite = torch.isfinite(q).all(dim=1)
    q, indices = q[finite], indices[finite]
    weights = None if weights is None else weights[finite]
    seeds_q = torch.cat([w.seeds[0] for w in group])
    seeds_x = torch.cat([w.seeds[1] for w in group])
    usable = torch.isfinite(seeds_q).all(dim=1) & torch.isfinite(seeds_x).all(dim=1)
    proto = None
    if group[0].proto is not None:
        proto = (sum(w.proto[0] for w in group), sum(w.proto[1] for w in group))
    ema = all(w.ema_codes for w in group)
    return MaintenanceInput(usage_indices=indices, usage_weights=weights,
                            q_labelled=q if ema else None, labels=indices[:, 0] if ema else None,
                            proto_counts=proto[0] if proto else None, proto_sums=proto[1] if proto else None,
                            candidates_q=seeds_q[usable], candidates_x=seeds_x[usable])


class TeacherUpdate:
    """Between steps, only the EMA step ``update_teacher(momentum)`` of a model's teacher copies."""

    def __init__(self, update_teacher: Callable[[float], None]) -> None:
        self.update_teacher = update_teacher

    def record(self, output: Any) -> None:
        """Nothing is needed from a forward."""

    def discard(self) -> None:
        """Nothing is kept between a forward and :meth:`apply`."""

    @torch.no_grad()
    def apply(self, teacher_momentum: float | None = None) -> dict[str, float]:
        """With ``teacher_momentum``, the EMA step of the teacher copies. Returns {}."""
        if teacher_momentum is not None:
            self.update_teacher(teacher_momentum)
        return {}


class CodebookMaintenance(TeacherUpdate):
    """PaCo-FR's codebook upkeep between steps, then its teacher's EMA step.

    ``codebook``: the model's :class:`PatchCodebook`; ``post_incubation_steps``: the model's 0-d
    int64 buffer of optimiser steps after incubation (advanced in place); ``update_teacher``: the
    model's EMA step (a no-op without a teacher).
    """

    def __init__(self, codebook: PatchCodebook, post_incubation_steps: torch.Tensor,
                 update_teacher: Callable[[float], None]) -> None:
        super().__init__(update_teacher)
        self.codebook = codebook
        self.post_incubation_steps = post_incubation_steps
        self.recorded: list[CodebookWork] = []
        self.last_incubation: bool | None = None

    def record(self, output: Any) -> None:
        """Keep ``output.step_work`` (a :class:`CodebookWork`, or None for a forward without one)."""
        work: CodebookWork | None = output.step_work
        if work is not None:
            self.recorded.append(work)
            self.last_incubation = work.incubation

    def discard(self) -> None:
        """Forget the forwards since the last :meth:`apply` (a skipped step)."""
        self.recorded = []

    @torch.no_grad()
    def apply(self, teacher_momentum: float | None = None) -> dict[str, float]:
        """The codebook maintenance of the recorded forwards, the post-incubation step count and, with
        ``teacher_momentum``, the teacher's EMA step. Returns ``restarted_codes`` and the usage
        measured before the restarts (``low_usage_fraction``, ``dead_fraction``); {} when nothing
        was recorded."""
        report: dict[str, float] = {}
        recorded, self.recorded = self.recorded, []
        for labelled in (True, False):  # a step normally holds one kind (the phase is fixed per epoch)
            group = [w for w in recorded if w.labelled == labelled]
            if group:
                report = self.codebook.maintain(maintenance_input(group))
        if self.last_incubation is False:
            self.post_incubation_steps += 1
        super().apply(teacher_momentum)
        return report
