"""Facial-region id of every patch of an aligned face (method.md, "Structured facial-region masking").

Regions are boxes in a face frame spanned by the five landmarks, so they follow the face when it
is turned, tilted or shifted:

* origin: the midpoint of the eyes;
* ``s`` axis: the vector from the left to the right eye (eyes at s = -0.5 and +0.5);
* ``t`` axis: the vector from the eye midpoint to the mouth midpoint (eyes at t = 0, mouth at 1).

A patch takes the region of its centre: the first matching face box in ``REGION_BOXES``' order,
else one of the six periphery regions around the face (``hair`` above the forehead, ``neck`` below
the chin, and on each side ``temple_*`` above ``PERIPHERY_SPLIT_T`` and ``jaw_*`` below it), so
every patch belongs to a region of comparable size and structured masking can cover the whole
budget with whole regions. Then the patch that contains each landmark is given that landmark's
region (the landmark nearest the patch centre where several share one), so the eyes, the nose and
the mouth own their patches on every grid, however coarse. The
template map is the same rule applied to the template landmarks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from pacofr.data.alignment import template_for_size

REGION_NAMES = ("eye_left", "eye_right", "nose", "mouth", "forehead", "cheek_left", "cheek_right", "chin",
                "hair", "temple_left", "temple_right", "jaw_left", "jaw_right", "neck")
NUM_REGIONS = len(REGION_NAMES)
#: Regions ``0 .. NUM_FACE_REGIONS - 1`` are the facial components; the rest surround the face.
NUM_FACE_REGIONS = REGION_NAMES.index("hair")
#: Left/right pairs (swapped by a horizontal flip).
MIRROR_PAIRS = (("eye_left", "eye_right"), ("cheek_left", "cheek_right"), ("temple_left", "temple_right"),
                ("jaw_left", "jaw_right"))

#: Region of each of the five landmarks (left eye, right eye, nose, left and right mouth corner).
LANDMARK_REGIONS = (0, 1, 2, 3, 3)


class RegionBox(NamedTuple):
    """A box in the face frame: ``s`` relative to ``s_anchor`` and ``t`` relative to ``t_anchor``.

    Anchors name a landmark-derived point: "eye_left", "eye_right", "nose", "mouth" (mouth
    midpoint), "eyes" (eye midpoint, the origin).
    """

    region: int
    anchor: str
    s_min: float
    s_max: float
    t_min: float
    t_max: float


# Face-frame boxes, checked in this order (the first hit wins). Sizes are in units of the
# inter-ocular distance (s) and the eye-to-mouth distance (t); the eye boxes include the brows.
REGION_BOXES = (
    RegionBox(0, "eye_left", -0.40, 0.40, -0.55, 0.22),
    RegionBox(1, "eye_right", -0.40, 0.40, -0.55, 0.22),
    RegionBox(2, "nose", -0.30, 0.30, -0.90, 0.20),
    RegionBox(3, "mouth", -0.62, 0.62, -0.31, 0.30),
    RegionBox(4, "eyes", -0.95, 0.95, -1.25, -0.40),
    RegionBox(5, "eyes", -1.05, 0.0, 0.0, 1.30),
    RegionBox(6, "eyes", 0.0, 1.05, 0.0, 1.30),
    RegionBox(7, "mouth", -0.90, 0.90, 0.30, 0.62),
)
#: Periphery (eye-midpoint frame): above ``t = PERIPHERY_TOP_T`` is hair, below ``PERIPHERY_BOTTOM_T``
#: (the chin box's lower edge) is neck; in between, a side is temple above ``PERIPHERY_SPLIT_T``, jaw below.
PERIPHERY_TOP_T = -1.25
PERIPHERY_BOTTOM_T = 1.62
PERIPHERY_SPLIT_T = 0.3


def _anchor_points(frame_landmarks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Anchor (s, t) coordinates (..., 2) from landmarks already in the face frame (..., 5, 2)."""
    return {
        "eyes": torch.zeros_like(frame_landmarks[..., 0, :]),
        "eye_left": frame_landmarks[..., 0, :],
        "eye_right": frame_landmarks[..., 1, :],
        "nose": frame_landmarks[..., 2, :],
        "mouth": frame_landmarks[..., 3:5, :].mean(dim=-2),
    }


def patch_centres(grid: int, image_size: int) -> torch.Tensor:
    """Pixel centres (grid*grid, 2) of the patches of a ``grid`` x ``grid`` split, row-major, float64."""
    patch = image_size / grid
    axis = (torch.arange(grid, dtype=torch.float64) + 0.5) * patch - 0.5
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def _check_grid(grid: int, image_size: int) -> None:
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if not isinstance(image_size, int) or image_size < grid:
        raise ValueError(f"image_size must be an int >= grid ({grid}), got {image_size!r}")


