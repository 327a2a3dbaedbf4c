"""The training loop with a tiny stand-in model: exact resume, NaN handling, accumulation, outputs."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch

from _train_standin import StandInModel, TinyFaces, region_fn, tiny_config
from pacofr import checkpoint as ckpt
from pacofr.train.trainer import NonFiniteLossError, Trainer


def _run(out_dir: Path, *, model_kwargs: dict | None = None, resume: Path | None = None, dataset_size: int = 40,
         overwrite: bool = False, **train: object):
    cfg = tiny_config(str(out_dir), **train)
    torch.manual_seed(cfg.train.seed)  # the model is built identically for every run
    model = StandInModel(**(model_kwargs or {}))
    trainer = Trainer(cfg, model, TinyFaces(dataset_size), region_fn=region_fn, recipe={"size": 8})
    return trainer, trainer.fit(resume_from=resume, overwrite=overwrite)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resume_mid_epoch_gives_the_uninterrupted_run(tmp_path: Path) -> None:
    # 40 images, batch 4, accumulation 2 -> 5 optimiser steps per epoch; incubation in epoch 0.
    common = dict(accum_steps=2, epochs=3)
    full, full_result = _run(tmp_path / "full", max_steps=14, **common)
    part, part_result = _run(tmp_path / "part", max_steps=7, **common)  # stops inside epoch 1
    assert part.state.epoch == 1 and part.state.batch_in_epoch == 4
    resumed, resumed_result = _run(tmp_path / "part2", max_steps=14, resume=tmp_path / "part", **common)

    full_rows = _rows(full_result.scalars)
    part_rows = _rows(part_result.scalars)
    resumed_rows = _rows(resumed_result.scalars)
    assert [int(r["step"]) for r in full_rows] == list(range(1, 15))
    joined = part_rows + resumed_rows
    assert [int(r["step"]) for r in joined] == list(range(1, 15))
    for key in ("loss", "loss/rec", "loss/align", "lr", "grad_norm", "stat/seen", "stat/incubation"):
        assert [r[key] for r in joined] == [r[key] for r in full_rows], key  # bit-for-bit (repr floats)
    assert {r["stat/incubation"] for r in full_rows[:5]} == {"1.0"}
    assert {r["stat/incubation"] for r in full_rows[5:]} == {"0.0"}
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_the_scalars_file_of_the_same_run(tmp_path: Path) -> None:
    _run(tmp_path, max_steps=3, ckpt_every=1, keep_last=5)
    # resume from the step-2 checkpoint: rows after step 2 are replaced, not duplicated
    _, result = _run(tmp_path, max_steps=5, resume=tmp_path / "checkpoints" / "step_00000002", keep_last=5)
    assert [int(r["step"]) for r in _rows(result.scalars)] == [1, 2, 3, 4, 5]


def test_loss_decreases_and_outputs_are_written(tmp_path: Path) -> None:
    trainer, result = _run(tmp_path, epochs=6, viz_every=10, model_kwargs={"random": False})
    rows = _rows(result.scalars)
    losses = [float(r["loss/rec"]) for r in rows]
    assert len(rows) == trainer.total_steps == 60
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert result.loss_curve is not None and result.loss_curve.stat().st_size > 0
    assert result.reconstructions is not None and result.reconstructions.stat().st_size > 0
    assert (tmp_path / "viz" / "step_00000010.png").exists()
    assert (tmp_path / "config.yaml").exists()
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded.step == 60 and loaded.meta["alignment_recipe"] == {"size": 8}
    for key in ("images_per_s", "peak_mem_mb", "grad_norm", "lr"):
        assert math.isfinite(float(rows[-1][key])) and float(rows[-1][key]) > 0, key


def test_learning_rate_follows_the_schedule(tmp_path: Path) -> None:
    trainer, result = _run(tmp_path, epochs=2, batch_size=4, warmup_epochs=1.0, base_lr=0.256)
    rows = _rows(result.scalars)
    peak = 0.256 * 4 / 256
    assert trainer.schedule.peak_lr == pytest.approx(peak)
    expected = [trainer.schedule.lr_at(s) for s in range(trainer.total_steps)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected)
    assert float(rows[9]["lr"]) == pytest.approx(peak)  # end of the 10-step warm-up


def _grads_of_first_step(tmp_path: Path, **train: object) -> list[torch.Tensor]:
    cfg = tiny_config(str(tmp_path), max_steps=1, **train)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, StandInModel(random=False), TinyFaces(8), region_fn=region_fn)
    grads: list[torch.Tensor] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.extend(p.grad.clone() for g in opt.param_groups for p in g["params"]))
    trainer.fit()
    return grads


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    big = _grads_of_first_step(tmp_path / "big", batch_size=8, accum_steps=1, clip_grad=0.0)
    accumulated = _grads_of_first_step(tmp_path / "acc", batch_size=4, accum_steps=2, clip_grad=0.0)
    assert len(big) == len(accumulated) > 0
    for a, b in zip(big, accumulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_with_the_step_and_terms_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"optimiser step 3 .*loss=nan.*loss/rec="):
        _run(tmp_path, ckpt_every=1, model_kwargs={"nan_on_calls": (3,)})
    checkpoints = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000003"]  # keep_last=2; none at 4
    weights = ckpt.load_checkpoint(checkpoints[-1])
    assert weights.step == 3


def test_nan_loss_is_skipped_up_to_the_limit(tmp_path: Path) -> None:
    trainer, result = _run(tmp_path, epochs=1, skip_nonfinite=2, model_kwargs={"nan_on_calls": (1, 4)})
    rows = _rows(result.scalars)
    assert trainer.state.step == 10 and trainer.state.skipped_nonfinite == 2
    assert trainer.model.discarded == 2  # the skipped steps' forwards never reach the codebook
    assert trainer.model.recorded == 10  # every training forward was handed to the maintenance
    assert [r["skipped_nonfinite"] for r in rows][:6] == ["0", "1", "1", "1", "2", "2"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    with pytest.raises(NonFiniteLossError, match="skip_nonfinite=1"):
        _run(tmp_path / "again", epochs=1, skip_nonfinite=1, model_kwargs={"nan_on_calls": (1, 4)})


def test_too_small_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too few for one optimiser step"):
        _run(tmp_path, dataset_size=3, batch_size=4)


class _FacesWithUnreadable(TinyFaces):
    """Item 5 is 'unreadable': like pacofr's datasets, the next readable item is returned instead."""

    def __getitem__(self, index: int) -> dict:
        return super().__getitem__(6 if index == 5 else index)


