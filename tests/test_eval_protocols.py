"""Heads, scores and protocols against float64 references; baselines; streamed feature extraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tolerances import U32, U64, gamma

from pacofr.data.image_sets import ArrayImages, ImageSet
from pacofr.eval.baselines import baseline_features, fit_pca
from pacofr.eval.encoders import load_encoder
from pacofr.eval.extractors import BaselineExtractor, EncoderExtractor, extract_features
from pacofr.eval.features import pool_tokens
from pacofr.eval.probe_heads import KNN_TEMPERATURE, Ridge, knn_predict
from pacofr.eval.labelled import Targets
from pacofr.eval.metrics import Metric, score, summarise, SeedRun
from pacofr.eval.probe_protocols import ProbeConfig, pick_on_val, run_frozen

pytestmark = pytest.mark.usefixtures("one_thread")


def _classes(labels: torch.Tensor, classes: int) -> Targets:
    return Targets("class", labels.long(), [f"c{i}" for i in range(classes)])


def _blobs(n: int, dim: int, classes: int, separation: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, dim, generator=gen) * separation
    labels = torch.randint(0, classes, (n,), generator=gen)
    return centres[labels] + torch.randn(n, dim, generator=gen), labels


def _splits(x: torch.Tensor, targets: Targets) -> tuple[dict, dict]:
    n = x.shape[0]
    cut = {"train": range(0, int(0.7 * n)), "val": range(int(0.7 * n), int(0.85 * n)), "test": range(int(0.85 * n), n)}
    return {s: x[list(r)] for s, r in cut.items()}, {s: targets.select(list(r)) for s, r in cut.items()}


CFG = ProbeConfig(seeds=(0, 1), probe_epochs=30, probe_lrs=(1e-2,), probe_l2s=(1e-4,), mlp_epochs=60)


# ---------------------------------------------------------------------------------------------- scores
def test_scores_follow_their_definitions() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    # ties go to the smaller class index: predictions 0, 1, 2
    # scores are float64 arithmetic on exact counts and small integers: a few U64 relative at most, or exact
    assert score(logits, _classes(torch.tensor([0, 1, 1]), 3)) == pytest.approx(200 / 3, rel=4 * U64, abs=0)
    ages = Targets("regression", torch.tensor([[10.0], [20.0]]), ["age"], "years")
    assert score(torch.tensor([[13.0], [16.0]]), ages) == 3.5
    gt = torch.zeros(2, 4, 2)
    gt[:, 1] = torch.tensor([1.0, 0.0])  # points 0 and 1 are 1 apart: the normaliser
    pred = gt.clone()
    pred[0, 2] += torch.tensor([0.3, 0.4])  # error 0.5 on one of four points of image 0
    nme = score(pred.reshape(2, -1), Targets("landmarks", gt, [], "", (0, 1)))
    assert nme == pytest.approx(100 * (0.5 / 4) / 2, rel=2 * U32, abs=0)  # 0.3 and 0.4 rounded to float32 (U32 each)
    multi = Targets("multi", torch.tensor([[1.0, 0.0], [1.0, 1.0]]), ["a", "b"])
    assert score(torch.tensor([[2.0, 1.0], [-1.0, 3.0]]), multi) == 50.0
    assert math.isnan(score(torch.empty(0, 2), _classes(torch.empty(0, dtype=torch.long), 2)))


def test_picking_on_val_prefers_the_earliest_of_equals_and_ignores_nan() -> None:
    higher, lower = Metric("accuracy", "%", True), Metric("MAE", "years", False)
    assert pick_on_val([1, 2, 3], {1: 50.0, 2: 70.0, 3: 70.0}.get, higher) == (2, [50.0, 70.0, 70.0])
    assert pick_on_val([1, 2], {1: 5.0, 2: 4.0}.get, lower)[0] == 2
    assert pick_on_val([1, 2], {1: float("nan"), 2: 1.0}.get, higher)[0] == 2
    assert pick_on_val([1, 2], lambda p: float("nan"), higher)[0] == 1
    summary = summarise([SeedRun(0, 50.0), SeedRun(1, 70.0)], higher)
    assert summary["mean"] == 60.0 and summary["std"] == pytest.approx(10.0, rel=4 * U64, abs=0)  # float64
    assert summary["seeds"] == [0, 1]


# ---------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("shape", [(60, 7), (9, 30)], ids=["primal", "dual"])
def test_ridge_matches_the_float64_normal_equations(shape: tuple[int, int], generator: torch.Generator) -> None:
    n, f = shape
    x = torch.randn(n, f, generator=generator) * 3 + 1
    y = torch.randn(n, 3, generator=generator)
    query = torch.randn(5, f, generator=generator)
    ridge = Ridge(x, y)
    xn, yn, qn = x.double().numpy(), y.double().numpy(), query.double().numpy()
    for alpha in (1e-3, 0.5, 10.0):
        xc, yc = xn - xn.mean(0), yn - yn.mean(0)
        system = xc.T @ xc + alpha * n * np.eye(f)
        w = np.linalg.solve(system, xc.T @ yc)
        expected = (qn - xn.mean(0)) @ w + yn.mean(0)
        # the head solves in float64 (another method: eigendecomposition) and stores float32: one rounding
        # (U32 relative) of a float64 prediction that two backward-stable solves put within about
        # 2 f U64 cond(system) of each other, relative to the prediction's terms (Higham ch. 7). Measured over
        # 3,000 seeds: at most 1.004 U32 relative; the part past U32 |expected| under 0.001 U64 cond(system) terms
        terms = np.abs(qn - xn.mean(0)).sum(1).max() * np.abs(w).max() + np.abs(yn.mean(0)).max()
        solver = 2 * f * U64 * np.linalg.cond(system) * terms
        np.testing.assert_allclose(ridge.predict(alpha, query).double().numpy(), expected, rtol=U32, atol=solver)


def _knn_reference(bank: torch.Tensor, labels: list[int], classes: int, query: torch.Tensor, k: int) -> list[int]:
    out = []
    b = bank.double().numpy()
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    for q in query.double().numpy():
        q = q / np.linalg.norm(q)
        sims = [(float(b[i] @ q), i) for i in range(len(b))]
        top = sorted(sims, key=lambda t: (-t[0], t[1]))[:k]
        votes = [0.0] * classes
        for sim, i in top:
            votes[labels[i]] += math.exp((sim - top[0][0]) / KNN_TEMPERATURE)
        out.append(max(range(classes), key=lambda c: (votes[c], -c)))
    return out


def test_knn_matches_a_float64_reference_with_ties_to_the_smaller_index(generator: torch.Generator) -> None:
    bank = torch.randn(40, 6, generator=generator)
    bank = torch.cat([bank, bank[:5]])  # duplicate rows: equal similarities
    labels = torch.randint(0, 4, (45,), generator=generator)
    labels[40:] = (labels[:5] + 1) % 4  # the duplicates disagree with their originals
    query = torch.cat([torch.randn(20, 6, generator=generator), bank[:5] * 2.0])
    got = knn_predict(bank, _classes(labels, 4), query, k=3).argmax(1).tolist()
    assert got == _knn_reference(bank, labels.tolist(), 4, query, 3)
    # one neighbour: an exact duplicate pair votes for the smaller bank index
    assert knn_predict(bank, _classes(labels, 4), bank[:5], k=1).argmax(1).tolist() == labels[:5].tolist()
    values = Targets("regression", torch.arange(45, dtype=torch.float32)[:, None], ["v"])
    mean = knn_predict(bank, values, query[:3], k=45)
    assert torch.all((mean >= 0) & (mean <= 44))


def test_linear_probe_learns_what_is_learnable_and_nothing_else(generator: torch.Generator) -> None:
    x, labels = _blobs(600, 16, 4, 4.0, generator)
    result = run_frozen("linear", *_splits(x, _classes(labels, 4)), CFG)
    # measured 100 % on each of 170 runs (85 seeds, 2 probe seeds); 95 % allows 4 errors of 90 test images
    assert result["mean"] > 95 and result["metric"] == "accuracy" and len(result["runs"]) == 2
    assert result["selection"]["picked"] == {"lr": 1e-2, "l2": 1e-4}
    noise = torch.randint(0, 4, (600,), generator=generator)
    # test labels independent of everything the head sees: each run's correct count is binomial(90, 1/4), and a
    # mean of 45 % needs a run with >= 41 correct: probability <= 2 * 1.8e-5 (measured at most 36.7 %, 85 seeds)
    assert run_frozen("linear", *_splits(x, _classes(noise, 4)), CFG)["mean"] < 45


def test_regression_heads_recover_a_linear_target(generator: torch.Generator) -> None:
    x = torch.randn(500, 12, generator=generator)
    y = x @ torch.randn(12, 1, generator=generator) * 5 + 40 + 0.1 * torch.randn(500, 1, generator=generator)
    targets = Targets("regression", y, ["age"], "years")
    # measured over 85 seeds: ridge MAE at most 0.095 (the 0.1 noise alone: 0.1 sqrt(2 / pi) = 0.080); MLP at
    # most 0.070 and k-NN at most 0.58 of the spread, the MAE of predicting the mean. Bounds about 3x (ridge,
    # MLP); k-NN must beat the mean (1.7x)
    ridge = run_frozen("linear", *_splits(x, targets), CFG)
    assert ridge["mean"] < 0.3 and ridge["std"] == 0.0 and "alpha_per_row" in ridge["selection"]["picked"]
    mlp = run_frozen("mlp", *_splits(x, targets), CFG)
    spread = float((y - y.mean()).abs().mean())
    assert mlp["mean"] < 0.2 * spread and len({r["test"] for r in mlp["runs"]}) == 2  # seeds differ
    knn = run_frozen("knn", *_splits(x, targets), CFG)
    assert knn["mean"] < spread
    with pytest.raises(ValueError, match="does not apply"):
        run_frozen("mlp", *_splits(x, _classes((y[:, 0] > 40).long(), 2)), CFG)


# ---------------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("n", [50, 8], ids=["covariance", "gram"])
def test_pca_matches_numpy_svd(n: int, generator: torch.Generator) -> None:
    x = torch.randn(n, 20, generator=generator) @ torch.randn(20, 20, generator=generator)
    mean, components = fit_pca(x, max_components=5)
    assert components.shape == (20, min(5, n - 1))
    _, s, vt = np.linalg.svd(x.double().numpy() - x.double().numpy().mean(0), full_matrices=False)
    k = components.shape[1]
    # float32 unit components: each entry rounded by <= U32 relative moves a product with a unit vector by
    # <= U32 (Cauchy-Schwarz); one more U32 for eigh and SVD agreeing only to float64 noise. Measured: at most
    # 0.58 U32 over 4,000 matrices of both shapes
    np.testing.assert_allclose(np.abs(vt[:k] @ components.double().numpy()), np.eye(k), rtol=0, atol=2 * U32)
    # the variances along the components (float64 here) are the covariance's eigenvalues, largest first:
    # c^T S c with c off by <= U32 relative per entry is lambda (1 +- 2 U32) + O(U32^2 lambda_max); one more U32
    # for float64 noise. Measured: at most 1.16 U32 relative over 4,000 matrices
    variances = ((x.double() - mean.double()) @ components.double()).var(0).numpy()
    np.testing.assert_allclose(variances, s[:k] ** 2 / (n - 1), rtol=3 * U32, atol=0)
    with pytest.raises(ValueError, match="at least 2"):
        fit_pca(x[:1])


def test_baseline_descriptors(generator: torch.Generator) -> None:
    images = [np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8) for i in range(3)]
    raw = baseline_features("raw", images)
    assert raw.shape == (3, 64 * 64) and 0 <= float(raw.min()) and float(raw.max()) <= 1
    assert baseline_features("hog", images).shape == (3, 1764)
    lbp = baseline_features("lbp", images)
    assert lbp.shape == (3, 16 * 59)
    # counts over a 16 x 16 cell divided by 256: multiples of 1/256, whose float32 partial sums are exact
    assert torch.equal(lbp.view(3, 16, 59).sum(-1), torch.ones(3, 16))
    flat = baseline_features("lbp", [np.full((64, 64, 3), 90, dtype=np.uint8)]).view(16, 59)
    assert torch.all(flat[[5, 6, 9, 10]].max(1).values == 1.0)  # a constant image: one code off the border
    assert len(set(flat.argmax(1).tolist())) == 1
    with pytest.raises(ValueError, match="baseline must be one of"):
        baseline_features("sift", images)
    with pytest.raises(ValueError, match="multiple of 16"):
        baseline_features("hog", images, size=40)


# ---------------------------------------------------------------------------------------------- features
class _CountingImages(ImageSet):
    """Wraps an image set; records the reads between feature calls."""

    def __init__(self, base: ImageSet) -> None:
        self.base, self.keys, self.reads = base, base.keys, []

    def read(self, index: int) -> np.ndarray:
        self.reads.append(index)
        return self.base.read(index)


def test_features_are_streamed_batch_by_batch_and_equal_one_big_batch() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (23, 20, 18), dtype=np.uint8)
    images = _CountingImages(ArrayImages(pixels))
    extractor = EncoderExtractor(load_encoder("random:tiny"))
    held: list[int] = []
    original = extractor.features

    def spy(batch, pools):
        held.append(len(images.reads) - sum(held))
        return original(batch, pools)

    extractor.features = spy  # type: ignore[method-assign]
    small = extract_features(extractor, images, ["cls", "mean", "tokens"], batch_size=5)
    assert held == [5, 5, 5, 5, 3] and images.reads == list(range(23))  # never more than a batch decoded
    big = extract_features(EncoderExtractor(extractor.encoder), ArrayImages(pixels), ["cls", "mean", "tokens"],
                           batch_size=64)
    for pool in ("cls", "mean", "tokens"):
        # two float32 forward passes differing at most in summation order: each is within E of the float64
        # forward, so within 2 E of each other. E measured at most 8.3 U32 max|feature| over 40 inputs (the
        # random tiny encoder in float64 as the truth); the bound is 4x 2 E
        atol = 64 * U32 * float(big[pool].abs().max())
        torch.testing.assert_close(small[pool], big[pool], rtol=0, atol=atol)
    assert small["cls"].shape == (23, 32) and small["tokens"].shape == (23, 16 * 32)
    assert extractor.encoder.model.training  # the encoder's mode is given back
    rows = BaselineExtractor("pca")
    feats = extract_features(rows, ArrayImages(pixels), ["pca"])["pca"]
    projected = rows.fit_transform("pca", feats, torch.arange(20))
    assert projected.shape == (23, 19)


def test_token_grids_are_average_pooled_to_at_most_8x8() -> None:
    tokens = torch.randn(2, 1 + 16 * 16, 3)
    pooled = pool_tokens(tokens, 1, "tokens")
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 3, 16, 16)
    expected = grid.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    # two float32 means of the same 4 values, summed in any order: each within gamma(3) max|x| of the exact one
    torch.testing.assert_close(pooled, expected.flatten(1), rtol=0, atol=2 * gamma(3) * float(tokens.abs().max()))
    small = torch.randn(2, 1 + 16, 3)
    assert torch.equal(pool_tokens(small, 1, "tokens"), small[:, 1:].transpose(1, 2).flatten(1))  # 4 x 4: kept
    assert torch.equal(pool_tokens(small, 1, "cls"), small[:, 0])
    # means of 16 values, in any order: gamma(15) max|x| each
    torch.testing.assert_close(pool_tokens(small, 1, "mean"), small[:, 1:].mean(1), rtol=0,
                               atol=2 * gamma(15) * float(small.abs().max()))
    with pytest.raises(ValueError, match="has none"):
        pool_tokens(small, 0, "cls")
    with pytest.raises(ValueError, match="square patch grid"):
        pool_tokens(torch.randn(1, 1 + 12, 3), 1, "tokens")
