"""What a training checkpoint holds and how a run saves and resumes one (the trainer's checkpoint I/O).

The on-disk format (atomic folders, checksums, pruning) is :mod:`pacofr.checkpoint`'s. A training
checkpoint saves the weights and, in ``state.pt``: the counters (:class:`TrainState`), optimiser,
schedule, gradient scaler, every random generator per rank (the global ones, the mask
generator and the batch augmentation's), the loss means of the steps not yet logged per rank, and the batch layout. Resuming
restores all of it, so the continued run is the uninterrupted one, down to its scalars.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pacofr import checkpoint as ckpt
from pacofr.data.batch_augment import BatchAugment
from pacofr.train.distributed import DistInfo, barrier, gather_objects
from pacofr.train.metrics import TensorMeans
from pacofr.train.schedule import LRSchedule
from pacofr.train.seeding import (AUGMENT_STREAM, MASK_STREAM, capture_global_rng, derive_seed, restore_global_rng,
                                  seed_everything)
from pacofr.version import __version__

logger = logging.getLogger(__name__)

#: the batch layout a checkpoint taken inside an epoch can only be resumed with
GEOMETRY_KEYS = ("batch_size", "accum_steps", "world_size", "samples_per_rank")


@dataclass
class TrainState:
    """Counters saved with every checkpoint. ``step``: optimiser steps done (skipped ones included);
    ``batch_in_epoch``: micro-batches of epoch ``epoch`` this rank has consumed;
    ``skipped_images``: unreadable images the dataset replaced by another one (all ranks)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_nonfinite: int = 0
    skipped_images: int = 0


@dataclass
class Resumable:
    """The parts of a run that a checkpoint saves and a resume restores in place.

    ``geometry``: the batch layout (:data:`GEOMETRY_KEYS`); ``seed``: ``train.seed``, which re-seeds
    the random streams when a run resumes with another number of processes; ``device``: where the
    loss means live; ``augment``: the batch augmentation on the device (None: none).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    mask_generator: torch.Generator
    means: TensorMeans
    geometry: Mapping[str, int]
    seed: int
    device: torch.device
    augment: BatchAugment | None = None


class TrainingCheckpoints:
    """Saves ``parts`` into ``directory`` and resumes them, on rank ``dist.rank`` (rank 0 writes).

    ``meta``: what ``meta.json`` records besides step, epoch and versions (the config, the
    face-alignment recipe); ``keep_last``: checkpoints kept (0: all).
    """

    def __init__(self, directory: str | Path, parts: Resumable, dist: DistInfo, meta: Mapping[str, Any],
                 keep_last: int = 0) -> None:
        self.directory = Path(directory)
        self.parts = parts
        self.dist = dist
        self.meta = dict(meta)
        self.keep_last = keep_last

    def _training_state(self, state: TrainState) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs (collective: call on every rank)."""
        parts = self.parts
        rng = capture_global_rng()
        rng["mask_generator"] = parts.mask_generator.get_state()
        if parts.augment is not None:
            rng["augment"] = parts.augment.state_dict()
        return {
            "step": state.step, "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "skipped_nonfinite": state.skipped_nonfinite,
            "skipped_images": state.skipped_images,
            "optimizer": parts.optimizer.state_dict(),
            "schedule": parts.schedule.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else {},
            "rng": gather_objects(rng, self.dist),
            "means": gather_objects(parts.means.state_dict(), self.dist),  # steps not yet logged, per rank
            **parts.geometry,
        }

    def _meta(self, state: TrainState) -> dict[str, Any]:
        return {
            "step": state.step, "epoch": state.epoch,
            **self.meta,
            "pacofr_version": __version__,
            "torch_version": torch.__version__,
            "world_size": self.dist.world_size,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, state: TrainState) -> Path | None:
        """Write a checkpoint of the current state; its folder on rank 0, None elsewhere (collective)."""
        training_state = self._training_state(state)
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.directory, self.parts.model, training_state, self._meta(state),
                                        keep_last=self.keep_last)
        barrier(self.dist)
        return path

    def resume(self, path: str | Path) -> tuple[TrainState, Path]:
        """Restore the parts from checkpoint ``path``; returns its counters and folder.

        ``path``: a checkpoint (which must be intact), or a checkpoints or run folder (its newest
        intact checkpoint; corrupted newer ones are skipped with a warning). Raises ``ValueError``
        when the checkpoint stopped inside an epoch and the batch layout changed since.
        """
        parts = self.parts
        loaded = ckpt.load_checkpoint(path, map_location="cpu", fallback=True)
        st = loaded.state
        changed = {k: (st[k], v) for k, v in parts.geometry.items() if st[k] != v}
        if changed and int(st["batch_in_epoch"]) > 0:
            raise ValueError(f"checkpoint {loaded.path} stopped inside an epoch; resuming there needs the same "
                             f"batch layout and data set, but these changed (checkpoint, now): {changed}. Resume "
                             "from a checkpoint taken at the end of an epoch to change them.")
        schedule = parts.schedule.state_dict()
        if st["schedule"] != schedule:
            logger.warning("the learning-rate schedule differs from the checkpoint's (checkpoint %s, now %s): "
                           "the resumed run follows the new one", st["schedule"], schedule)
        ckpt.load_weights(parts.model, loaded)
        parts.optimizer.load_state_dict(st["optimizer"])
        if parts.scaler is not None and st["scaler"]:
            parts.scaler.load_state_dict(st["scaler"])
        state = TrainState(step=int(st["step"]), epoch=int(st["epoch"]), batch_in_epoch=int(st["batch_in_epoch"]),
                           skipped_nonfinite=int(st["skipped_nonfinite"]), skipped_images=int(st["skipped_images"]))
        rank = self.dist.rank
        if int(st["world_size"]) == self.dist.world_size:
            rng = st["rng"][rank]
            restore_global_rng(rng)
            parts.mask_generator.set_state(rng["mask_generator"])
            if parts.augment is not None and "augment" in rng:
                parts.augment.load_state_dict(rng["augment"])
            elif parts.augment is not None:
                logger.warning("the checkpoint holds no batch-augmentation state (written before augmentation "
                               "moved to the device): its random stream starts from its seed")
            if "means" in st:
                parts.means.load_state_dict(st["means"][rank], parts.device)
        else:
            logger.warning("checkpoint was written by %d processes, resuming with %d: random streams are "
                           "re-seeded, so the run is not bit-identical to an uninterrupted one",
                           st["world_size"], self.dist.world_size)
            seed_everything(derive_seed(parts.seed, state.step), rank)
            parts.mask_generator.manual_seed(derive_seed(parts.seed, MASK_STREAM, rank, state.step))
            if parts.augment is not None:
                parts.augment.manual_seed(derive_seed(parts.seed, AUGMENT_STREAM, rank, state.step))
        return state, loaded.path
