"""Per-patch facial-region ids of a batch, as ``ModelConfig.regions`` asks (landmarks or template)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from pacofr.data import regions
from pacofr.models.config import ModelConfig

logger = logging.getLogger(__name__)


class RegionAssigner:
    """Computes the (B, L) int64 region ids the model's masking needs for a data batch.

    ``regions="landmarks"`` (default): per image from ``batch["landmarks"]`` (B, 5, 2) pixel
    coordinates in the (augmented) image, so the map follows each face's pose and the
    augmentation; a face whose landmarks are non-finite or degenerate, and every face of a batch
    without landmarks, gets the template map (counted in :attr:`fallbacks`, logged once).
    ``"template"``: the fixed template map of the aligned-face grid for every image.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        self.mode = cfg.regions
        self.grid = cfg.grid_size
        self.image_size = cfg.img_size
        self._template = regions.template_region_ids(self.grid, self.image_size)
        self.fallbacks = 0  # faces given the template map in "landmarks" mode
        self._warned = False

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Region ids (B, L) int64 on the CPU for ``batch`` (``image`` (B, 3, S, S), ``landmarks`` (B, 5, 2))."""
        batch_size = batch["image"].shape[0]
        landmarks = batch.get("landmarks") if self.mode == "landmarks" else None
        if landmarks is None:
            if self.mode == "landmarks":
                self._note_fallback(batch_size, "the batch has no landmarks")
            return self._template.unsqueeze(0).expand(batch_size, -1).contiguous()
        ids, fallback = regions.region_ids_or_template(landmarks.cpu(), self.grid, self.image_size)
        count = int(fallback.sum())
        if count:
            self._note_fallback(count, "their landmarks are non-finite or span no face frame")
        return ids

    def _note_fallback(self, count: int, why: str) -> None:
        self.fallbacks += count
        if not self._warned:
            logger.warning("regions=landmarks: %d face(s) get the template region map because %s "
                           "(further fallbacks are counted in RegionAssigner.fallbacks)", count, why)
            self._warned = True
