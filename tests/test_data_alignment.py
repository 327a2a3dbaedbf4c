"""Alignment: template, Umeyama similarity, warping real faces onto the template."""

from __future__ import annotations

import numpy as np
import pytest
from _data_support import demo_face, demo_records, photo_from_face, similarity
from _tolerances import U32, U64

from pacofr.data.alignment import (
    ARCFACE_TEMPLATE_112,
    TEMPLATE_224,
    AlignmentRecipe,
    align_face,
    invert_affine,
    resize_points,
    similarity_transform,
    template_for_size,
    transform_points,
    warp_affine,
)

INDEX_HALF_STEP = 0.5e-3
"""Half a unit of the 3rd decimal: the index stores landmark coordinates rounded to 3 decimals."""

FIXED_POINT_BOUND = np.sqrt(10) * INDEX_HALF_STEP * 1.01
"""How far the least-squares similarity of stored landmarks onto the template moves them (px, per coordinate).

The stored points are the aligned points ``p`` (which the fit maps to themselves) plus the index's rounding ``e``
(|e| <= half a step in each of the 10 coordinates). To first order the fit moves each point by the projection
of ``e`` onto the 4-dimensional space of similarity changes, whose size is at most ||e||_2 <= sqrt(10) half
steps; 1 % covers the second-order terms (|e| / face size ~ 1e-5). Measured: at most 5.8e-4 px over the 101
packaged demo faces."""


def test_template_224_matches_the_specification():
    assert TEMPLATE_224.dtype == np.float32 and TEMPLATE_224.shape == (5, 2)
    expected = np.array([[87, 106], [137, 106], [112, 134], [92, 163], [133, 163]], dtype=np.float64)
    assert np.abs(TEMPLATE_224 - expected).max() <= 0.5  # the specification's points are the template's, rounded
    # ArcFace's 112 template, scaled by 1.4 about (56, 56) and moved to the 224 centre; stored as float32: one
    # rounding (U32 relative) of the float64 value, computed in the same order here
    np.testing.assert_allclose(TEMPLATE_224, (ARCFACE_TEMPLATE_112 - 56.0) * 1.4 + 112.0, rtol=U32, atol=0)
    assert TEMPLATE_224[0, 0] < TEMPLATE_224[1, 0] and TEMPLATE_224[3, 0] < TEMPLATE_224[4, 0]
    with pytest.raises(ValueError):
        TEMPLATE_224[0, 0] = 0.0  # read-only


def test_similarity_transform_recovers_a_known_similarity(generator):
    rng = np.random.default_rng(int(generator.initial_seed()))
    for _ in range(20):
        truth = similarity(rng.uniform(-180, 180), rng.uniform(0.2, 5), tuple(rng.uniform(-100, 100, 2)),
                           (0.0, 0.0))
        src = rng.normal(0, 50, size=(5, 2))
        dst = transform_points(truth, src)
        matrix = similarity_transform(src, dst)
        # float64 noise: measured at most 11 U64 |A| on the linear part and 7.3 U64 max|dst| on the shift
        # (6,000 random similarities and point sets); bounds about 4x that
        np.testing.assert_allclose(matrix[:, :2], truth[:, :2], rtol=0, atol=48 * U64 * np.abs(truth[:, :2]).max())
        np.testing.assert_allclose(matrix[:, 2], truth[:, 2], rtol=0, atol=32 * U64 * np.abs(dst).max())
        assert matrix.dtype == np.float64 and matrix.shape == (2, 3)


