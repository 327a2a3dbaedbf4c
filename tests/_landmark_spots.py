"""Images with a Gaussian spot per landmark, to check that a warp moves pixels and landmarks together
(shared by the tests of ``Augment`` and ``BatchAugment``; this module holds no tests)."""

from __future__ import annotations

import numpy as np
import torch


SPOT_CENTRE_TOLERANCE_PX = 0.12
"""How far :func:`spot_centre` of a warped spot may sit from its moved landmark: the estimator's own bias (a
9 x 9 window cuts the Gaussian's tails unevenly when the point is off the pixel grid; 0.012 px unwarped) plus
bilinear resampling under the augmentation's rotation, scale and shift. Measured worst over 2,440 spots
(20 BatchAugment batches of 32 faces, 300 Augment draws; flips, 15 deg, 10 % scale, 5 % shift): 0.056 px.
The bound is about 2x that; a landmark map off by a quarter pixel or more fails it."""


def landmark_spots(points: np.ndarray, size: int = 96) -> torch.Tensor:
    """A black image with a small Gaussian spot (sigma 1.5 px) at every point; spot k has
    amplitude 0.2 (k + 1), so each spot tells which landmark it was drawn for."""
    ys, xs = np.mgrid[0:size, 0:size]
    image = np.zeros((size, size))
    for number, (x, y) in enumerate(points):
        image += 0.2 * (number + 1) * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.5**2))
    return torch.from_numpy(np.repeat(image[None], 3, axis=0).clip(0, 1)).float()


def spot_centre(image: torch.Tensor, point: np.ndarray, radius: int = 4) -> tuple[np.ndarray, float]:
    """Intensity-weighted centre and total intensity of the spot near ``point``."""
    x0, y0 = (int(round(c)) for c in point)
    window = image[0, y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1].double().numpy()
    ys, xs = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
    return np.array([(window * xs).sum(), (window * ys).sum()]) / window.sum(), float(window.sum())
