"""Five-point similarity alignment to the canonical 224x224 face template.

Coordinates follow OpenCV's convention: pixel (i, j) has its centre at x = j, y = i, so a point
(x, y) lies inside pixel (round(y), round(x)). Landmarks are always ordered
``(left eye, right eye, nose tip, left mouth corner, right mouth corner)`` where *left* means
image-left (the smaller x on a frontal face), as MTCNN and ArcFace order them.

The template is ArcFace's 112x112 template scaled by 1.4 about the centre of the 112 crop and
re-centred in a 224 crop, so that hair, ears and chin stay visible (method.md, "Data and
alignment").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: ArcFace's reference points for a 112x112 crop (InsightFace), image-left eye first.
ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
#: How much larger the face context is than ArcFace's crop.
TEMPLATE_SCALE = 1.4
#: The canonical template for 224x224 crops, float32 (5, 2): eyes near (87, 106) and (137, 106),
#: nose (112, 134), mouth corners (92, 163) and (133, 163).
TEMPLATE_224 = ((ARCFACE_TEMPLATE_112 - 56.0) * TEMPLATE_SCALE + 112.0).astype(np.float32)
TEMPLATE_224.setflags(write=False)

#: Landmark order swapped by a horizontal flip (left eye <-> right eye, left <-> right mouth corner).
FLIP_PERMUTATION = (1, 0, 2, 4, 3)

BORDER_MODES = {"constant": "zeros", "replicate": "border", "reflect": "reflection"}


def resize_points(points: np.ndarray, from_size: float, to_size: float) -> np.ndarray:
    """Map pixel coordinates of a ``from_size`` image to the same points in the image resized to
    ``to_size`` (pixel centres at integers, as PIL and torch resize with align_corners=False)."""
    factor = to_size / from_size
    return (np.asarray(points, dtype=np.float64) + 0.5) * factor - 0.5


def template_for_size(size: int, template: np.ndarray | None = None) -> np.ndarray:
    """The 224 template (or ``template``, given for 224) placed in a ``size`` x ``size`` crop;
    float32 (5, 2)."""
    base = TEMPLATE_224 if template is None else np.asarray(template, dtype=np.float64)
    return resize_points(base, 224, size).astype(np.float32)


def _check_points(name: str, points: Any, count: int | None = None) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 2:
        raise ValueError(f"{name} must be an (N, 2) array of points with N >= 2, got shape {array.shape}")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{name} must hold {count} points, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking the
    points ``src`` onto ``dst`` (Umeyama 1991).

    Args:
        src: (N, 2) source points, N >= 2, not all equal.
        dst: (N, 2) destination points.
    Returns:
        float64 (2, 3) matrix M with dst ~= M[:, :2] @ src + M[:, 2].
    """
    src = _check_points("src", src)
    dst = _check_points("dst", dst, count=src.shape[0])
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError("src points must not all coincide (their spread is zero)")
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_var
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (..., 2) points; float64."""
    points = np.asarray(points, dtype=np.float64)
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine matrix."""
    matrix = np.asarray(matrix, dtype=np.float64)
    linear_inv = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear_inv, -linear_inv @ matrix[:, 2:]], axis=1)