def test_similarity_transform_is_least_squares_and_never_reflects(generator):
    rng = np.random.default_rng(int(generator.initial_seed()))
    src = rng.normal(0, 30, size=(5, 2))
    dst = transform_points(similarity(20, 1.3, (5, -7), (0, 0)), src) + rng.normal(0, 2, size=(5, 2))
    best = similarity_transform(src, dst)
    residual = transform_points(best, src) - dst
    best_error = np.square(residual).sum()
    # float64 evaluation of a sum of squares: each of the 10 residuals (points up to max|dst| px) is off by a
    # few U64 max|dst|, so the sum by at most 10 * 2 |r|max * 8 U64 max|dst| (about 1e-12 here; a nearby
    # similarity fits worse by at least 0.015, measured over 40,000 perturbations)
    rounding = 10 * 2 * np.abs(residual).max() * 8 * U64 * np.abs(dst).max()
    for _ in range(200):  # no nearby similarity fits better
        angle, log_scale = rng.normal(0, 0.02), rng.normal(0, 0.02)
        shift = rng.normal(0, 0.3, size=2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * np.exp(log_scale)
        other = np.concatenate([rotation @ best[:, :2], (best[:, 2] + shift)[:, None]], axis=1)
        assert np.square(transform_points(other, src) - dst).sum() >= best_error - rounding
    mirrored = src * np.array([-1.0, 1.0])
    assert np.linalg.det(similarity_transform(src, mirrored)[:, :2]) > 0


@pytest.mark.parametrize("bad", [np.zeros((5, 3)), np.zeros((1, 2)), np.full((5, 2), np.nan), np.ones((5, 2))])
def test_similarity_transform_rejects_bad_points(bad):
    with pytest.raises(ValueError, match="src"):
        similarity_transform(bad, np.zeros((bad.shape[0], 2)) if bad.shape[-1] == 2 else np.zeros((5, 2)))


def test_align_face_undoes_a_known_pose_on_a_real_face():
    face, landmarks = demo_face("astronaut.png")
    placed = similarity(25.0, 1.7, (90.0, 40.0), (111.5, 111.5))
    photo, photo_landmarks = photo_from_face(face, landmarks, placed, canvas=480)
    aligned, matrix = align_face(photo, photo_landmarks)
    assert aligned.dtype == np.uint8 and aligned.shape == (224, 224, 3)
    # the alignment maps the face's landmarks exactly where they were in the original crop
    np.testing.assert_allclose(transform_points(matrix, photo_landmarks), landmarks, rtol=0, atol=FIXED_POINT_BOUND)
    # and those are within a few pixels of the template (a real face is not the template): measured 9.4 px at
    # most, 3.5 px for the eyes, on this packaged face; the bounds leave about 30 % for a regenerated demo set
    assert np.linalg.norm(landmarks - TEMPLATE_224, axis=1).max() < 12.0
    assert np.linalg.norm(landmarks[:2] - TEMPLATE_224[:2], axis=1).max() < 4.5
    # the pixels come back too (interpolated twice, so not exactly): measured mean difference 1.02 for this pose
    # (1.38 at -40 degrees, 1.2x); the bound, 2x that, fails a half-pixel shift (3.1), a 1 % scale error (3.8)
    # or a 1 degree rotation (5.2) of the face
    centre = (slice(40, 190), slice(50, 175))
    difference = np.abs(aligned[centre].astype(float) - face[centre].astype(float))
    assert difference.mean() < 2.0


def test_demo_faces_are_aligned_to_the_template():
    landmarks = np.asarray([r["landmarks"] for r in demo_records()])
    distance = np.linalg.norm(landmarks - TEMPLATE_224, axis=-1)  # (N, 5)
    # measured on the 101 packaged faces: median 2.6 px; means 2.2 (eyes), 5.7 (nose), 3.4 (mouth corners);
    # each bound leaves about 40 % for a regenerated demo set (an unaligned set is tens of pixels off)
    assert np.median(distance) < 3.7
    assert distance[:, :2].mean() < 3.2  # eyes
    assert distance[:, 2].mean() < 8.0 and distance[:, 3:].mean() < 4.8  # nose, mouth corners


def test_warp_affine_shrinks_without_aliasing():
    stripes = np.zeros((800, 800, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: point sampling would give pure black or white
    matrix = np.array([[0.25, 0.0, 0.0], [0.0, 0.25, 0.0]])
    small = warp_affine(stripes, matrix, 100)
    # a 4x box filter averages two white and two black columns, 127.5, stored as 127 or 128 (measured: all 128)
    assert abs(small[10:90, 10:90].mean() - 127.5) <= 0.5
    assert small[10:90, 10:90].std() <= 0.5


def test_warp_affine_border_modes():
    image = np.full((50, 50, 3), 200, dtype=np.uint8)
    shift = np.array([[1.0, 0.0, 30.0], [0.0, 1.0, 0.0]])
    assert (warp_affine(image, shift, 50, "constant")[:, :25] == 0).all()
    assert (warp_affine(image, shift, 50, "replicate") == 200).all()
    with pytest.raises(ValueError, match="border"):
        warp_affine(image, shift, 50, "wrap")


def test_align_face_validates_its_inputs():
    image = np.zeros((50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="image"):
        align_face(image.astype(np.float32), TEMPLATE_224)
    with pytest.raises(ValueError, match="landmarks"):
        align_face(image, TEMPLATE_224[:4])
    with pytest.raises(ValueError, match="size"):
        align_face(image, TEMPLATE_224, size=4)


def test_recipe_round_trip_and_other_sizes():
    recipe = AlignmentRecipe()
    data = recipe.to_dict()
    assert data["size"] == 224 and data["scale"] == 1.4 and data["detector"] == "mtcnn"
    np.testing.assert_array_equal(np.asarray(data["template"]), TEMPLATE_224)  # float32 values, exact in float64
    assert AlignmentRecipe.from_dict(data) == recipe
    with pytest.raises(ValueError, match="unknown"):
        AlignmentRecipe.from_dict({**data, "colour": "red"})
    small = AlignmentRecipe.for_size(112)
    np.testing.assert_array_equal(small.template_array(), template_for_size(112))  # float32 -> float64 -> float32
    # the 112 template is the 224 one mapped by x -> (x + 0.5) / 2 - 0.5 (< 112) and rounded to float32 (<= U32 * 112
    # px); mapping back doubles that
    np.testing.assert_allclose(resize_points(template_for_size(112), 112, 224), TEMPLATE_224, rtol=0,
                               atol=2 * U32 * 112)
    face, landmarks = demo_face()
    aligned, matrix = small.align(face, landmarks)
    assert aligned.shape == (112, 112, 3)
    # the fixed-point argument above at half the scale, plus the 112 template's float32 rounding (<= U32 * 112 px
    # per coordinate) projected the same way (sqrt(10) times)
    np.testing.assert_allclose(transform_points(matrix, landmarks), resize_points(landmarks, 224, 112), rtol=0,
                               atol=FIXED_POINT_BOUND / 2 + np.sqrt(10) * U32 * 112)
    # float64 noise of two inversions: measured at most 3.5 U64 max|m| over 2,000 random similarities
    np.testing.assert_allclose(invert_affine(invert_affine(matrix)), matrix, rtol=0,
                               atol=16 * U64 * np.abs(matrix).max())
