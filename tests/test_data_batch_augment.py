"""BatchAugment: Augment's distributions for a whole batch, landmarks exact, a resumable random stream."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from _landmark_spots import SPOT_CENTRE_TOLERANCE_PX, landmark_spots, spot_centre
from _tolerances import U32
from torch.utils.data import default_collate

from pacofr.data.alignment import FLIP_PERMUTATION, TEMPLATE_224, resize_points
from pacofr.data.augment import Augment
from pacofr.data.batch_augment import BatchAugment, _grid_terms
from pacofr.data.demo import demo_dataset



def demo_batch(count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = demo_dataset(image_size=size, uint8=True)
    batch = default_collate([dataset[i] for i in range(count)])
    return batch["image"], batch["landmarks"]


def test_same_seed_same_faces_as_augment_one_by_one():
    """Image i of a batch gets the parameters of the i-th of B successive Augment calls."""
    size, count, seed = 224, 12, 5
    pixels, landmarks = demo_batch(count, size)
    generator = torch.Generator().manual_seed(seed)
    reference = [Augment()(pixels[i].to(torch.float32) / 255.0, landmarks[i], generator) for i in range(count)]
    images, moved = BatchAugment(Augment(), seed=seed)(pixels, landmarks)
    # landmarks: the same float64 arithmetic on the same draws, rounded once to float32
    assert torch.equal(moved, torch.stack([r[1] for r in reference]))
    # pixels: the sampling grid is float32 here and float64 in Augment; a position error of a few
    # roundings of coordinates up to `size` (about 8 eps size px) times an intensity slope of at most
    # 1 per px, times the colour gain (at most 1.1^3 < 2)
    bound = 2 * 8 * U32 * size
    torch.testing.assert_close(images, torch.stack([r[0] for r in reference]), atol=bound, rtol=0)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _statistics(images: torch.Tensor, landmarks: torch.Tensor) -> np.ndarray:
    """Per face: its 10 landmark coordinates, the length and angle of landmark 0 -> 1 (scale and
    rotation alone), its 3 channel means, its pixel spread and its mean colour spread (saturation)."""
    flat = images.double().flatten(2)
    points = landmarks.double()
    step = points[:, 1] - points[:, 0]
    columns = [points.flatten(1), step.norm(dim=1, keepdim=True), torch.atan2(step[:, 1:], step[:, :1]),
               flat.mean(2), flat.flatten(1).std(1, keepdim=True), flat.std(1).mean(1, keepdim=True)]
    return torch.cat(columns, dim=1).numpy()


def test_distributions_match_augment_statistically(generator):
    """Independent draws of both implementations (flip, rotation, scale, shift and colour all
    widened): per statistic, the two samples' distributions agree by a two-sample KS test at
    false-alarm rate 1e-6 (17 statistics: about 1.7e-5 per run). Checked to fail (n = 4000)
    when one setting differs by 20 % (flip, scale, shift, brightness, contrast), 40 % (rotation) or
    50 % (saturation); the same-seed test above pins the parameters exactly."""
    size, count = 16, 4000
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    # five points placed without left/right symmetry, so that a flip (with its reordering) shows
    # in the landmark coordinates' distributions
    landmarks = torch.tensor([[3.0, 4.0], [9.0, 5.5], [7.5, 9.0], [4.5, 12.0], [12.5, 11.0]])
    settings = Augment(max_rotation_deg=10.0, max_scale=0.1, max_shift=0.05, brightness=0.2, contrast=0.2,
                       saturation=0.2)
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    batched = BatchAugment(settings, seed=seed)(image.expand(count, -1, -1, -1), landmarks.expand(count, -1, -1))
    one_by_one_rng = torch.Generator().manual_seed(seed + 1)
    singles = [settings(image, landmarks, one_by_one_rng) for _ in range(count)]
    ours = _statistics(*batched)
    theirs = _statistics(torch.stack([s[0] for s in singles]), torch.stack([s[1] for s in singles]))
    # KS critical value: c(alpha) sqrt((n + m) / (n m)) with c(alpha) = sqrt(-ln(alpha / 2) / 2)
    alpha = 1e-6
    critical = math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt(2 / count)
    gaps = [_ks_statistic(ours[:, k], theirs[:, k]) for k in range(ours.shape[1])]
    assert max(gaps) <= critical, (gaps, critical)


def test_landmarks_sit_on_their_moved_spots():
    """The warp and the landmark map agree, and a flip swaps exactly left and right."""
    points = resize_points(TEMPLATE_224, 224, 96)
    count = 24
    image = landmark_spots(points)
    settings = Augment(flip_prob=0.5, max_rotation_deg=15, max_scale=0.1, max_shift=0.05, brightness=0, contrast=0,
                       saturation=0)
    out, moved = BatchAugment(settings, seed=11)(image.expand(count, -1, -1, -1),
                                                 torch.from_numpy(points).float().expand(count, -1, -1))
    seen = set()
    for face in range(count):
        spots = [spot_centre(out[face], point) for point in moved[face].numpy()]
        for (centre, _), point in zip(spots, moved[face].numpy()):
            np.testing.assert_allclose(centre, point, atol=SPOT_CENTRE_TOLERANCE_PX)
        drawn_for = tuple(int(k) for k in np.argsort(np.argsort([mass for _, mass in spots])))
        flipped = drawn_for == FLIP_PERMUTATION
        assert flipped or drawn_for == (0, 1, 2, 3, 4)
        seen.add(flipped)
    assert seen == {True, False}


def test_the_random_stream_resumes_exactly():
    pixels, landmarks = demo_batch(4, 32)
    first = BatchAugment(seed=3)
    for _ in range(2):
        first(pixels, landmarks)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint keeps it (weights_only loading)
    expected = first(pixels, landmarks)
    buffer.seek(0)
    resumed = BatchAugment(seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = resumed(pixels, landmarks)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({"seed": 3})


def test_chunks_and_input_dtype_do_not_change_the_result():
    pixels, landmarks = demo_batch(6, 48)
    whole = BatchAugment(seed=2, cpu_chunk_bytes=1 << 40)(pixels, landmarks)
    single = BatchAugment(seed=2, cpu_chunk_bytes=1)(pixels, landmarks)
    assert torch.equal(whole[0], single[0]) and torch.equal(whole[1], single[1])
    floats = BatchAugment(seed=2)(pixels.to(torch.float32) / 255.0, landmarks)
    # the uint8 path folds the 1/255 into the colour gains: a few float32 roundings of values <= 2
    torch.testing.assert_close(floats[0], whole[0], atol=16 * U32, rtol=0)
    assert torch.equal(floats[1], whole[1])


def test_the_planar_grid_is_affine_grids():
    """The grid the warp samples at equals ``F.affine_grid`` (the truth here) for random maps."""
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    size = 37
    rows, (column_gain, centres) = _grid_terms(theta, size)
    ours = torch.addcmul(rows, column_gain, centres).permute(0, 2, 3, 1)
    expected = torch.nn.functional.affine_grid(theta, [5, 3, size, size], align_corners=False)
    # both sum three float32 products of |theta| times centres in [-1, 1] in another order: a few
    # roundings (say 4) of the largest term
    bound = 4 * U32 * float(theta.abs().sum(2).max())
    torch.testing.assert_close(ours, expected, atol=bound, rtol=0)


def test_bad_inputs_are_named():
    augment = BatchAugment()
    with pytest.raises(ValueError, match="images must be"):
        augment(torch.zeros(2, 3, 8, 9, dtype=torch.uint8), torch.zeros(2, 5, 2))
    with pytest.raises(ValueError, match="landmarks must be"):
        augment(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="cpu_chunk_bytes"):
        BatchAugment(cpu_chunk_bytes=0)


@pytest.mark.gpu
def test_cuda_batch_matches_the_cpu_batch():
    pixels, landmarks = demo_batch(8, 64)
    cpu = BatchAugment(seed=4)(pixels, landmarks)
    cuda = BatchAugment(seed=4)(pixels.cuda(), landmarks)
    assert cuda[0].device.type == "cuda" and cuda[1].device.type == "cpu"
    assert torch.equal(cuda[1], cpu[1])  # landmarks are computed on the CPU from the same draws
    # grid_sample on CUDA and on the CPU: float32 roundings of the weights and of the grid (as above)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], atol=2 * 8 * U32 * 64, rtol=0)
