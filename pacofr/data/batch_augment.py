"""The augmentation of :class:`pacofr.data.augment.Augment`, for a whole batch on the training device.

Per image the same random similarity (flip, rotation, scale, shift about the centre), the same
landmark map (with the left/right swap of a flip) and the same colour jitter as ``Augment``, drawn
from the same uniform distributions and in the same order: with a generator in the same state,
image ``i`` of a batch gets the parameters the ``i``-th of ``B`` successive ``Augment`` calls would
get. The batch is warped by one ``grid_sample`` call (on the CPU one per cache-sized chunk), its
grid built as ``affine_grid`` builds it but about 10x cheaper on the CPU; the three colour steps,
being linear in the pixels before the final clamp, collapse into one scale of the pixels, one of
their grey level and one offset per image.

The random numbers come from a CPU ``torch.Generator`` owned by :class:`BatchAugment` (8 numbers
per image), so CPU and CUDA training draw the same parameters, and ``state_dict()`` /
``load_state_dict()`` let a checkpoint keep the stream (an exact ``--resume``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from pacofr.data.alignment import BORDER_MODES, FLIP_PERMUTATION
from pacofr.data.augment import GREY_WEIGHTS, Augment

#: Random numbers drawn per image, in ``Augment``'s order: flip, angle, scale, shift x, shift y,
#: brightness, contrast, saturation.
DRAWS_PER_IMAGE = 8


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) pixels as float32 in [0, 1] (a float input is returned as float32)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


class BatchAugment:
    """Random similarity, landmark map and colour jitter of ``Augment`` for a batch.

    Args:
        settings: the distributions (an ``Augment``; its defaults when None).
        seed: seed of the CPU generator the parameters are drawn from.
        cpu_chunk_bytes: on the CPU the batch is warped in chunks of about this many bytes of
            float pixels (at least one image), so that the pixels, their grid and the output
            stay in the cache: at 224 px a whole batch of 64 at once costs about twice as much per
            image as one image at a time, at 64 px chunks of 8 to 16 images are the cheapest
            (``benchmarks/bench_data.py``). A CUDA batch is warped in one call.
    """

    def __init__(self, settings: Augment | None = None, seed: int = 0, cpu_chunk_bytes: int = 1 << 20) -> None:
        if cpu_chunk_bytes < 1:
            raise ValueError(f"cpu_chunk_bytes must be >= 1, got {cpu_chunk_bytes}")
        self.settings = settings if settings is not None else Augment()
        self.generator = torch.Generator().manual_seed(int(seed))
        self.cpu_chunk_bytes = cpu_chunk_bytes

    def manual_seed(self, seed: int) -> None:
        """Restart the random stream from ``seed``."""
        self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (a uint8 tensor): what a checkpoint keeps."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the random stream saved by :meth:`state_dict`."""
        if not isinstance(state, dict) or not isinstance(state.get("generator"), torch.Tensor):
            raise ValueError("the augmentation state must be a dict with a 'generator' tensor (from state_dict())")
        self.generator.set_state(state["generator"])

    def draw(self, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Parameters of ``count`` images of side ``size``, drawn from the generator (on the CPU).

        Returns:
            matrices: float64 (count, 2, 3) forward pixel maps (output pixel p shows the input at
                ``inverse(M) p``), as ``Augment.sample_matrix``.
            flips: bool (count,).
            colour: float64 (count, 3) brightness, contrast and saturation factors.
        """
        s = self.settings
        u = torch.rand((count, DRAWS_PER_IMAGE), generator=self.generator).to(torch.float64)

        def uniform(column: int, low: float, high: float) -> torch.Tensor:  # Augment's low + (high - low) u
            return low + (high - low) * u[:, column]

        flips = u[:, 0] < s.flip_prob
        angle = uniform(1, -s.max_rotation_deg, s.max_rotation_deg) * (math.pi / 180.0)
        scale = uniform(2, 1.0 - s.max_scale, 1.0 + s.max_scale)
        shift = torch.stack([uniform(3, -s.max_shift, s.max_shift), uniform(4, -s.max_shift, s.max_shift)], 1) * size
        mirror = 1.0 - 2.0 * flips.to(torch.float64)
        cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
        linear = torch.stack([torch.stack([cos * mirror, -sin], 1), torch.stack([sin * mirror, cos], 1)], 1)
        centre = torch.full((count, 2), (size - 1) / 2.0, dtype=torch.float64)
        offset = centre + shift - (linear @ centre[:, :, None])[:, :, 0]
        matrices = torch.cat([linear, offset[:, :, None]], dim=2)
        colour = torch.stack([uniform(5, 1 - s.brightness, 1 + s.brightness),
                              uniform(6, 1 - s.contrast, 1 + s.contrast),
                              uniform(7, 1 - s.saturation, 1 + s.saturation)], dim=1)
        return matrices, flips, colour

    def __call__(self, images: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch where it lies (CPU or GPU).

        Args:
            images: uint8 (B, 3, S, S) pixels, or float (B, 3, S, S) in [0, 1].
            landmarks: float (B, 5, 2) pixel coordinates in ``images``, on any device (the CPU
                keeps the step free of a device sync when the region ids are computed there).
        Returns:
            (float32 (B, 3, S, S) in [0, 1] on ``images``' device, float32 (B, 5, 2) landmarks
            in the augmented images on ``landmarks``' device).
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be (B, 3, S, S), got {tuple(images.shape)}")
        count, size = images.shape[0], images.shape[-1]
        if tuple(landmarks.shape) != (count, 5, 2):
            raise ValueError(f"landmarks must be ({count}, 5, 2), got {tuple(landmarks.shape)}")
        matrices, flips, colour = self.draw(count, size)
        device = images.device
        rows, columns = _grid_terms(_normalised_inverse(matrices, size).to(device, torch.float32), size)
        gains = _colour_gains(colour.to(device, torch.float32), 255.0 if images.dtype == torch.uint8 else 1.0)
        weights = torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=device)
        padding = BORDER_MODES[self.settings.border]
        out = torch.empty((count, 3, size, size), dtype=torch.float32, device=device)
        chunk = count if device.type == "cuda" else max(1, self.cpu_chunk_bytes // (3 * size * size * 4))
        for start in range(0, count, chunk):  # per chunk: a few ops on the per-image terms computed above
            part = slice(start, start + chunk)
            grid = torch.addcmul(rows[part], columns[0][part], columns[1])  # (n, 2, S, S): planar x and y
            warped = F.grid_sample(images[part].to(torch.float32), grid.permute(0, 2, 3, 1), mode="bilinear",
                                   padding_mode=padding, align_corners=False)
            _jitter(warped, gains[part], weights, out[part])
        return out, _move_landmarks(landmarks, matrices.to(landmarks.device), flips.to(landmarks.device))


def _normalised_inverse(matrices: torch.Tensor, size: int) -> torch.Tensor:
    """The (B, 2, 3) map from output to input in ``grid_sample``'s normalised coordinates for
    forward pixel maps ``matrices`` of a size x size image (u = (2x + 1) / size - 1)."""
    linear_inv = torch.linalg.inv(matrices[:, :, :2])
    offset_inv = -(linear_inv @ matrices[:, :, 2:])[:, :, 0]
    half = torch.full((matrices.shape[0], 2, 1), (size - 1) / 2.0, dtype=matrices.dtype)
    offset = (2.0 / size) * ((linear_inv @ half)[:, :, 0] + offset_inv) + (1.0 / size - 1.0)
    return torch.cat([linear_inv, offset[:, :, None]], dim=2)


def _grid_terms(theta: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``F.affine_grid(theta, (B, C, size, size), align_corners=False)``, planar and in two parts:
    for the pixel centres c_k = (2k + 1) / size - 1, the grid's x (axis 0) and y (axis 1) at row i,
    column j are ``rows[b, axis, i] + columns[0][b, axis] * columns[1][j]`` with
    ``rows = theta[:, :, 2] + theta[:, :, 1] c_i``, affine_grid's arithmetic (about 10x cheaper on
    the CPU, one broadcast multiply-add per chunk).

    Returns:
        rows: (B, 2, size, 1); columns: ((B, 2, 1, 1) theta[:, :, 0], (size,) c), all of theta's dtype.
    """
    centres = (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2.0 + 1.0) / size - 1.0
    rows = torch.addcmul(theta[:, :, 2, None, None], theta[:, :, 1, None, None], centres[:, None])
    return rows, (theta[:, :, 0, None, None], centres)


def _colour_gains(colour: torch.Tensor, top: float) -> torch.Tensor:
    """(B, 3, 1, 1, 1) gains of :func:`_jitter` from brightness b, contrast c and saturation s
    (``colour``, (B, 3)) of pixels in [0, top]: ``s c b / top`` of the pixels, ``(1 - s) c b / top``
    of their grey level and ``(1 - c) b / top`` of its image mean."""
    brightness, contrast, saturation = colour.unbind(1)
    gains = [saturation * contrast * brightness, (1.0 - saturation) * contrast * brightness,
             (1.0 - contrast) * brightness]
    return (torch.stack(gains, 1) / top)[:, :, None, None, None]


def _jitter(warped: torch.Tensor, gains: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """Augment's brightness b, contrast c and saturation s of (n, 3, S, S) pixels x in [0, top],
    written to ``out`` in [0, 1]. With g the grey level (``weights`` (3,) of the channels) and m its
    image mean, b x, then (. - m') c + m', then (. - g') s + g' is ``s c b x + (1 - s) c b g + (1 -
    c) b m``, linear before the clamp: the grey level, one multiply-add into ``out`` and the clamp
    (``gains`` (n, 3, 1, 1, 1) from :func:`_colour_gains`, the 1 / top folded in)."""
    count, _, height, width = warped.shape
    pixel_gain, grey_gain, mean_gain = gains.unbind(1)
    grey = (weights @ warped.view(count, 3, height * width)).view(count, 1, height, width)
    torch.addcmul(mean_gain * grey.mean(dim=(2, 3), keepdim=True), grey, grey_gain, out=grey)
    torch.addcmul(grey, warped, pixel_gain, out=out)
    out.clamp_(0.0, 1.0)


def _move_landmarks(landmarks: torch.Tensor, matrices: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """(B, 5, 2) landmarks through the (B, 2, 3) maps (float64), reordered where flipped; float32."""
    moved = landmarks.to(torch.float64) @ matrices[:, :, :2].transpose(1, 2) + matrices[:, None, :, 2]
    swapped = moved[:, list(FLIP_PERMUTATION)]
    return torch.where(flips.view(-1, 1, 1), swapped, moved).to(torch.float32)