def _as_landmarks(landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(..., 5, 2) float64 landmarks (shape checked), on their own device."""
    points = torch.as_tensor(landmarks)
    if points.ndim < 2 or tuple(points.shape[-2:]) != (5, 2):
        raise ValueError(f"landmarks must have shape (..., 5, 2), got {tuple(points.shape)}")
    return points.detach().to(torch.float64)


def _frame_basis(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eye midpoint (..., 2) and face-frame axes as the columns of (..., 2, 2), from float64 landmarks."""
    eye_mid = points[..., 0:2, :].mean(dim=-2)
    axis_s = points[..., 1, :] - points[..., 0, :]
    axis_t = points[..., 3:5, :].mean(dim=-2) - eye_mid
    return eye_mid, torch.stack([axis_s, axis_t], dim=-1)


def face_frame_valid(landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(...,) bool: the face's landmarks (..., 5, 2) are finite and span a face frame (the eyes
    apart, the mouth off the eye line), so :func:`landmark_region_ids` can use them."""
    points = _as_landmarks(landmarks)
    finite = torch.isfinite(points).flatten(-2).all(dim=-1)
    _, basis = _frame_basis(torch.where(torch.isfinite(points), points, torch.zeros_like(points)))
    scale = basis[..., 0].norm(dim=-1) * basis[..., 1].norm(dim=-1)
    return finite & (torch.linalg.det(basis).abs() > 1e-3 * scale) & (scale > 1e-6)


def landmark_region_ids(landmarks: torch.Tensor | np.ndarray, grid: int = 14, image_size: int = 224) -> torch.Tensor:
    """Region id of every patch, following each face's own landmarks.

    Args:
        landmarks: (..., 5, 2) landmarks in aligned-image pixels (any float dtype, any device).
        grid: patches per side.
        image_size: side of the aligned image in pixels.
    Returns:
        int64 (..., grid*grid) region ids in [0, NUM_REGIONS), row-major, on the landmarks' device.
    Raises:
        ValueError: wrong shape, non-finite landmarks, or eyes and mouth that span no face frame
            (:func:`region_ids_or_template` falls back to the template instead).
    """
    _check_grid(grid, image_size)
    points = _as_landmarks(landmarks)
    device = points.device
    if not torch.isfinite(points).all():
        raise ValueError("landmarks must be finite")
    if not face_frame_valid(points).all():
        raise ValueError("landmarks span no face frame: the eyes coincide or the mouth lies on the eye line")
    eye_mid, basis = _frame_basis(points)
    to_frame = torch.linalg.inv(basis)  # (..., 2, 2)

    centres = patch_centres(grid, image_size).to(device)  # (L, 2)
    frame_patches = torch.einsum("...ij,...lj->...li", to_frame, centres - eye_mid.unsqueeze(-2))
    frame_landmarks = torch.einsum("...ij,...kj->...ki", to_frame, points - eye_mid.unsqueeze(-2))
    anchors = _anchor_points(frame_landmarks)

    ids = _periphery_ids(frame_patches)
    unassigned = torch.ones_like(ids, dtype=torch.bool)
    for box in REGION_BOXES:
        rel = frame_patches - anchors[box.anchor].unsqueeze(-2)
        inside = ((rel[..., 0] >= box.s_min) & (rel[..., 0] <= box.s_max)
                  & (rel[..., 1] >= box.t_min) & (rel[..., 1] <= box.t_max))
        hit = inside & unassigned
        ids = torch.where(hit, torch.full_like(ids, box.region), ids)
        unassigned &= ~hit

    patch = image_size / grid
    cells = torch.clamp(torch.floor((points + 0.5) / patch), 0, grid - 1).to(torch.int64)
    cell_index = cells[..., 1] * grid + cells[..., 0]  # (..., 5)
    # landmarks sharing a cell: the one nearest the cell centre is written last and wins, so the rule
    # does not depend on the landmark order (a mirrored face gets the mirrored map)
    offset = (points + 0.5) - (cells.to(points.dtype) + 0.5) * patch  # (..., 5, 2)
    order = offset.square().sum(dim=-1).argsort(dim=-1, descending=True, stable=True)  # (..., 5)
    regions = torch.tensor(LANDMARK_REGIONS, device=device).expand_as(cell_index)
    for rank in range(order.shape[-1]):
        landmark = order[..., rank:rank + 1]
        ids.scatter_(-1, cell_index.gather(-1, landmark), regions.gather(-1, landmark))
    return ids


def _periphery_ids(frame_patches: torch.Tensor) -> torch.Tensor:
    """Periphery region (int64 (..., L)) of patch centres given in the eye-midpoint frame (..., L, 2)."""
    s, t = frame_patches[..., 0], frame_patches[..., 1]
    region = {name: torch.tensor(REGION_NAMES.index(name), device=s.device) for name in REGION_NAMES}
    upper = torch.where(s < 0, region["temple_left"], region["temple_right"])
    lower = torch.where(s < 0, region["jaw_left"], region["jaw_right"])
    side = torch.where(t < PERIPHERY_SPLIT_T, upper, lower)
    return torch.where(t < PERIPHERY_TOP_T, region["hair"], torch.where(t > PERIPHERY_BOTTOM_T, region["neck"], side))


def template_region_ids(grid: int = 14, image_size: int = 224) -> torch.Tensor:
    """Region id (grid*grid,) int64 of every patch of a face aligned to the template."""
    _check_grid(grid, image_size)
    return landmark_region_ids(torch.from_numpy(template_for_size(image_size)), grid, image_size)


def region_ids_or_template(landmarks: torch.Tensor | np.ndarray, grid: int = 14,
                           image_size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-face region maps from landmarks, the template map for faces whose landmarks cannot be used.

    Args:
        landmarks: (..., 5, 2) landmarks in aligned-image pixels.
        grid, image_size: as :func:`landmark_region_ids`.
    Returns:
        ids int64 (..., grid*grid) and ``fallback`` bool (...): True where the landmarks were
        non-finite or spanned no face frame and the template map was used.
    """
    _check_grid(grid, image_size)
    points = _as_landmarks(landmarks)
    valid = face_frame_valid(points)
    template = torch.from_numpy(template_for_size(image_size)).to(device=points.device, dtype=torch.float64)
    usable = torch.where(valid[..., None, None], points, template.expand_as(points))
    return landmark_region_ids(usable, grid, image_size), ~valid


#: Overlay colours per region (RGB): bright for the facial components, muted for the periphery.
REGION_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                  (145, 30, 180), (70, 240, 240), (240, 50, 230),
                  (128, 96, 64), (96, 96, 160), (96, 160, 96), (160, 96, 96), (160, 160, 96), (96, 96, 96))


