"""A missing optional dependency of the evaluation is one `error:` line naming the extra, before any work."""

from __future__ import annotations

import importlib.util
import json
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


def test_eval_faces_writes_each_finished_row_as_it_finishes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that fails at its last row keeps the rows already finished, one JSON each under OUT/rows/."""
    from _eval_helpers import run_eval, write_face_root

    from pacofr.eval import grid

    face_root = write_face_root(tmp_path / "data")
    evaluate_sets = grid.evaluate_sets

    def fail_on_raw(extractor, sets, plan):  # the second row (raw pixels) breaks after HOG finished
        if extractor.name == "raw pixels":
            raise RuntimeError("stopped in the second row")
        return evaluate_sets(extractor, sets, plan)

    monkeypatch.setattr(grid, "evaluate_sets", fail_on_raw)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="second row"):
        run_eval(["faces", "--baselines", "hog,raw", "--tasks", "utkface-gender", "--protocols", "linear",
                  "--data-root", str(face_root), "--out", str(out), "--seeds", "1", "--probe-epochs", "5",
                  "--device", "cpu"])
    written = [json.loads(path.read_text()) for path in sorted((out / "rows").glob("*.json"))]
    assert [row["name"] for row in written] == ["HOG"]
    assert written[0]["tasks"]["utkface-gender"]["results"]
