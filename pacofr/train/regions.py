"""Per-patch facial-region ids of a batch, as ``ModelConfig.regions`` asks (template or landmarks)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pacofr.models.config import ModelConfig


class RegionAssigner:
    """Computes the (B, L) int64 region ids the model's masking needs for a data batch.

    ``regions="template"``: the fixed template assignment of the aligned-face grid (the same for
    every image); ``"landmarks"``: per image from ``batch["landmarks"]`` (B, 5, 2) pixel coords.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        from pacofr.data import regions

        self._regions = regions
        self.mode = cfg.regions
        self.grid = cfg.grid_size
        self.image_size = cfg.img_size
        self._template = regions.template_region_ids(self.grid, self.image_size) if self.mode == "template" else None

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Region ids (B, L) int64 on the CPU for ``batch`` (``image`` (B, 3, S, S), ``landmarks`` (B, 5, 2))."""
        batch_size = batch["image"].shape[0]
        if self._template is not None:
            return self._template.unsqueeze(0).expand(batch_size, -1).contiguous()
        return self._regions.landmark_region_ids(batch["landmarks"], self.grid, self.image_size)
