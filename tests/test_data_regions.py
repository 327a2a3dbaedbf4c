"""Facial-region maps: template and landmark modes, grids 14 and 7, pose equivariance, the periphery
regions, and the template fallback for unusable landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from _data_support import demo_face

from pacofr.data.alignment import FLIP_PERMUTATION, TEMPLATE_224, template_for_size
from pacofr.data.regions import (
    MIRROR_PAIRS,
    NUM_FACE_REGIONS,
    NUM_REGIONS,
    REGION_NAMES,
    face_frame_valid,
    landmark_region_ids,
    patch_centres,
    REGION_COLOURS,
    region_ids_or_template,
    region_overlay,
    template_region_ids,
)

ID = {name: number for number, name in enumerate(REGION_NAMES)}

COMPOSITE_ROUNDING = 0.5
"""PIL's 8-bit alpha compositing is within half a grey level of the exact blend: measured 0.494 at most over
every (background, colour) pair of 0..255 at alphas 114 and 115 (0.45 of 255, truncated and rounded)."""


def _cell(point: np.ndarray, grid: int, size: int = 224) -> int:
    patch = size / grid
    col, row = (int(np.floor((c + 0.5) / patch)) for c in point)
    return row * grid + col


def test_region_names_contract():
    assert REGION_NAMES == ("eye_left", "eye_right", "nose", "mouth", "forehead", "cheek_left", "cheek_right",
                            "chin", "hair", "temple_left", "temple_right", "jaw_left", "jaw_right", "neck")
    assert NUM_REGIONS == 14 and NUM_FACE_REGIONS == 8


@pytest.mark.parametrize("grid", [14, 7])
def test_template_map_puts_the_landmark_patches_in_their_regions(grid):
    ids = template_region_ids(grid, 224)
    assert ids.dtype == torch.int64 and ids.shape == (grid * grid,)
    expected = ("eye_left", "eye_right", "nose", "mouth", "mouth")
    for point, name in zip(TEMPLATE_224, expected):
        assert REGION_NAMES[int(ids[_cell(point, grid)])] == name
    table = ids.view(grid, grid)
    # image corners are periphery: hair above, neck below; the face regions sit in the face
    assert {int(table[0, 0]), int(table[0, -1])} == {ID["hair"]}
    assert {int(table[-1, 0]), int(table[-1, -1])} == {ID["neck"]}
    eye_row = _cell(TEMPLATE_224[0], grid) // grid
    mouth_row = _cell(TEMPLATE_224[3], grid) // grid
    forehead_rows = torch.nonzero((table == ID["forehead"]).any(dim=1)).flatten()
    assert forehead_rows.numel() > 0 and int(forehead_rows.max()) < eye_row
    cheek_cols_left = torch.nonzero((table == ID["cheek_left"]).any(dim=0)).flatten()
    cheek_cols_right = torch.nonzero((table == ID["cheek_right"]).any(dim=0)).flatten()
    assert int(cheek_cols_left.max()) < int(cheek_cols_right.min())
    if grid == 14:
        assert set(ids.tolist()) == set(range(NUM_REGIONS))
        # every region, periphery included, has a size a whole-region mask can use (no region holds
        # most of the image, as the earlier single "other" region held 136 of 196 patches)
        assert int(torch.bincount(ids).max()) <= 28
        assert int(table[6, 0]) == ID["temple_left"] and int(table[10, -1]) == ID["jaw_right"]
        chin_rows = torch.nonzero((table == ID["chin"]).any(dim=1)).flatten()
        assert int(chin_rows.min()) > mouth_row
        # the eye regions include the brow row above the eye patches
        above_eye = _cell(TEMPLATE_224[0] - np.array([0.0, 16.0]), grid)
        assert int(ids[above_eye]) == ID["eye_left"]


def test_template_map_equals_landmark_map_of_the_template():
    for grid in (4, 7, 14, 16, 28):
        landmarks = torch.from_numpy(template_for_size(224))
        assert torch.equal(template_region_ids(grid, 224), landmark_region_ids(landmarks, grid, 224))


@pytest.mark.parametrize("grid", [14, 7])
def test_landmark_map_follows_a_shifted_face(grid):
    patch = 224 // grid
    base = torch.from_numpy(template_for_size(224)).double()
    for shift_cols, shift_rows in ((1, 0), (0, -1), (-1, 1)):
        moved = base + torch.tensor([shift_cols * patch, shift_rows * patch], dtype=torch.float64)
        ids = landmark_region_ids(moved, grid, 224).view(grid, grid)
        expected = torch.roll(template_region_ids(grid, 224).view(grid, grid), (shift_rows, shift_cols), (0, 1))
        # compare where the roll did not wrap around (the periphery regions reach the image border)
        rows = slice(max(shift_rows, 0), grid + min(shift_rows, 0))
        cols = slice(max(shift_cols, 0), grid + min(shift_cols, 0))
        assert torch.equal(ids[rows, cols], expected[rows, cols])
        assert torch.equal(ids < NUM_FACE_REGIONS, expected < NUM_FACE_REGIONS)


@pytest.mark.parametrize("grid", [14, 7])
def test_landmark_map_turns_with_the_face(grid):
    centre = (224 - 1) / 2
    base = torch.from_numpy(template_for_size(224)).double()
    # rotate the face 90 degrees clockwise in the image: (x, y) -> (centre + centre - y, x) about the centre
    rotated = torch.stack([2 * centre - base[:, 1], base[:, 0]], dim=-1)
    ids = landmark_region_ids(rotated, grid, 224).view(grid, grid)
    expected = torch.rot90(template_region_ids(grid, 224).view(grid, grid), k=-1, dims=(0, 1))
    assert torch.equal(ids, expected)


def _mirror_relabel() -> torch.Tensor:
    """(NUM_REGIONS,) int64: the region id of each region's mirror image (left and right swapped)."""
    swap = {}
    for left, right in MIRROR_PAIRS:
        swap[ID[left]], swap[ID[right]] = ID[right], ID[left]
    return torch.tensor([swap.get(k, k) for k in range(NUM_REGIONS)])


