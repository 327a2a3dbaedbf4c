"""Face detector interface and registry.

A detector takes an RGB photo and returns every face it finds with five landmarks in the order
the alignment template uses (left eye, right eye, nose, left mouth corner, right mouth corner;
image-left first), plus dense landmarks when the model gives them. Detectors depend on optional
packages, imported only when one is built; a missing package raises ``MissingDependencyError``
naming the extra to install.

This module owns the shared types (``Detection``, ``FaceDetector``, ``MissingDependencyError``)
and the registry; a detector module imports them and registers itself (``pacofr.data.mtcnn``
does, and ``pacofr.data`` imports it), so the dependency runs one way only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np


class MissingDependencyError(ImportError):
    """An optional package needed for a feature is not installed."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """One face in a photo, in that photo's pixel coordinates (pixel centres at integers).

    Attributes:
        box: float64 (4,) x1, y1, x2, y2 (inclusive pixel extent).
        score: detector confidence in [0, 1].
        landmarks5: float64 (5, 2) (x, y) of left eye, right eye, nose, left and right mouth corner.
        landmarks_dense: float64 (K, 2) dense landmarks, or None when the detector has none.
    """

    box: np.ndarray
    score: float
    landmarks5: np.ndarray
    landmarks_dense: np.ndarray | None = None

    @property
    def size(self) -> float:
        """Shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]) + 1.0)

    @property
    def area(self) -> float:
        """Box area in pixels."""
        return float((self.box[2] - self.box[0] + 1.0) * (self.box[3] - self.box[1] + 1.0))


@runtime_checkable
class FaceDetector(Protocol):
    """What the pipeline needs from a detector."""

    name: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a uint8 (H, W, 3) RGB image, most confident first."""
        ...


_FACTORIES: dict[str, Callable[..., FaceDetector]] = {}


def register_detector(name: str) -> Callable[[Callable[..., FaceDetector]], Callable[..., FaceDetector]]:
    """Decorator adding a detector factory under ``name`` (used by ``create_detector``)."""

    def wrap(factory: Callable[..., FaceDetector]) -> Callable[..., FaceDetector]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def available_detectors() -> tuple[str, ...]:
    """Names accepted by ``create_detector`` (their packages may still be missing)."""
    return tuple(sorted(_FACTORIES))


def create_detector(name: str = "mtcnn", **kwargs: Any) -> FaceDetector:
    """Build the detector called ``name`` with its keyword options.

    Raises:
        ValueError: unknown name.
        MissingDependencyError: the detector's optional package is not installed.
    """
    if name not in _FACTORIES:
        raise ValueError(f"detector must be one of {available_detectors()}, got {name!r}")
    return _FACTORIES[name](**kwargs)


def select_faces(detections: list[Detection], policy: str, min_size: float) -> tuple[list[Detection], str]:
    """Apply the multi-face policy to one photo's detections.

    Args:
        detections: the detector's output.
        policy: "largest" (keep the biggest face), "all" (keep every face) or "skip" (keep none
            when more than one face is found).
        min_size: faces whose box is shorter than this (pixels) are dropped first.
    Returns:
        (kept faces, outcome) with outcome one of "ok", "no_face", "too_small", "multi_skipped".
    """
    if policy not in ("largest", "all", "skip"):
        raise ValueError(f"policy must be 'largest', 'all' or 'skip', got {policy!r}")
    if not detections:
        return [], "no_face"
    big = [d for d in detections if d.size >= min_size]
    if not big:
        return [], "too_small"
    if policy == "largest":
        return [max(big, key=lambda d: (d.area, d.score))], "ok"
    if policy == "skip" and len(big) > 1:
        return [], "multi_skipped"
    return sorted(big, key=lambda d: (-d.area, -d.score)), "ok"
