"""Images to tensors and encoder tokens to features, one batch at a time.

Memory is bounded by the batch: :func:`image_batches` decodes ``batch_size`` images of an
:class:`~pacofr.data.image_sets.ImageSet`, :func:`to_input` resizes them to the encoder's input,
and :func:`encoder_features` pools the tokens a timm ViT gives for them:

* ``cls``: the class token, (B, D);
* ``mean``: the mean of the patch tokens, (B, D);
* ``cls+mean``: both concatenated, (B, 2D);
* ``tokens``: the patch tokens on their grid, average-pooled to at most
  :data:`TOKEN_GRID` x :data:`TOKEN_GRID` cells and flattened, (B, cells * D) (spatial tasks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pacofr.data.image_sets import ImageSet
from pacofr.eval.choices import POOLS
from pacofr.models.vit import normalise_pixels


TOKEN_GRID = 8


def image_batches(images: ImageSet, indices: Sequence[int], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Decoded images ``indices`` of ``images`` (uint8 (H, W, 3) each), ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(indices), batch_size):
        yield [images.read(int(i)) for i in indices[start:start + batch_size]]


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) resized to (size, size, 3), bilinear (as the pre-training loader resizes);
    the aspect ratio of a non-square image is not kept."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_input(batch: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """float32 (B, 3, size, size) in [0, 1] from uint8 (H, W, 3) images of any sizes."""
    if not batch:
        return torch.empty(0, 3, size, size)
    stacked = np.stack([resize_rgb(image, size) for image in batch])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255.0)


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pool: str) -> torch.Tensor:
    """Pool encoder tokens (B, prefix + L, D) to features (see module doc for ``pool``)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool in ("cls", "cls+mean") and num_prefix_tokens == 0:
        raise ValueError(f"pool={pool!r} needs a class token, but this encoder has none; use pool='mean'")
    patches = tokens[:, num_prefix_tokens:]
    if pool == "tokens":
        side = round(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1]:
            raise ValueError(f"pool='tokens' needs a square patch grid, got {patches.shape[1]} patches")
        grid = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)
        if side > TOKEN_GRID:
            grid = F.adaptive_avg_pool2d(grid, TOKEN_GRID)
        return grid.flatten(1)
    cls = tokens[:, 0]
    mean = patches.mean(1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=1)}[pool]


def pooled_features(encoder: torch.nn.Module, inputs: torch.Tensor, pool: str) -> torch.Tensor:
    """``encoder.forward_features`` of normalised ``inputs`` (B, 3, S, S), pooled (differentiable)."""
    tokens = encoder.forward_features(inputs)
    return pool_tokens(tokens, int(getattr(encoder, "num_prefix_tokens", 1)), pool)


@torch.no_grad()
def encoder_features(encoder: torch.nn.Module, inputs: torch.Tensor, *, mean: Sequence[float],
                     std: Sequence[float], pools: Sequence[str]) -> dict[str, torch.Tensor]:
    """float32 features (CPU) of images (B, 3, S, S) in [0, 1] for every pool of ``pools``,
    from one forward pass on the encoder's device (the caller sets eval mode)."""
    device = next(encoder.parameters()).device
    tokens = encoder.forward_features(normalise_pixels(inputs.to(device), mean, std))
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    return {pool: pool_tokens(tokens, prefix, pool).float().cpu() for pool in pools}
