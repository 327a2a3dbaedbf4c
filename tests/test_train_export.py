"""`pacofr export` refuses targets it could damage and checkpoints that are corrupted; evaluation refuses them too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _cli_helpers import error_line
from pacofr import checkpoint as ckpt
from pacofr.cli import main
from pacofr.eval.encoders import load_encoder
from pacofr.train.export import EXPORT_CONFIG, EXPORT_WEIGHTS, ExportTargetError, export_encoder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["pretrain", "--config", "demo", "--out", str(out), "--set", "train.max_steps=2",
                 "--set", "train.batch_size=8", "--set", "train.progress=false", "--set", "train.num_viz=2",
                 "--set", "train.ckpt_every=1", "--set", "model.backend=torch"]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_into_the_checkpoints_is_refused_and_they_stay_intact(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoints = run_dir / "checkpoints"
    newest = checkpoints / "step_00000002"
    before = _snapshot(run_dir)
    link = tmp_path / "link"
    link.symlink_to(newest)
    for target in (newest, checkpoints, newest / "sub", checkpoints / "export", link, newest / ".." / "step_00000001"):
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(target)]) == 2
        line = error_line(capsys)
        assert f"--out {target} lies inside" in line and "training checkpoints" in line, line
    assert _snapshot(run_dir) == before
    assert all(ckpt.verify_checkpoint(path) for path in ckpt.list_checkpoints(checkpoints))


def test_an_existing_file_or_foreign_folder_is_refused(run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"precious")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(a_file)]) == 2
    assert "is an existing file" in error_line(capsys)
    assert a_file.read_bytes() == b"precious"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for target in (other, run_dir):
        before = _snapshot(target)
        with pytest.raises(ExportTargetError, match="already holds files that are not an earlier export"):
            export_encoder(run_dir, target)
        assert _snapshot(target) == before


def test_a_new_or_empty_folder_and_an_earlier_export_are_accepted(run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    first = export_encoder(run_dir, empty)
    assert json.loads(first.config.read_text())["pacofr"]["step"] == 2
    again = export_encoder(run_dir / "checkpoints" / "step_00000001", empty)  # replaces the earlier export
    assert json.loads(again.config.read_text())["pacofr"]["step"] == 1
    assert sorted(p.name for p in empty.iterdir()) == ["alignment_recipe.json", EXPORT_CONFIG, EXPORT_WEIGHTS]
    assert export_encoder(run_dir, tmp_path / "new" / "deeper").weights.is_file()


def test_export_and_evaluation_refuse_a_corrupted_checkpoint_in_one_line(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    newest = copy / "checkpoints" / "step_00000002"
    shutil.copytree(run_dir / "checkpoints" / "step_00000002", newest)
    weights = newest / ckpt.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-400:] = bytes(b ^ 0x55 for b in data[-400:])  # flipped bytes in the tensor area
    weights.write_bytes(bytes(data))
    assert main(["export", "--checkpoint", str(copy), "--out", str(tmp_path / "export")]) == 2
    line = error_line(capsys)
    assert f"checkpoint {newest}: model.safetensors does not match its checksum" in line
    assert not (tmp_path / "export").exists()
    with pytest.raises(ckpt.CorruptCheckpointError, match="model.safetensors does not match its checksum"):
        load_encoder(str(copy))
