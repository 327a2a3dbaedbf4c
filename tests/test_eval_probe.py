"""Linear probe and labelled-set reading: the probe learns what is learnable and nothing else."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from pacofr.eval.features import load_image, pool_tokens
from pacofr.eval.labelled import SPLIT_FRACTIONS, load_labelled, split_of
from pacofr.eval.linear_probe import ProbeConfig, run_probe
from pacofr.eval.metrics import SeedRun, best_of, summarise
from pacofr.models.vit import normalise_pixels

CFG = ProbeConfig(epochs=30, lr=5e-2, batch_size=64, seeds=(0, 1))


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, dim: int, classes: int, separation: float, gen: torch.Generator):
    centres = torch.randn(classes, dim, generator=gen) * separation
    labels = torch.randint(0, classes, (n,), generator=gen)
    feats = centres[labels] + torch.randn(n, dim, generator=gen)
    return feats, labels


def _by_split(feats: torch.Tensor, labels: torch.Tensor):
    n = feats.shape[0]
    a, b = int(0.7 * n), int(0.85 * n)
    cut = {"train": slice(0, a), "val": slice(a, b), "test": slice(b, n)}
    return {s: feats[c] for s, c in cut.items()}, {s: labels[c] for s, c in cut.items()}


def test_probe_separates_separable_classes(generator: torch.Generator) -> None:
    feats, labels = _blobs(600, 16, 4, separation=4.0, gen=generator)
    result = run_probe(*_by_split(feats, labels), num_classes=4, multi_label=False, cfg=CFG)
    assert result["final_test_mean"] > 0.95
    assert len(result["runs"]) == 2 and result["split_sizes"]["test"] == 90


def test_probe_is_at_chance_on_random_labels(generator: torch.Generator) -> None:
    feats = torch.randn(600, 16, generator=generator)
    labels = torch.randint(0, 4, (600,), generator=generator)
    result = run_probe(*_by_split(feats, labels), num_classes=4, multi_label=False, cfg=CFG)
    assert result["final_test_mean"] < 0.45  # chance is 0.25; 90 test samples


def test_multi_label_probe(generator: torch.Generator) -> None:
    feats = torch.randn(600, 8, generator=generator)
    labels = torch.stack([(feats[:, 0] > 0), (feats[:, 1] + feats[:, 2] > 0)], 1).float()
    result = run_probe(*_by_split(feats, labels), num_classes=2, multi_label=True, cfg=CFG)
    assert result["final_test_mean"] > 0.9


def test_split_is_stable_and_close_to_the_fractions() -> None:
    keys = [f"id{i // 10}/img{i}.jpg" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in reversed(keys)][::-1]
    for name, frac in SPLIT_FRACTIONS.items():
        assert abs(splits.count(name) / len(keys) - frac) < 0.03


def test_folder_and_csv_layouts(tmp_path) -> None:
    for cls in ("alice", "bob"):
        (tmp_path / "faces" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "faces" / cls / f"{i}.png")
    folder = load_labelled(tmp_path / "faces")
    assert folder.class_names == ["alice", "bob"] and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    csv_path = tmp_path / "attrs.csv"
    csv_path.write_text("path,labels\nfaces/alice/0.png,smile;glasses\nfaces/bob/1.png,glasses\n")
    multi = load_labelled(csv_path)
    assert multi.multi_label and multi.class_names == ["glasses", "smile"]
    assert multi.labels.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,a\n")
    with pytest.raises(ValueError, match="needs a header with 'path'"):
        load_labelled(bad)
    with pytest.raises(ValueError, match="folder of class sub-folders or a .csv"):
        load_labelled(tmp_path / "missing")


def test_pooling() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(pool_tokens(tokens, 1, "cls"), tokens[:, 0])
    assert torch.allclose(pool_tokens(tokens, 1, "mean"), tokens[:, 1:].mean(1))
    assert pool_tokens(tokens, 1, "cls+mean").shape == (2, 6)
    with pytest.raises(ValueError, match="has none"):
        pool_tokens(tokens, 0, "cls")


def test_best_epoch_comes_from_val_and_the_earliest_tie_wins() -> None:
    assert best_of([0.5, 0.75, 0.75, 0.6]) == (0.75, 2)
    assert best_of([float("nan"), 0.4]) == (0.4, 2)
    value, epoch = best_of([float("nan")] * 3)
    assert math.isnan(value) and epoch == 0


def test_summary_is_final_epoch_mean_and_population_std() -> None:
    runs = [SeedRun(seed=s, final_test=t, final_test_loss=0.1 * s, final_val=0.5, best_val=0.9, best_val_epoch=3)
            for s, t in enumerate((0.5, 0.75, 1.0))]
    summary = summarise(runs, {"train": 1, "val": 1, "test": 4}, {})
    assert summary["final_test_mean"] == pytest.approx(0.75)
    assert summary["final_test_std"] == pytest.approx((2 * 0.25**2 / 3) ** 0.5)
    assert summary["best_val_mean"] == pytest.approx(0.9) and summary["seeds"] == [0, 1, 2]
    with pytest.raises(ValueError, match="at least one"):
        summarise([], {}, {})


def test_grey_images_are_replicated_resized_and_normalised(tmp_path) -> None:
    Image.new("L", (5, 5), color=51).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png", 8)
    assert image.shape == (3, 8, 8) and torch.allclose(image, torch.full_like(image, 0.2))
    out = normalise_pixels(image[None], mean=(0.1, 0.2, 0.3), std=(0.5, 1.0, 2.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.2, 0.0, -0.05]))
