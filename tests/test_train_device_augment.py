"""The trainer with uint8 items: augmentation of each batch on the device, kept in the checkpoint."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch
from _train_standin import IMG, StandInModel, region_fn, tiny_config
from torch.utils.data import Dataset

from pacofr.train.trainer import Trainer


class TinyUint8Faces(Dataset):
    """``n`` deterministic uint8 (3, 8, 8) images with five landmarks, not augmented (as
    ``uint8=True`` datasets give them)."""

    def __init__(self, n: int = 40) -> None:
        generator = torch.Generator().manual_seed(4321)
        self.images = torch.randint(0, 256, (n, 3, IMG, IMG), dtype=torch.uint8, generator=generator)
        self.landmarks = torch.rand(n, 5, 2, generator=generator) * (IMG - 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.images[index], "landmarks": self.landmarks[index], "index": index}


def _run(out_dir: Path, augment: bool = True, resume: Path | None = None, **train: object):
    cfg = tiny_config(str(out_dir), **train)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=augment))
    torch.manual_seed(cfg.train.seed)  # the model is built identically for every run
    trainer = Trainer(cfg, StandInModel(), TinyUint8Faces(), region_fn=region_fn)
    return trainer, trainer.fit(resume_from=resume)


def _losses(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        return [row["loss"] for row in csv.DictReader(handle)]


def test_resume_mid_epoch_continues_the_augmentation_stream(tmp_path: Path) -> None:
    full, full_result = _run(tmp_path / "full", max_steps=14, epochs=3)
    part, part_result = _run(tmp_path / "part", max_steps=7, epochs=3)  # stops inside epoch 1
    assert part.batch_augment is not None and part.state.batch_in_epoch > 0
    _, resumed_result = _run(tmp_path / "part2", max_steps=14, epochs=3, resume=tmp_path / "part")
    joined = _losses(part_result.scalars) + _losses(resumed_result.scalars)
    assert joined == _losses(full_result.scalars)  # bit for bit (repr floats)
    _, plain = _run(tmp_path / "plain", augment=False, max_steps=14, epochs=3)
    assert _losses(plain.scalars) != _losses(full_result.scalars)  # the augmentation did change the batches
