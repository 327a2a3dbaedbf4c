"""Mild augmentation of aligned faces that keeps image and landmarks consistent.

One random similarity (optional horizontal flip, small rotation, scale and shift about the image
centre) is applied to the pixels and to the landmarks; a flip also swaps the left/right
landmarks so the order stays (left eye, right eye, nose, left mouth, right mouth) in image terms.
Light colour jitter (brightness, contrast, saturation) follows.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from pacofr.data.alignment import BORDER_MODES, FLIP_PERMUTATION

#: Weights of the grey level (ITU-R 601 luma) the contrast and saturation jitter use.
GREY_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def warp_image_tensor(image: torch.Tensor, matrix: torch.Tensor, border: str = "constant") -> torch.Tensor:
    """Warp a (C, H, W) float image by a forward (2, 3) pixel map (output pixel p shows the input
    at inverse(matrix) @ p), bilinear, same size. Pixel centres are at integer coordinates."""
    channels, height, width = image.shape
    matrix = matrix.to(torch.float64)
    linear_inv = torch.linalg.inv(matrix[:, :2])
    offset_inv = -linear_inv @ matrix[:, 2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    src_x = linear_inv[0, 0] * xs + linear_inv[0, 1] * ys + offset_inv[0]
    src_y = linear_inv[1, 0] * xs + linear_inv[1, 1] * ys + offset_inv[1]
    grid = torch.stack([(2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1], dim=-1)
    warped = F.grid_sample(image.unsqueeze(0), grid.unsqueeze(0).to(image.dtype), mode="bilinear",
                           padding_mode=BORDER_MODES[border], align_corners=False)
    return warped[0]


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation settings (method.md: flip with left/right swap, small similarity jitter,
    light colour jitter).

    Attributes:
        flip_prob: probability of a horizontal flip.
        max_rotation_deg: rotation drawn uniformly in [-max, max] degrees.
        max_scale: scale drawn uniformly in [1 - max, 1 + max].
        max_shift: shift per axis drawn uniformly in [-max, max] times the image side.
        brightness: factor in [1 - b, 1 + b] on all channels.
        contrast: factor in [1 - c, 1 + c] about the mean grey level.
        saturation: factor in [1 - s, 1 + s] about each pixel's grey level.
        border: fill of pixels moved in from outside ("constant", "replicate", "reflect").
    """

    flip_prob: float = 0.5
    max_rotation_deg: float = 5.0
    max_scale: float = 0.05
    max_shift: float = 0.03
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    border: str = "constant"

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("max_rotation_deg", "max_shift", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_scale < 1.0:
            raise ValueError(f"max_scale must be in [0, 1), got {self.max_scale}")
        if self.border not in BORDER_MODES:
            raise ValueError(f"border must be one of {sorted(BORDER_MODES)}, got {self.border!r}")

    def sample_matrix(self, size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, bool]:
        """A random forward (2, 3) float64 pixel map for a size x size image, and whether it flips."""
        flip = float(torch.rand((), generator=generator)) < self.flip_prob
        angle = math.radians(_uniform(-self.max_rotation_deg, self.max_rotation_deg, generator))
        scale = _uniform(1.0 - self.max_scale, 1.0 + self.max_scale, generator)
        shift = [_uniform(-self.max_shift, self.max_shift, generator) * size for _ in range(2)]
        centre = (size - 1) / 2.0
        cos, sin = scale * math.cos(angle), scale * math.sin(angle)
        mirror = -1.0 if flip else 1.0
        # x' = R S (F (x - c)) + c + shift, with F = diag(mirror, 1)
        linear = torch.tensor([[cos * mirror, -sin], [sin * mirror, cos]], dtype=torch.float64)
        centre_vec = torch.tensor([centre, centre], dtype=torch.float64)
        offset = centre_vec + torch.tensor(shift, dtype=torch.float64) - linear @ centre_vec
        return torch.cat([linear, offset[:, None]], dim=1), flip

    def __call__(self, image: torch.Tensor, landmarks: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment one face.

        Args:
            image: float (3, S, S) in [0, 1].
            landmarks: float (5, 2) pixel coordinates in ``image``.
            generator: random source (default: torch's global one).
        Returns:
            (image float (3, S, S) in [0, 1], landmarks float (5, 2)), same dtypes as given.
        """
        if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
            raise ValueError(f"image must be (3, S, S), got {tuple(image.shape)}")
        if tuple(landmarks.shape) != (5, 2):
            raise ValueError(f"landmarks must be (5, 2), got {tuple(landmarks.shape)}")
        matrix, flip = self.sample_matrix(image.shape[-1], generator)
        image = warp_image_tensor(image, matrix, self.border)
        moved = landmarks.to(torch.float64) @ matrix[:, :2].T + matrix[:, 2]
        if flip:
            moved = moved[list(FLIP_PERMUTATION)]
        return self.jitter_colour(image, generator), moved.to(landmarks.dtype)

    def jitter_colour(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Brightness, contrast and saturation jitter of a (3, H, W) image in [0, 1]."""
        weights = torch.tensor(GREY_WEIGHTS, dtype=image.dtype).view(3, 1, 1)
        image = image * _uniform(1 - self.brightness, 1 + self.brightness, generator)
        grey_mean = (image * weights).sum(0).mean()
        image = (image - grey_mean) * _uniform(1 - self.contrast, 1 + self.contrast, generator) + grey_mean
        grey = (image * weights).sum(0, keepdim=True)
        image = (image - grey) * _uniform(1 - self.saturation, 1 + self.saturation, generator) + grey
        return image.clamp(0.0, 1.0)