def _compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine map x -> outer(inner(x)) as a (2, 3) matrix."""
    linear = outer[:, :2] @ inner[:, :2]
    return np.concatenate([linear, (outer[:, :2] @ inner[:, 2] + outer[:, 2])[:, None]], axis=1)


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int, border: str = "constant") -> np.ndarray:
    """Resample ``image`` so that output pixel p shows the input at ``inverse(matrix) @ p``.

    Bilinear sampling; when the warp shrinks the face by more than 2x, the source region is first
    box-filtered (PIL ``reduce``) so the result is not aliased. Only the part of the image the
    output needs is converted, so huge photos stay cheap.

    Args:
        image: uint8 (H, W, C) array.
        matrix: (2, 3) map from input to output pixel coordinates.
        size: output side in pixels.
        border: "constant" (black), "replicate" or "reflect" for output pixels outside the input.
    Returns:
        uint8 (size, size, C) array.
    """
    if border not in BORDER_MODES:
        raise ValueError(f"border must be one of {sorted(BORDER_MODES)}, got {border!r}")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be a uint8 (H, W, C) array, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    to_source = invert_affine(matrix)
    corners = np.array([[-1, -1], [size, -1], [-1, size], [size, size]], dtype=np.float64)
    source_corners = transform_points(to_source, corners)
    x0 = int(np.clip(np.floor(source_corners[:, 0].min()) - 2, 0, width - 1))
    y0 = int(np.clip(np.floor(source_corners[:, 1].min()) - 2, 0, height - 1))
    x1 = int(np.clip(np.ceil(source_corners[:, 0].max()) + 3, x0 + 1, width))
    y1 = int(np.clip(np.ceil(source_corners[:, 1].max()) + 3, y0 + 1, height))
    crop = image[y0:y1, x0:x1]
    # crop pixel (x, y) is image pixel (x + x0, y + y0)
    to_source = _compose(np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0]]), to_source)

    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:, :2]))))
    factor = int(1.0 / scale) if scale > 0 else 1
    if factor >= 2 and min(crop.shape[:2]) >= 2 * factor:
        crop = np.asarray(Image.fromarray(crop.squeeze(-1) if crop.shape[2] == 1 else crop).reduce(factor))
        crop = crop.reshape(crop.shape[0], crop.shape[1], -1)
        # reduced pixel (x, y) averages crop pixels [x f, (x + 1) f): centre x f + (f - 1) / 2
        shrink = np.array([[1.0 / factor, 0.0, -(factor - 1) / (2 * factor)],
                           [0.0, 1.0 / factor, -(factor - 1) / (2 * factor)]])
        to_source = _compose(shrink, to_source)

    crop_h, crop_w = crop.shape[:2]
    grid_axis = torch.arange(size, dtype=torch.float64)
    ys, xs = torch.meshgrid(grid_axis, grid_axis, indexing="ij")
    linear = torch.from_numpy(to_source[:, :2])
    src_x = linear[0, 0] * xs + linear[0, 1] * ys + float(to_source[0, 2])
    src_y = linear[1, 0] * xs + linear[1, 1] * ys + float(to_source[1, 2])
    grid = torch.stack([(2 * src_x + 1) / crop_w - 1, (2 * src_y + 1) / crop_h - 1], dim=-1)
    source = torch.from_numpy(np.array(crop, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    warped = F.grid_sample(source, grid.unsqueeze(0).float(), mode="bilinear",
                           padding_mode=BORDER_MODES[border], align_corners=False)
    return warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 224, *,
               template: np.ndarray | None = None, border: str = "constant") -> tuple[np.ndarray, np.ndarray]:
    """Warp a face onto the canonical template with the least-squares similarity of its landmarks.

    Args:
        image: uint8 (H, W, 3) RGB image.
        landmarks: (5, 2) landmarks in image pixels (left eye, right eye, nose, left mouth,
            right mouth; image-left first).
        size: side of the square output.
        template: (5, 2) template for a 224 crop (default ``TEMPLATE_224``), rescaled to ``size``.
        border: fill outside the photo: "constant" (black), "replicate" or "reflect".
    Returns:
        (aligned uint8 (size, size, 3), float64 (2, 3) matrix mapping image to aligned pixels).
        The landmarks in the aligned image are ``transform_points(matrix, landmarks)``.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be a uint8 (H, W, 3) RGB array, got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    landmarks = _check_points("landmarks", landmarks, count=5)
    matrix = similarity_transform(landmarks, template_for_size(size, template))
    return warp_affine(image, matrix, size, border), matrix


@dataclasses.dataclass(frozen=True)
class AlignmentRecipe:
    """Everything needed to reproduce an aligned crop; stored with datasets and checkpoints.

    Attributes:
        template: the five template points for ``size`` (tuple of (x, y) pairs).
        size: side of the square crop in pixels.
        scale: context margin relative to ArcFace's 112 crop (1.4: hair, ears and chin visible).
        detector: name of the detector that found the landmarks.
        border: fill of the crop outside the photo ("constant", "replicate" or "reflect").
        reference: the template's origin.
    """

    template: tuple[tuple[float, float], ...] = tuple(map(tuple, TEMPLATE_224.tolist()))
    size: int = 224
    scale: float = TEMPLATE_SCALE
    detector: str = "mtcnn"
    border: str = "constant"
    reference: str = "arcface-112 template scaled about the crop centre"

    def __post_init__(self) -> None:
        if len(self.template) != 5 or any(len(point) != 2 for point in self.template):
            raise ValueError(f"template must hold five (x, y) points, got {self.template!r}")
        if self.border not in BORDER_MODES:
            raise ValueError(f"border must be one of {sorted(BORDER_MODES)}, got {self.border!r}")
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")

    @classmethod
    def for_size(cls, size: int = 224, **kwargs: Any) -> AlignmentRecipe:
        """The default recipe at another crop size (template rescaled)."""
        template = tuple(map(tuple, template_for_size(size).astype(np.float64).tolist()))
        return cls(template=template, size=size, **kwargs)

    def template_array(self) -> np.ndarray:
        """The template as float32 (5, 2) for this recipe's size."""
        return np.asarray(self.template, dtype=np.float32)

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``align_face`` with this recipe's template, size and border."""
        template_224 = resize_points(self.template_array(), self.size, 224)
        return align_face(image, landmarks, self.size, template=template_224, border=self.border)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (lists, not tuples)."""
        out = dataclasses.asdict(self)
        out["template"] = [list(point) for point in self.template]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlignmentRecipe:
        """Inverse of ``to_dict`` (unknown keys are an error)."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown AlignmentRecipe keys: {sorted(unknown)}")
        values = dict(data)
        if "template" in values:
            values["template"] = tuple(tuple(float(c) for c in point) for point in values["template"])
        return cls(**values)