def test_landmark_map_is_mirror_symmetric(generator):
    relabel = _mirror_relabel()
    for grid in (14, 7):
        for _ in range(10):
            noise = torch.randn(5, 2, generator=generator, dtype=torch.float64) * 4
            landmarks = torch.from_numpy(template_for_size(224)).double() + noise
            mirrored = landmarks[list(FLIP_PERMUTATION)].clone()
            mirrored[:, 0] = 223 - mirrored[:, 0]
            ids = landmark_region_ids(landmarks, grid).view(grid, grid)
            ids_mirrored = landmark_region_ids(mirrored, grid).view(grid, grid)
            assert torch.equal(relabel[torch.flip(ids, dims=(1,))], ids_mirrored)


def test_landmarks_sharing_a_patch_keep_mirror_symmetry():
    # both eyes in the centre cell of a 7 x 7 grid (32 px): the eye nearer the cell centre owns it,
    # whatever the landmark order, so the mirrored face gets the mirrored map (the order decided before)
    relabel = _mirror_relabel()
    landmarks = torch.from_numpy(template_for_size(224)).double()
    landmarks[0] = torch.tensor([99.0, 105.0])  # cell (3, 3), 12.5 px from its centre (111.5, 111.5)
    landmarks[1] = torch.tensor([120.0, 105.0])  # the same cell, 8.5 px from it
    mirrored = landmarks[list(FLIP_PERMUTATION)].clone()
    mirrored[:, 0] = 223 - mirrored[:, 0]
    ids = landmark_region_ids(landmarks, 7).view(7, 7)
    ids_mirrored = landmark_region_ids(mirrored, 7).view(7, 7)
    assert int(ids[3, 3]) == ID["eye_right"] and int(ids_mirrored[3, 3]) == ID["eye_left"]
    assert torch.equal(relabel[torch.flip(ids, dims=(1,))], ids_mirrored)


def test_landmark_map_of_a_real_turned_face_keeps_its_parts():
    _, landmarks = demo_face("camera.png")  # a face in three-quarter profile
    ids = landmark_region_ids(torch.from_numpy(landmarks), 14)
    for point, name in zip(landmarks, ("eye_left", "eye_right", "nose", "mouth", "mouth")):
        assert REGION_NAMES[int(ids[_cell(point, 14)])] == name
    assert (ids == ID["forehead"]).sum() >= 6 and (ids >= NUM_FACE_REGIONS).sum() >= 98


