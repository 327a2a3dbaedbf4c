"""RegionAssigner: per-face landmark region maps by default, the template where a face has no usable landmarks."""

from __future__ import annotations

import logging

import pytest
import torch

from pacofr.data.alignment import template_for_size
from pacofr.data.augment import Augment
from pacofr.data.regions import landmark_region_ids, template_region_ids
from pacofr.models.config import ModelConfig
from pacofr.train.regions import RegionAssigner


def _batch(landmarks: torch.Tensor | None, size: int = 224) -> dict[str, torch.Tensor]:
    count = 1 if landmarks is None else landmarks.shape[0]
    batch = {"image": torch.zeros(count, 3, size, size)}
    if landmarks is not None:
        batch["landmarks"] = landmarks.float()
    return batch


def test_default_maps_follow_each_face_and_its_augmentation(generator: torch.Generator) -> None:
    assign = RegionAssigner(ModelConfig())
    template = torch.from_numpy(template_for_size(224))
    augment = Augment(flip_prob=0.0, max_rotation_deg=15.0, max_scale=0.1, max_shift=0.05)
    moved = torch.stack([augment(torch.zeros(3, 224, 224), template.float(), generator)[1] for _ in range(6)])
    ids = assign(_batch(moved))
    assert ids.shape == (6, 196) and ids.dtype == torch.int64
    for b in range(6):
        assert torch.equal(ids[b], landmark_region_ids(moved[b], 14, 224))
    assert any(not torch.equal(ids[b], template_region_ids(14, 224)) for b in range(6))
    assert assign.fallbacks == 0


def test_unusable_landmarks_and_missing_landmarks_get_the_template(caplog: pytest.LogCaptureFixture) -> None:
    cfg = ModelConfig.preset("demo")
    assign = RegionAssigner(cfg)
    template = torch.from_numpy(template_for_size(64))
    turned = template.clone()
    turned[:, 0] = 32 + (turned[:, 0] - 32) * 0.6 + 5
    broken = template.clone()
    broken[0, 1] = float("inf")
    with caplog.at_level(logging.WARNING):
        ids = assign(_batch(torch.stack([turned, broken]), 64))
    assert torch.equal(ids[0], landmark_region_ids(turned, 8, 64))
    assert torch.equal(ids[1], template_region_ids(8, 64))
    assert assign.fallbacks == 1 and "template region map" in caplog.text
    no_landmarks = assign(_batch(None, 64))
    assert torch.equal(no_landmarks, template_region_ids(8, 64).unsqueeze(0)) and assign.fallbacks == 2


def test_template_mode_ignores_landmarks() -> None:
    assign = RegionAssigner(ModelConfig(regions="template"))
    turned = torch.from_numpy(template_for_size(224)) + torch.tensor([30.0, 0.0])
    assert torch.equal(assign(_batch(turned.unsqueeze(0))), template_region_ids(14, 224).unsqueeze(0))
