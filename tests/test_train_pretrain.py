"""The real PaCoFR (demo size) in the trainer on the packaged demo faces, the CLI, and the timm export."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import Subset, default_collate

from pacofr import checkpoint as ckpt
from pacofr.cli import main
from pacofr.data import demo_dataset
from pacofr.data.batch_augment import uint8_to_unit
from pacofr.models import PaCoFR
from pacofr.models.vit import normalised_images
from pacofr.train.config import load_config
from pacofr.train.export import export_encoder
from pacofr.train.seeding import seed_everything
from pacofr.train.trainer import TrainResult, Trainer


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _train(out_dir: Path, n_images: int, overrides: list[str], resume: Path | None = None) -> tuple[Trainer, TrainResult]:
    cfg = load_config("demo", [f"train.out_dir={out_dir}", "train.batch_size=8", "train.log_every=1",
                               "train.progress=false", "train.viz_every=0", "train.ckpt_every=0",
                               "model.backend=torch", *overrides])
    dataset = Subset(demo_dataset(image_size=cfg.model.img_size), range(n_images))
    seed_everything(cfg.train.seed)
    trainer = Trainer(cfg, PaCoFR(cfg.model), dataset, recipe={"size": 224, "detector": "mtcnn"})
    return trainer, trainer.fit(resume_from=resume)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, TrainResult]:
    # 32 faces, batch 8: 4 steps per epoch, incubation in epoch 0, then 2 end-to-end epochs; the relation
    # consistency term, so that there is an EMA teacher to export
    return _train(tmp_path_factory.mktemp("paco"), 32, ["train.epochs=3", "train.warmup_epochs=0.5",
                                                        "train.base_lr=0.032", "model.sc=relation"])


def _rec_masked_per_batch(model: PaCoFR, trainer: Trainer, mask_seed: int) -> list[float]:
    """``loss/rec_masked`` (end-to-end forward, no gradient) of the run's faces as stored (no augmentation),
    in batches of 8, with masks drawn from ``mask_seed``."""
    faces = trainer.dataset.dataset
    losses = []
    with torch.no_grad():
        for start in range(0, len(faces), 8):
            batch = default_collate([faces[i] for i in range(start, start + 8)])
            out = model(uint8_to_unit(batch["image"]), trainer.region_fn(batch), incubation=False,
                        generator=torch.Generator().manual_seed(mask_seed))
            losses.append(out.losses["rec_masked"].item())
    return losses


def test_short_real_run_reduces_the_reconstruction_loss(short_run: tuple[Trainer, TrainResult]) -> None:
    trainer, result = short_run
    rows = _rows(result.scalars)
    assert len(rows) == 12
    # The control: the run's initial weights (same seed, same constructor) on the same faces and masks.
    # Its losses over 4 batches x 2 mask draws scatter by `noise` (batches and masks alone); a mean over
    # the 4 batches has a standard error of noise / 2, the gap of two such means noise / sqrt(2).
    # Learning must put the trained model below its initialisation by 3 of those (a 3-sigma, one-sided
    # test), not by a fixed factor. Measured: gap 0.58, noise 0.069 (batch to batch, so the bound is
    # conservative for these paired means): 8.4 noise against the 2.1 required; untrained, the gap is 0.
    seed_everything(trainer.cfg.train.seed)
    initial = PaCoFR(trainer.cfg.model).train()
    before = _rec_masked_per_batch(initial, trainer, mask_seed=0)
    noise = statistics.stdev(before + _rec_masked_per_batch(initial, trainer, mask_seed=1))
    after = _rec_masked_per_batch(trainer.model.train(), trainer, mask_seed=0)
    gap = statistics.mean(before) - statistics.mean(after)
    assert gap > 3 * noise / math.sqrt(2), (before, after, noise)
    assert all(r["loss/bp"] for r in rows[:4]) and not any(r["loss/bp"] for r in rows[4:])  # incubation only
    assert all(r["loss/align"] for r in rows[4:])
    assert float(rows[-1]["stat/perplexity"]) > 1.0
    assert result.loss_curve.stat().st_size > 0 and result.reconstructions.stat().st_size > 0


def test_export_loads_in_timm_with_identical_features(short_run: tuple[Trainer, TrainResult], tmp_path: Path) -> None:
    trainer, result = short_run
    model = trainer.model.eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    inputs = normalised_images(images, trainer.cfg.model)
    with torch.no_grad():
        expected = {"student": model.encoder.forward_features(inputs),
                    "teacher": model.teacher.forward_features(inputs)}

    for which in ("student", "teacher"):
        out = export_encoder(result.checkpoint, tmp_path / which, teacher=which == "teacher")
        config = json.loads(out.config.read_text())
        assert config["architecture"] == "vit_tiny_patch16_224"
        assert config["pretrained_cfg"]["mean"] == list(trainer.cfg.model.pixel_mean)
        assert config["pretrained_cfg"]["input_size"] == [3, 64, 64]
        assert config["alignment_recipe"] == {"size": 224, "detector": "mtcnn"}
        assert config["pacofr"]["step"] == 12 and config["pacofr"]["encoder"] == which

        # 1) timm's own loader of a local folder
        by_folder = timm.create_model(f"local-dir:{out.out_dir}", pretrained=True).eval()
        assert tuple(by_folder.pretrained_cfg["mean"]) == trainer.cfg.model.pixel_mean
        # 2) the architecture + kwargs + load_state_dict route
        by_args = timm.create_model(out.architecture, pretrained=False, **out.model_args).eval()
        by_args.load_state_dict(load_file(out.weights), strict=True)
        with torch.no_grad():
            for timm_model in (by_folder, by_args):
                assert torch.equal(timm_model.forward_features(inputs), expected[which])
    assert not torch.equal(expected["student"], expected["teacher"])  # two different exports


@pytest.mark.parametrize("codebook", [[], ["model.dead_code_warmup=1", "model.dead_code_threshold=0.5"]],
                         ids=["default", "restarts"])
def test_real_model_resumes_exactly_across_the_end_of_incubation(tmp_path: Path, codebook: list[str]) -> None:
    # 24 faces, batch 8: 3 steps per epoch; stop at step 2 (inside incubation), resume to step 6
    common = ["train.epochs=2", "train.warmup_epochs=0.5", "train.base_lr=0.032", *codebook]
    full, full_result = _train(tmp_path / "full", 24, [*common, "train.max_steps=6"])
    _, part_result = _train(tmp_path / "part", 24, [*common, "train.max_steps=2"])
    resumed, resumed_result = _train(tmp_path / "part", 24, [*common, "train.max_steps=6"], resume=tmp_path / "part")
    full_rows, joined = _rows(full_result.scalars), _rows(resumed_result.scalars)
    assert [int(r["step"]) for r in joined] == list(range(1, 7))
    loss_keys = [k for k in full_rows[0] if k.startswith(("loss", "stat/")) or k in ("lr", "grad_norm")]
    for key in loss_keys:
        assert [r[key] for r in joined] == [r[key] for r in full_rows], key
    if codebook:  # dead codes were re-seeded (random candidates) after the resume too
        assert sum(float(r["stat/restarted_codes"]) for r in joined[2:]) > 0
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_pretrain_resume_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    quick = ["--set", "train.batch_size=8", "--set", "train.progress=false", "--set", "train.epochs=2",
             "--set", "train.num_viz=4"]
    assert main(["pretrain", "--config", "demo", "--out", str(out), "--set", "train.max_steps=2", *quick]) == 0
    printed = capsys.readouterr().out
    assert str(out / "checkpoints" / "step_00000002") in printed and "loss_curve.png" in printed
    for name in ("config.yaml", "scalars.csv", "loss_curve.png", "reconstructions.png"):
        assert (out / name).stat().st_size > 0, name
    # resume with the config stored in the checkpoint, running one more step
    assert main(["pretrain", "--resume", str(out), "--set", "train.max_steps=3"]) == 0
    assert ckpt.load_checkpoint(out).step == 3
    assert [int(r["step"]) for r in _rows(out / "scalars.csv")] == [2, 3]  # log_every=2 in the demo config
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").exists()
    # errors are reported in one line, not raised
    capsys.readouterr()
    assert main(["pretrain", "--config", "demo", "--set", "train.epochs=zero"]) == 2
    assert "error: --set train.epochs=zero: train.epochs: expected an integer, got 'zero'" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(tmp_path / "nothing-here")]) == 2
    assert "error: no checkpoint found" in capsys.readouterr().err
    assert main(["pretrain", "--config", "vit_base", "--out", str(tmp_path / "b")]) == 2
    assert "error: data.root is not set" in capsys.readouterr().err


def test_cli_mae_control(tmp_path: Path) -> None:
    out = tmp_path / "mae"
    assert main(["pretrain", "--config", "demo", "--method", "mae", "--out", str(out), "--set", "train.max_steps=1",
                 "--set", "train.batch_size=8", "--set", "train.progress=false", "--set", "train.num_viz=2"]) == 0
    meta = ckpt.load_checkpoint(out).meta
    assert meta["config"]["model"]["method"] == "mae" and meta["pacofr_version"]
    assert meta["alignment_recipe"]["detector"] == "mtcnn"