def test_landmark_map_batches_devices_and_dtypes(generator):
    base = torch.from_numpy(template_for_size(224))
    batch = base + torch.randn(2, 3, 5, 2, generator=generator)
    ids = landmark_region_ids(batch, 14)
    assert ids.shape == (2, 3, 196) and ids.dtype == torch.int64
    for b in range(2):
        for k in range(3):
            assert torch.equal(ids[b, k], landmark_region_ids(batch[b, k], 14))
    assert torch.equal(landmark_region_ids(batch.half(), 14)[0, 0], landmark_region_ids(batch.half()[0, 0].float(), 14))
    assert torch.equal(landmark_region_ids(batch.numpy(), 14), ids)
    assert landmark_region_ids(batch[:0], 14).shape == (0, 3, 196)


def test_landmark_map_rejects_bad_landmarks():
    base = torch.from_numpy(template_for_size(224))
    with pytest.raises(ValueError, match="shape"):
        landmark_region_ids(base[:4], 14)
    with pytest.raises(ValueError, match="finite"):
        landmark_region_ids(base * float("nan"), 14)
    collapsed = base.clone()
    collapsed[1] = collapsed[0]
    with pytest.raises(ValueError, match="face frame"):
        landmark_region_ids(collapsed, 14)
    with pytest.raises(ValueError, match="grid"):
        landmark_region_ids(base, 0)


def test_patch_centres_are_pixel_centres():
    centres = patch_centres(14, 224)
    assert centres.shape == (196, 2)
    # (i + 0.5) * 16 - 0.5 is exact in float64 for integer i
    assert torch.equal(centres[0], torch.tensor([7.5, 7.5], dtype=torch.float64))
    assert torch.equal(centres[15], torch.tensor([23.5, 23.5], dtype=torch.float64))


def test_region_overlay_draws_regions():
    face, landmarks = demo_face()
    ids = landmark_region_ids(torch.from_numpy(landmarks), 14)
    picture = region_overlay(face, ids, 14, landmarks=landmarks)
    assert isinstance(picture, Image.Image) and picture.height == 224 and picture.width > 224
    pixels = np.asarray(picture)[:, :224].astype(int)
    corner = pixels[4:12, 4:12].astype(float)  # inside the patch outline: the hair region's tint
    colour = np.asarray(REGION_COLOURS[ID["hair"]], dtype=float)
    blended = face[4:12, 4:12] * (1 - 0.45) + colour * 0.45
    # an 8-bit alpha is within 1/255 of 0.45, which moves each pixel by at most |colour - pixel| / 255; PIL's
    # integer compositing adds its rounding
    bound = np.abs(colour - face[4:12, 4:12]).mean(axis=(0, 1)) / 255 + COMPOSITE_ROUNDING
    assert (np.abs(corner.mean(axis=(0, 1)) - blended.mean(axis=(0, 1))) <= bound).all()
    eye_patch = _cell(landmarks[0], 14)
    row, col = divmod(eye_patch, 14)
    tinted = pixels[row * 16 + 4:row * 16 + 12, col * 16 + 4:col * 16 + 12].mean(axis=(0, 1))
    assert tinted[0] > tinted[1]  # the left eye is tinted red
    with pytest.raises(ValueError, match="region_ids"):
        region_overlay(face, ids[:10], 14)


def test_unusable_landmarks_fall_back_to_the_template(generator):
    template = torch.from_numpy(template_for_size(224)).double()
    turned = template.clone()
    turned[:, 0] = 112 + (turned[:, 0] - 112) * 0.7 + 12
    nan_face = template.clone()
    nan_face[2, 0] = float("nan")
    collapsed = template.clone()
    collapsed[1] = collapsed[0]
    batch = torch.stack([turned, nan_face, collapsed, template])
    assert face_frame_valid(batch).tolist() == [True, False, False, True]
    ids, fallback = region_ids_or_template(batch, 14, 224)
    assert fallback.tolist() == [False, True, True, False]
    assert torch.equal(ids[0], landmark_region_ids(turned, 14, 224))
    assert not torch.equal(ids[0], template_region_ids(14, 224))
    for b in (1, 2, 3):
        assert torch.equal(ids[b], template_region_ids(14, 224))
    assert region_ids_or_template(batch[:0], 14, 224)[0].shape == (0, 196)