def region_overlay(image: Image.Image | np.ndarray, region_ids: torch.Tensor | np.ndarray, grid: int,
                   *, alpha: float = 0.45, landmarks: np.ndarray | None = None) -> Image.Image:
    """The image with each patch tinted by its region colour, patch borders and a legend.

    Args:
        image: aligned face (PIL image or uint8 (H, W, 3) array), square.
        region_ids: (grid*grid,) region ids.
        grid: patches per side.
        alpha: tint opacity.
        landmarks: optional (K, 2) points to mark.
    Returns:
        RGB PIL image (the face, with a legend strip on the right).
    """
    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    base = base.convert("RGB")
    size = base.width
    if base.height != size:
        raise ValueError(f"image must be square, got {base.width}x{base.height}")
    ids = np.asarray(torch.as_tensor(region_ids).cpu()).reshape(-1)
    if ids.shape[0] != grid * grid:
        raise ValueError(f"region_ids must hold grid*grid = {grid * grid} ids, got {ids.shape[0]}")
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    patch = size / grid
    for index, region in enumerate(ids):
        row, col = divmod(index, grid)
        box = (round(col * patch), round(row * patch), round((col + 1) * patch) - 1, round((row + 1) * patch) - 1)
        draw.rectangle(box, fill=(*REGION_COLOURS[int(region)], int(255 * alpha)))
        draw.rectangle(box, outline=(255, 255, 255, 60))
    composed = Image.alpha_composite(base.convert("RGBA"), tint).convert("RGB")
    if landmarks is not None:
        marks = ImageDraw.Draw(composed)
        for x, y in np.asarray(landmarks, dtype=np.float64).reshape(-1, 2):
            marks.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), outline=(255, 255, 255), fill=(0, 0, 0))
    legend = Image.new("RGB", (120, size), (32, 32, 32))
    text = ImageDraw.Draw(legend)
    line = max(12, size // (NUM_REGIONS + 1))
    for region, name in enumerate(REGION_NAMES):
        top = 4 + region * line
        text.rectangle((4, top, 14, top + 10), fill=REGION_COLOURS[region])
        text.text((20, top - 1), name, fill=(230, 230, 230))
    canvas = Image.new("RGB", (size + legend.width, size))
    canvas.paste(composed, (0, 0))
    canvas.paste(legend, (size, 0))
    return canvas
