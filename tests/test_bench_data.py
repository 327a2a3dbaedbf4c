"""The data-path benchmark (benchmarks/bench_data.py) on a tiny fixture: its layouts, rows and JSON.

Three demo crops at 16 px stand in for the real run (``python -m benchmarks.bench_data --out ...``);
the times they record are real but meaningless, and only their presence and consistency are checked.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import bench_data  # noqa: E402


def test_a_tiny_run_writes_every_row(tmp_path):
    threads = torch.get_num_threads()
    try:
        path = bench_data.run(tmp_path / "out", sizes=[16], count=8, repeats=1, rates=[100, 5000],
                              crops=bench_data.demo_crops()[:3])
    finally:
        torch.set_num_threads(threads)
    payload = json.loads(path.read_text())
    assert path.name == "data.json" and payload["benchmark"] == "data"
    environment = payload["environment"]
    assert {"device", "torch", "torchvision", "pillow", "date", "loadavg", "torch_threads"} <= set(environment)
    assert environment["torch_threads"] == 1
    assert payload["shapes"]["sizes"] == [16] and payload["shapes"]["fixture_crops"] == 3
    rows = payload["rows"]
    loader = {(r["layout"], r["items"]) for r in rows if r["row"] == "loader"}
    assert loader == {(layout, mode) for layout in bench_data.LAYOUTS for mode in bench_data.MODES}
    for row in rows:
        if row["row"] == "loader":
            assert row["images_per_s_per_core"] == 1e3 / row["ms_per_image"] > 0
    augment = [r for r in rows if r["row"] == "augment"]
    assert {r["impl"] for r in augment} >= {"Augment per image", "BatchAugment default"}
    assert all(r["best_cpu_ms_per_batch"] > 0 for r in augment)
    cores = [r for r in rows if r["row"] == "cores"]
    assert [r["images_per_s"] for r in cores] == [100, 5000]
    for row in cores:
        assert row["cores"] == math.ceil(row["images_per_s"] / row["loader_images_per_s_per_core"])
    assert "images/s per core" in bench_data.summary(path)


def test_augment_only_measures_the_augment_rows_their_floor_and_the_old_baseline(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert bench_data.main(["--out", str(tmp_path), "--sizes", "16", "--repeats", "1", "--augment-only"]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((tmp_path / "data.json").read_text())
    assert payload["augment_only"] is True
    rows = payload["rows"]
    assert {r["row"] for r in rows} == {"augment"}
    floors = [r for r in rows if r["impl"].startswith("floor") or r["impl"].endswith("from a float batch")]
    assert len(floors) == 2
    per_image = next(r for r in rows if r["impl"] == "Augment per image")
    for row in floors:
        assert row["fraction_of_per_image"] == row["best_cpu_ms_per_batch"] / per_image["best_cpu_ms_per_batch"]


def test_bad_arguments_give_one_error_line(tmp_path, capsys):
    assert bench_data.main(["--out", str(tmp_path), "--sizes", "4"]) == 2
    assert capsys.readouterr().err.startswith("error: --sizes")
    assert not (tmp_path / "data.json").exists()
