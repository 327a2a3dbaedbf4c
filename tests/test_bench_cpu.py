"""The CPU benchmark family (benchmarks/bench_cpu.py): its JSON, its correctness gate, its tier.

Tiny shapes stand in for the issue's (the real run is ``python -m benchmarks.run --cpu``); the times
they record are real but meaningless, and only their presence is checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import bench_cpu, bench_nearest_token, bench_soft_assign, result_files, run  # noqa: E402
from benchmarks.harness import CPU_NOTE, CPU_TIER, Bench  # noqa: E402

NEAREST = (bench_nearest_token.Shape(120, 200, 16, 1, "fp32"), bench_nearest_token.Shape(90, 130, 16, 4, "fp32"),
           bench_nearest_token.Shape(50, 70, 8, 2, "fp32", metric="cosine"))
SOFT = (bench_soft_assign.Shape(80, 50, 8, 4, "fp32"),)


def run_tiny(tmp_path: Path) -> dict[str, Any]:
    bench = Bench.start(cpu=True)
    bench_cpu.run(CPU_TIER, bench, nearest_shapes=NEAREST, soft_shapes=SOFT)
    return json.loads(bench.write(tmp_path, bench_cpu.FAMILY, CPU_TIER).read_text())


def test_cpu_family_writes_timed_checked_rows_with_the_machine_and_load(tmp_path: Path) -> None:
    data = run_tiny(tmp_path)
    assert data["tier"] == CPU_TIER and data["performance"] is True and data["note"] == CPU_NOTE
    env = data["environment"]
    assert env["device"].startswith("cpu") and env["torch_threads"] == torch.get_num_threads()
    assert {"cpu_model", "cpu_count", "loadavg", "torch", "date", "git_commit"} <= set(env)
    assert len(env["loadavg"]) == 3
    impls = {(row["shape"]["op"], row["impl"]) for row in data["rows"]}
    want = {("nearest_token", name) for name in ("pacofr_torch", "pacofr_torch_sorted", "cdist_topk")}
    want |= {("soft_assign", name) for name in ("pacofr_torch", "pacofr_torch_sorted", "dense_topk_softmax")}
    assert want <= impls
    for peer in ("faiss_flat", "pykeops_argkmin"):  # present, or skipped with the reason
        assert ("nearest_token", peer) in impls or any(s["impl"] == peer and s["reason"] for s in data["skipped"])
    for row in data["rows"]:
        assert row["checked"] is True and row["shape"] in data["shapes"]
        assert 0 < row["best_ms"] <= row["median_ms"] and row["repeats"] >= 3
        assert row["loadavg_before"] >= 0 and row["loadavg_after"] >= 0
        assert row["ratio_to_pacofr"] == pytest.approx(row["best_ms"] / next(
            other["best_ms"] for other in data["rows"] if other["shape"] == row["shape"]
            and other["impl"] == "pacofr_torch"))
        assert row["peak_extra_mib"] is None and row["pct_of_floor"] is None


def test_a_wrong_peer_fails_the_gate_before_anything_is_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = bench_cpu.cdist_topk  # searching the codebook in reverse order: right distances, wrong indices
    monkeypatch.setattr(bench_cpu, "cdist_topk", lambda x, codebook, k: original(x, codebook.flip(0), k))
    bench = Bench.start(cpu=True)
    with pytest.raises(AssertionError, match="cdist_topk disagrees with the reference"):
        bench_cpu.run(CPU_TIER, bench, nearest_shapes=NEAREST[:1], soft_shapes=())
    assert bench.rows == []


def test_the_cpu_tier_runs_only_the_cpu_family(tmp_path: Path) -> None:
    assert run.main(["--cpu", "--only", "nearest_token", "--out", str(tmp_path)]) == 2
    assert run.main(["--cpu-smoke", "--only", "cpu", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_cpu_timings_are_not_tabulated_as_gpu_numbers(tmp_path: Path) -> None:
    data = run_tiny(tmp_path)
    assert result_files.is_family_payload(data) and not result_files.is_performance(data)