def test_unreadable_images_are_counted_in_the_scalars_and_the_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path), epochs=2, log_every=5)
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, StandInModel(), _FacesWithUnreadable(40), region_fn=region_fn)
    result = trainer.fit()
    rows = _rows(result.scalars)
    counts = {int(r["step"]): int(r["skipped_images"]) for r in rows}  # 10 steps per epoch, logged every 5
    assert counts[10] == 1 and counts[20] == 2  # item 5 is met once per epoch
    assert counts[5] <= counts[10] <= counts[15] <= counts[20]
    assert ckpt.load_checkpoint(tmp_path).state["skipped_images"] == 2


def test_resuming_mid_epoch_with_another_batch_layout_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, max_steps=3)  # 10 steps per epoch: stops inside epoch 0
    with pytest.raises(ValueError, match=r"stopped inside an epoch.*batch_size"):
        _run(tmp_path, max_steps=6, batch_size=2, resume=tmp_path)


def test_a_fresh_run_refuses_a_folder_with_an_earlier_run_unless_overwrite(tmp_path: Path) -> None:
    _run(tmp_path, max_steps=3, ckpt_every=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(tmp_path, max_steps=2)
    assert [r["step"] for r in _rows(tmp_path / "scalars.csv")] == ["1", "2", "3"]  # untouched
    _, result = _run(tmp_path, max_steps=2, overwrite=True)
    assert [r["step"] for r in _rows(result.scalars)] == ["1", "2"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]


def test_resuming_from_an_older_checkpoint_abandons_the_later_ones(tmp_path: Path) -> None:
    _run(tmp_path, max_steps=6, ckpt_every=2, keep_last=3)
    older = tmp_path / "checkpoints" / "step_00000004"
    _, result = _run(tmp_path, max_steps=5, ckpt_every=2, keep_last=3, resume=older)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [
        "step_00000002", "step_00000004", "step_00000005"]
    assert ckpt.resolve_checkpoint(tmp_path) == result.checkpoint
    assert [r["step"] for r in _rows(result.scalars)] == ["1", "2", "3", "4", "5"]


def test_resuming_with_another_schedule_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(tmp_path, max_steps=2, ckpt_every=2)
    with caplog.at_level("WARNING", logger="pacofr.train.checkpointing"):
        _run(tmp_path, max_steps=3, epochs=5, resume=tmp_path)
    assert "learning-rate schedule differs" in caplog.text


def test_the_first_row_after_a_resume_from_an_odd_step_equals_the_uninterrupted_runs(tmp_path: Path) -> None:
    # log_every=2: the row at step 4 is the mean of steps 3 and 4, also when the run stopped at step 3
    _, full = _run(tmp_path / "full", max_steps=6, log_every=2)
    _run(tmp_path / "part", max_steps=3, log_every=2)
    _, resumed = _run(tmp_path / "part", max_steps=6, log_every=2, resume=tmp_path / "part")
    full_rows = {r["step"]: r for r in _rows(full.scalars)}
    resumed_rows = {r["step"]: r for r in _rows(resumed.scalars)}
    assert list(full_rows) == ["2", "4", "6"] and list(resumed_rows) == ["2", "3", "4", "6"]
    for step in ("2", "4", "6"):
        for key in ("loss", "loss/rec", "loss/align", "stat/seen", "lr", "grad_norm"):
            assert resumed_rows[step][key] == full_rows[step][key], (step, key)


def test_resume_skips_a_corrupted_newest_checkpoint_and_continues_from_the_intact_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, full = _run(tmp_path / "full", max_steps=6)
    _run(tmp_path / "run", max_steps=4, ckpt_every=2, keep_last=3)
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    weights = newest / ckpt.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-200:] = bytes(b ^ 0xFF for b in data[-200:])  # inside the tensor area
    weights.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        trainer, resumed = _run(tmp_path / "run", max_steps=6, ckpt_every=2, keep_last=3, resume=tmp_path / "run")
    assert "skipping checkpoint step_00000004: " in caplog.text and "does not match its checksum" in caplog.text
    assert trainer.state.step == 6
    assert [r["step"] for r in _rows(resumed.scalars)] == ["1", "2", "3", "4", "5", "6"]
    assert [r["loss"] for r in _rows(resumed.scalars)] == [r["loss"] for r in _rows(full.scalars)]
    assert ckpt.verify_checkpoint(newest)  # re-written by the continued run


