"""``train.total_steps``: a run and its learning-rate schedule of exactly that many steps, whatever the epochs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from _train_standin import StandInModel, TinyFaces, region_fn, tiny_config

from pacofr.train.trainer import Trainer


def _fit(out_dir: Path, **train: object) -> tuple[Trainer, list[dict[str, str]]]:
    cfg = tiny_config(str(out_dir), **train)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, StandInModel(), TinyFaces(40), region_fn=region_fn)
    result = trainer.fit()
    with open(result.scalars, newline="") as handle:
        return trainer, list(csv.DictReader(handle))


def test_total_steps_sets_the_length_of_the_run_and_of_its_schedule(tmp_path: Path) -> None:
    # 40 images of batch 4: 10 steps per epoch; 23 steps run into a third epoch, past epochs=1
    trainer, rows = _fit(tmp_path, epochs=1, total_steps=23, warmup_epochs=0.5, base_lr=0.256)
    assert trainer.total_steps == 23 and trainer.state.step == 23 and trainer.state.epoch == 2
    assert [int(r["step"]) for r in rows] == list(range(1, 24))
    assert [float(r["lr"]) for r in rows] == pytest.approx([trainer.schedule.lr_at(s) for s in range(23)])
    assert trainer.schedule.lr_at(22) < 0.02 * trainer.schedule.peak_lr  # the cosine reaches its end
    assert {r["stat/incubation"] for r in rows[:10]} == {"1.0"} and {r["stat/incubation"] for r in rows[10:]} == {"0.0"}
    cut, cut_rows = _fit(tmp_path / "cut", epochs=1, total_steps=23, max_steps=7, warmup_epochs=0.5, base_lr=0.256)
    assert cut.state.step == 7 and [r["lr"] for r in cut_rows] == [r["lr"] for r in rows[:7]]
    with pytest.raises(ValueError, match="total_steps must be >= 0"):
        tiny_config(str(tmp_path), total_steps=-1)
