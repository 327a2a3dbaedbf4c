"""The GPU lease script's stage logic (benchmarks.gpu_check), exercised on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import Stage, run_stages

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_stages_run_in_order_within_the_budget(tmp_path: Path) -> None:
    out, pid_file = tmp_path / "run", tmp_path / "grandchild.pid"
    spawn_sleeper = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
                     f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    stages = [
        Stage("ok", (PY, "-c", "print('hello')"), cap_s=30, min_s=1),
        Stage("fails", (PY, "-c", "import sys; sys.exit(3)"), cap_s=30, min_s=1),
        Stage("hangs", (PY, "-c", spawn_sleeper), cap_s=3, min_s=1),
        Stage("writes-json", (PY, "-c", "print('{\"a\": 1}')"), cap_s=30, min_s=1, stdout_file="a.json"),
        Stage("too-big", (PY, "-c", "pass"), cap_s=30, min_s=10_000),
    ]
    start = time.monotonic()
    results = run_stages(stages, out, budget_s=600, bundle_to=tmp_path / "run.tar.gz")
    assert time.monotonic() - start < 30
    assert [(r.name, r.status) for r in results] == [("ok", "passed"), ("fails", "failed"), ("hangs", "timeout"),
                                                     ("writes-json", "passed"), ("too-big", "skipped-for-time")]
    assert results[1].returncode == 3
    assert (out / "ok.log").read_text() == "hello\n"
    assert json.loads((out / "a.json").read_text()) == {"a": 1}
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the whole process group of a stage that outran its cap is stopped
        if not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung stage's child process survived its stage")
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == [r.status for r in results] and not summary["all_passed"]
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        assert {"run/summary.json", "run/ok.log", "run/a.json"} <= set(tar.getnames())


def test_budget_is_shared_and_late_stages_are_skipped(tmp_path: Path) -> None:
    stages = [Stage("first", (PY, "-c", "import time; time.sleep(2)"), cap_s=60, min_s=1),
              Stage("second", (PY, "-c", "pass"), cap_s=60, min_s=2)]
    results = run_stages(stages, tmp_path, budget_s=3)
    assert [r.status for r in results] == ["passed", "skipped-for-time"]


@pytest.mark.slow
def test_cpu_mode_runs_every_stage(tmp_path: Path) -> None:
    """`--cpu`: the GPU run's stage list with CPU stand-ins (smoke tier), all passing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([PY, "-m", "benchmarks.gpu_check", "--cpu", "--out", str(tmp_path / "cpu"), "--budget",
                           "1200", "--bundle", str(tmp_path / "cpu.tar.gz")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert done.returncode == 0, (summary, done.stdout[-2000:], done.stderr[-3000:])
    assert [s["name"] for s in summary["stages"]] == ["build", "info", "gpu-tests", "bench-nearest_token",
                                                      "bench-soft_assign", "bench-patches", "bench-train_step"]
    for family in ("nearest_token", "soft_assign", "patches", "train_step"):
        record = json.loads((tmp_path / "cpu" / "bench" / f"{family}.json").read_text())
        assert record["tier"] == "cpu-smoke" and record["status"] == "ok"
    assert json.loads((tmp_path / "cpu" / "info.json").read_text())["torch"]