def test_a_run_folder_in_use_is_refused_and_left_untouched(tmp_path: Path) -> None:
    from pacofr.train.lock import RunFolderLockedError, RunLock

    _run(tmp_path, max_steps=2, ckpt_every=1)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with RunLock(tmp_path):  # another writer holds the folder
        hidden_tmp = tmp_path / "checkpoints" / ".tmp-step_00000003-4242"
        hidden_tmp.mkdir()  # its in-progress save
        with pytest.raises(RunFolderLockedError, match=rf"in use by another pacofr run: pid {os.getpid()} on host"):
            _run(tmp_path, max_steps=4, overwrite=True)
        with pytest.raises(RunFolderLockedError):
            _run(tmp_path, max_steps=4, resume=tmp_path)
        assert hidden_tmp.is_dir()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == before
    assert [r["step"] for r in _rows(tmp_path / "scalars.csv")] == ["1", "2"]
    _run(tmp_path, max_steps=3, resume=tmp_path)  # free again once released


def test_a_min_lr_above_the_scaled_peak_is_refused(tmp_path: Path) -> None:
    from pacofr.train.fields import ConfigError

    # base_lr 0.05 at an effective batch of 4 peaks at 0.05 * 4 / 256 = 7.8e-4, below min_lr
    with pytest.raises(ConfigError, match=r"train.min_lr=0.01 exceeds the peak learning rate 0.000781"):
        _run(tmp_path, min_lr=0.01)
    assert not (tmp_path / "scalars.csv").exists()
