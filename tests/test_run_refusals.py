"""What a run folder, a checkpoint or an export may hold and what is refused, in one line, before any
work: a resume under another model, a newest checkpoint lacking a file, a meta.json or state.pt
lacking a part, an export whose config and weights disagree or whose weights are cut short or
not finite; and the files' permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pacofr.cli import main
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
