"""A missing optional dependency of the evaluation is one `error:` line naming the extra, before any work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pacofr.cli import main


@pytest.fixture
def without_scikit_image(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else find_spec(name, *a))


@pytest.mark.parametrize("rows", [["--baselines", "raw,hog"], ["--baselines", "raw", "--checkpoint", "baseline:lbp"]])
def test_eval_faces_without_scikit_image_stops_before_any_work(rows: list[str], tmp_path: Path,
                                                               without_scikit_image: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # the data root does not exist: reaching the data would be a different error
    code = main(["eval", "faces", *rows, "--data-root", str(tmp_path / "no-data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "scikit-image" in err[0] and "pacofr[eval]" in err[0]
    assert not (tmp_path / "out").exists()
