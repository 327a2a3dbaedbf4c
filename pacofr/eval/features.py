"""Images and frozen features of a timm ViT encoder: the class token and/or the mean of the patch tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pacofr.models.vit import normalise_pixels

logger = logging.getLogger(__name__)

POOLS = ("cls", "mean", "cls+mean")


def load_image(path: Path, size: int) -> torch.Tensor:
    """An image file as float32 (3, size, size) RGB in [0, 1] (grey is replicated; bilinear resize,
    as the pre-training data loader does)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read evaluation image {path}: {err}") from err
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """float32 (N, 3, size, size) in [0, 1] for ``paths`` (see :func:`load_image`)."""
    if not paths:
        return torch.empty(0, 3, size, size)
    return torch.stack([load_image(p, size) for p in paths])


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """Pool encoder tokens (B, prefix + L, D) to features (B, D) or (B, 2D) for ``cls+mean``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool != "mean" and num_prefix_tokens == 0:
        raise ValueError(f"pool={pool!r} needs a class token, but this encoder has none; use pool='mean'")
    cls = tokens[:, 0]
    mean = tokens[:, num_prefix_tokens:].mean(1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pool]


def pooled_features(encoder: torch.nn.Module, inputs: torch.Tensor, pool: str) -> torch.Tensor:
    """``encoder.forward_features`` of normalised ``inputs`` (B, 3, S, S), pooled (differentiable)."""
    tokens = encoder.forward_features(inputs)
    return pool_tokens(tokens, int(getattr(encoder, "num_prefix_tokens", 1)), pool)


@torch.no_grad()
def encode_images(encoder: torch.nn.Module, images: torch.Tensor, *, mean: Sequence[float],
                  std: Sequence[float], pool: str = "cls", batch_size: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 (N, D) features (CPU) of images (N, 3, S, S) in [0, 1], S = the encoder's input size.

    The encoder runs in eval mode on ``device`` and is given back in its own mode and device.
    """
    home = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval().to(device)
    chunks = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = normalise_pixels(images[start:start + batch_size].to(device), mean, std)
            chunks.append(pooled_features(encoder, batch, pool).float().cpu())
    finally:
        encoder.train(was_training).to(home)
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, paths: Sequence[Path], *, image_size: int,
                     mean: Sequence[float], std: Sequence[float], pool: str = "cls",
                     batch_size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 (N, D) features of the images at ``paths`` through ``encoder.forward_features``
    (a timm VisionTransformer); images resized to ``image_size``, normalised by ``mean``/``std``."""
    chunks = []
    for start in range(0, len(paths), batch_size):
        images = load_images(paths[start:start + batch_size], image_size)
        chunks.append(encode_images(encoder, images, mean=mean, std=std, pool=pool,
                                    batch_size=batch_size, device=device))
        logger.debug("features %d/%d", min(start + batch_size, len(paths)), len(paths))
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)
