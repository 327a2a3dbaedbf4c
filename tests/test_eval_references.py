"""Classification results are reported beside the majority-class and chance scores, and a result no
better than the majority class is flagged as collapsed (tables and the one-line summary); feature
extraction shows its progress."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _eval_helpers import run_eval
from PIL import Image

from pacofr.data.image_sets import ArrayImages
from pacofr.eval.encoders import load_encoder
from pacofr.eval.extractors import EncoderExtractor, extract_features
from pacofr.eval.report import COLLAPSED, class_references, grid_tables, is_collapsed, reference_line


def _task(test_counts: dict[str, int], means: list[float]) -> dict[str, Any]:
    results = [{"protocol": "linear", "pool": f"pool{i}", "mean": m, "std": 0.0, "metric": "accuracy", "unit": "%",
                "higher_is_better": True, "val_mean": m} for i, m in enumerate(means)]
    return {"data": {"target": "class", "per_class": {"test": test_counts}}, "results": results}


def test_references_are_counted_from_the_test_split() -> None:
    # 35 of 48 test faces are 'a': always answering 'a' scores 72.92 %; chance is 1/2
    refs = class_references(_task({"a": 35, "b": 13}, [80.0]))
    assert refs == {"majority": 100 * 35 / 48, "chance": 50.0, "majority_class": "a", "test_n": 48}
    assert class_references({"data": {"target": "regression"}, "results": []}) is None


def test_a_result_at_the_majority_share_is_collapsed_and_one_image_better_is_not() -> None:
    refs = class_references(_task({"a": 35, "b": 13}, []))
    step = 100 / 48  # one test image
    assert is_collapsed({"mean": 100 * 35 / 48}, refs)  # exactly the majority share, as in the issue
    assert is_collapsed({"mean": 100 * 35 / 48 + step}, refs)  # within one image: not distinguishable
    assert not is_collapsed({"mean": 100 * 35 / 48 + 2 * step}, refs)
    assert not is_collapsed({"mean": float("nan")}, refs)


def test_the_line_and_the_tables_give_the_references_and_flag_a_collapse() -> None:
    task = _task({"a": 35, "b": 13}, [100 * 35 / 48, 90.0])
    line = reference_line("fer", task)
    assert line is not None
    assert "majority class (a) scores 72.92 %" in line and "chance 50.00 %" in line
    assert "linear/pool0 no better than that" in line and "pool1" not in line
    rows = [{"name": "enc", "kind": "encoder", "tasks": {"fer": task}}]
    text = "\n".join(grid_tables(rows, ["fer"], {"fer": "FER"}))
    assert "| majority class / chance | 72.9 / 50.0 |" in text
    assert f"72.9 ± 0.0 {COLLAPSED}" in text and f"90.0 ± 0.0 {COLLAPSED}" not in text and "90.0 ± 0.0" in text


def test_feature_extraction_shows_its_progress(capsys: pytest.CaptureFixture[str]) -> None:
    images = ArrayImages(np.zeros((7, 16, 16), dtype=np.uint8))
    extract_features(EncoderExtractor(load_encoder("random:tiny")), images, ["cls"], batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "features encoder" in err and "/7 [" in err  # a bar counting the 7 images (the last refresh may be skipped)
    extract_features(EncoderExtractor(load_encoder("random:tiny")), images, ["cls"], batch_size=3)
    assert capsys.readouterr().err == ""  # not a terminal here: no bar in logs


def test_an_eval_command_prints_and_stores_the_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8), 6 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "faces.csv").write_text("path,label\n" + "".join(
        f"img/{i}.png,{'dark' if i < 20 else 'light'}\n" for i in range(40)))
    assert run_eval(["knn", "--checkpoint", "baseline:raw", "--data", str(tmp_path / "faces.csv"),
                     "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    stored = json.loads(next((tmp_path / "o").glob("*.json")).read_text())["references"]
    counts = stored["test_n"], stored["majority"] * stored["test_n"] / 100  # the majority is a whole count
    assert abs(counts[1] - round(counts[1])) < 1e-9 and stored["chance"] == 50.0
    assert f"scores {stored['majority']:.2f} % on test, chance 50.00 % (2 classes)" in out
