"""Shared pieces of the MCF-style and FRA-style tests: tiny configs, real demo faces, gradient checks."""

from __future__ import annotations

import functools

import torch

from pacofr.data.regions import template_region_ids
from pacofr.models import ModelConfig

#: narrow heads so the tiny peers train in seconds on a shared CPU
SMALL_HEADS = dict(peer_hidden_dim=64, peer_proj_dim=32, fra_region_dim=16)


def tiny_peer(method: str, **overrides: object) -> ModelConfig:
    """The ``tiny`` preset (32 px, 16 patches) with narrow heads, the torch backend and ``overrides``."""
    return ModelConfig.preset("tiny", method=method, **{"backend": "torch", **SMALL_HEADS, **overrides})


@functools.lru_cache(maxsize=4)
def _demo_images(size: int, count: int) -> torch.Tensor:
    from pacofr.data import demo_dataset

    dataset = demo_dataset(image_size=size)
    return torch.stack([dataset[i]["image"] for i in range(count)])


def demo_batch(cfg: ModelConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` real demo faces at ``cfg.img_size`` (B, 3, S, S) in [0, 1] and template region ids."""
    images = _demo_images(cfg.img_size, batch).clone()
    region_ids = template_region_ids(cfg.grid_size, cfg.img_size).expand(batch, -1).contiguous()
    return images, region_ids


def params_without_gradient(model: torch.nn.Module) -> list[str]:
    """Trainable parameters whose gradient is missing, non-finite or exactly zero everywhere."""
    return [name for name, p in model.named_parameters() if p.requires_grad
            and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]

