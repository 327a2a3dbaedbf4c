"""Frozen features of a timm ViT encoder: the class token and/or the mean of the patch tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

POOLS = ("cls", "mean", "cls+mean")


def load_image(path: Path, size: int) -> torch.Tensor:
    """An image file as float32 (3, size, size) RGB in [0, 1] (bilinear resize)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read evaluation image {path}: {err}") from err
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """Pool encoder tokens (B, prefix + L, D) to features (B, D) or (B, 2D) for ``cls+mean``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool != "mean" and num_prefix_tokens == 0:
        raise ValueError(f"pool={pool!r} needs a class token, but this encoder has none; use pool='mean'")
    cls = tokens[:, 0]
    mean = tokens[:, num_prefix_tokens:].mean(1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pool]


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, paths: Sequence[Path], *, image_size: int,
                     mean: Sequence[float], std: Sequence[float], pool: str = "cls",
                     batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Features float32 (N, D) of images at ``paths`` through ``encoder.forward_features``
    (a timm VisionTransformer), inputs normalised by ``mean``/``std``."""
    encoder = encoder.eval().to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([load_image(p, image_size) for p in paths[start:start + batch_size]]).to(device)
        tokens = encoder.forward_features((batch - mean_t) / std_t)
        chunks.append(pool_tokens(tokens.float(), prefix, pool).cpu())
        logger.debug("features %d/%d", min(start + batch_size, len(paths)), len(paths))
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)
