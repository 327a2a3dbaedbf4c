"""What a run folder, a checkpoint or an export may hold and what is refused, in one line, before any
work: a resume under another model, a newest checkpoint lacking a file, a meta.json or state.pt
lacking a part, an export whose config and weights disagree or whose weights are cut short or
not finite; and the files' permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from _cli_helpers import error_line
from pacofr import checkpoint as ckpt
from pacofr.cli import main
from pacofr.eval.encoders import load_encoder
from pacofr.models import build_model
from pacofr.train.config import PretrainConfig
from pacofr.train.export import export_encoder

QUICK = ["--set", "train.progress=false", "--set", "train.num_viz=2", "--set", "train.batch_size=8",
         "--set", "model.backend=torch"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo run of 2 steps with a checkpoint after each."""
    out = tmp_path_factory.mktemp("refusals") / "run"
    assert main(["pretrain", "--config", "demo", "--out", str(out), *QUICK, "--set", "train.max_steps=2",
                 "--set", "train.ckpt_every=1"]) == 0
    return out


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


def test_every_written_file_has_the_umask_mode(run_dir: Path, tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask  # what open() gives a new file
    newest = run_dir / "checkpoints" / "step_00000002"
    assert _modes(newest) == dict.fromkeys(_modes(newest), expected)
    assert "model.safetensors" in _modes(newest)
    exported = export_encoder(run_dir, tmp_path / "export").out_dir
    assert _modes(exported) == dict.fromkeys(["model.safetensors", "config.json", "alignment_recipe.json"], expected)


def _copy_run(run_dir: Path, target: Path) -> Path:
    shutil.copytree(run_dir, target)
    return target


def _rewrite_meta(folder: Path, change: Any) -> None:
    """Rewrite a checkpoint's meta.json through ``change`` and record its new checksum, as a writer
    that produced such a file would have (so only the content is at fault)."""
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    change(meta)
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))
    sums = json.loads((folder / ckpt.CHECKSUMS_FILE).read_text())
    sums["files"][ckpt.META_FILE] = {"size": (folder / ckpt.META_FILE).stat().st_size,
                                     "sha256": ckpt.file_sha256(folder / ckpt.META_FILE)}
    (folder / ckpt.CHECKSUMS_FILE).write_text(json.dumps(sums))


@pytest.mark.parametrize("missing", [ckpt.STATE_FILE, ckpt.WEIGHTS_FILE, ckpt.META_FILE])
def test_export_and_eval_refuse_a_newest_checkpoint_lacking_a_file(run_dir: Path, tmp_path: Path, missing: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    (run / "checkpoints" / "step_00000002" / missing).unlink()
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 2
    line = error_line(capsys)
    assert f"step_00000002 is incomplete: {missing} missing" in line, line
    assert not (tmp_path / "export").exists()
    with pytest.raises(FileNotFoundError, match=f"step_00000002 is incomplete: {missing} missing"):
        load_encoder(str(run))
    assert export_encoder(run / "checkpoints" / "step_00000001", tmp_path / "older").weights.is_file()


def test_a_meta_without_config_is_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    _rewrite_meta(run / "checkpoints" / "step_00000002", lambda meta: meta.pop("config"))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 2
    assert "meta.json holds no run config" in error_line(capsys)
    with pytest.raises(ckpt.CorruptCheckpointError, match="holds no run config"):
        load_encoder(str(run))


def test_a_renamed_checkpoint_is_not_taken_for_the_newest(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    shutil.copytree(run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000009")
    with pytest.raises(ckpt.CorruptCheckpointError, match="meta.json is of step 1, not of the step its name says"):
        ckpt.verify_checkpoint(run / "checkpoints" / "step_00000009")
    assert ckpt.find_intact_checkpoint(run) == run / "checkpoints" / "step_00000002"
    # resuming from step 1 abandons the genuine step 2, but never the renamed copy it did not take
    assert ckpt.remove_checkpoints_after(run / "checkpoints", 1) == [run / "checkpoints" / "step_00000002"]
    assert (run / "checkpoints" / "step_00000009").is_dir()


def test_export_refuses_weights_that_are_not_finite(run_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = ckpt.load_checkpoint(run_dir)
    model = build_model(PretrainConfig.from_dict(source.config).model)
    ckpt.load_weights(model, source)
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    directory = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(directory, model, dict(source.state), source.meta)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 2
    line = error_line(capsys)
    assert "weights hold NaN or inf (blocks.0.attn.qkv.weight)" in line, line
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("damage, expected", [
    ("config", "model.safetensors does not fit config.json"),
    ("truncate", "model.safetensors does not fit config.json .* or is damaged"),
    ("not-json", "config.json is not JSON"),
    ("architecture", "architecture 'not_a_model' is not a timm model"),
])
def test_eval_refuses_an_export_whose_files_disagree_in_one_line(run_dir: Path, tmp_path: Path, damage: str,
                                                                 expected: str) -> None:
    folder = export_encoder(run_dir, tmp_path / "export").out_dir
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if damage == "config":
        config["model_args"]["embed_dim"] = 2 * config["model_args"]["embed_dim"]
        config_path.write_text(json.dumps(config))
    elif damage == "architecture":
        config["architecture"] = "not_a_model"
        config_path.write_text(json.dumps(config))
    elif damage == "truncate":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        config_path.write_text("{not json")
    with pytest.raises(ValueError, match=expected) as info:
        load_encoder(str(folder))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("args, expected", [
    (["--config", "demo", "--set", "model.preset=tiny"], "model.img_size 64 -> 32"),
    (["--set", "model.r_mask=0.5"], "model.r_mask 0.75 -> 0.5"),
    (["--set", "model.mask_mode=region"], "model.mask_mode 'random' -> 'region'"),
    (["--set", "model.w_sc=0.2"], "model.w_sc 0.1 -> 0.2"),
])
def test_a_resume_under_other_model_settings_is_refused_before_anything_is_written(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["pretrain", "--resume", str(run), "--out", str(run), *QUICK, *args]) == 2
    line = error_line(capsys)
    assert "the run was trained with other model settings" in line and expected in line, line
    assert {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_may_change_where_the_ops_run(run_dir: Path, tmp_path: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    assert main(["pretrain", "--resume", str(run), "--out", str(run), *QUICK, "--set", "model.codebook_precision=ieee",
                 "--set", "train.max_steps=3"]) == 0
    assert (run / "checkpoints" / "step_00000003").is_dir()


def test_a_state_without_the_optimiser_is_one_line(run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    source = ckpt.load_checkpoint(run_dir)
    model = build_model(PretrainConfig.from_dict(source.config).model)
    ckpt.load_weights(model, source)
    state = {key: value for key, value in source.state.items() if key != "optimizer"}
    run = tmp_path / "run"
    ckpt.save_checkpoint(run / "checkpoints", model, state, source.meta)  # checksums fit: only the content is at fault
    assert main(["pretrain", "--resume", str(run), "--out", str(run), *QUICK, "--set", "train.max_steps=3"]) == 2
    line = error_line(capsys)
    assert "state.pt holds no 'optimizer'" in line, line
