"""The GPU lease script's stage logic (benchmarks.gpu_check), exercised on the CPU.

The whole check on the CPU, through the exact lease command and with a ``_C`` build that fails,
is tests/test_lease.py's dry run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import row_log
from benchmarks.gpu_check import (RESERVE_S, Clock, Paths, Runner, Stage, outcomes_of_tests, process_age_s,
                                  run_stages, stages)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def clock(seconds: float) -> Clock:
    """A budget with ``seconds`` left for stages (the end reserve on top)."""
    return Clock(seconds + RESERVE_S, time.monotonic() + seconds + RESERVE_S)


def _gone(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_stages_run_in_order_within_the_budget(tmp_path: Path) -> None:
    out, pid_file = tmp_path / "run", tmp_path / "grandchild.pid"
    spawn_sleeper = (f"import signal, subprocess, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                     f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
                     f"time.sleep(60)")
    stages = [
        Stage("ok", (PY, "-c", "print('hello')"), min_s=1, max_s=30),
        Stage("fails", (PY, "-c", "import sys; sys.exit(3)"), min_s=1, max_s=30),
        Stage("hangs", (PY, "-c", spawn_sleeper), min_s=1, max_s=8),  # time to start up on a loaded machine
        Stage("missing", (str(tmp_path / "no-such-program"),), min_s=1, max_s=30),
        Stage("writes-json", (PY, "-c", "print('{\"a\": 1}')"), min_s=1, max_s=30, stdout_file="a.json"),
        Stage("too-big", (PY, "-c", "pass"), min_s=10_000, max_s=30),
    ]
    start = time.monotonic()
    results = run_stages(stages, out, clock(600), bundle_to=tmp_path / "b" / "run.tar.gz")
    assert time.monotonic() - start < 60
    assert [(r.name, r.status) for r in results] == [("ok", "passed"), ("fails", "failed"), ("hangs", "timeout"),
                                                     ("missing", "failed"), ("writes-json", "passed"),
                                                     ("too-big", "skipped-for-time")]
    assert "could not start" in results[3].evidence["error"]
    assert results[1].returncode == 3
    assert (out / "ok.log").read_text() == "hello\n"
    assert json.loads((out / "a.json").read_text()) == {"a": 1}
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the whole process group of a stage that outran its cap is stopped, SIGINT or not
        if _gone(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung stage's child process survived its stage")
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == [r.status for r in results] and not summary["all_passed"]
    assert json.loads((tmp_path / "b" / "run.summary.json").read_text())["stages"] == summary["stages"]
    with tarfile.open(tmp_path / "b" / "run.tar.gz") as tar:
        assert {"run/summary.json", "run/ok.log", "run/a.json"} <= set(tar.getnames())


def test_caps_are_shares_of_what_is_left_and_late_stages_are_skipped(tmp_path: Path) -> None:
    stages = [Stage("first", (PY, "-c", "import time; time.sleep(2)"), min_s=1, weight=1),
              Stage("second", (PY, "-c", "pass"), min_s=1, weight=3),
              Stage("third", (PY, "-c", "pass"), min_s=38, weight=1)]
    results = run_stages(stages, tmp_path, clock(40))
    assert [r.status for r in results] == ["passed", "passed", "skipped-for-time"]
    assert results[0].cap_s == pytest.approx(40 * 1 / 5, abs=1.0)  # its weight against all five
    assert results[1].cap_s == pytest.approx((40 - 2) * 3 / 4, abs=1.5)  # what the first left, against 3 + 1
    assert 30 < results[2].cap_s < 38  # the last one gets all that is left: not enough for its minimum


def test_a_background_stage_runs_beside_the_others_and_gates_its_followers(tmp_path: Path) -> None:
    marker = tmp_path / "built"
    build = f"import time; time.sleep(1.5); open({str(marker)!r}, 'w')"
    probe = f"import os; print(os.path.exists({str(marker)!r}), os.environ.get('BUILT'))"
    for code, want in ((0, "True 1"), (1, "True None")):
        out = tmp_path / f"exit{code}"
        marker.unlink(missing_ok=True)
        stages = [Stage("build", (PY, "-c", f"{build}; raise SystemExit({code})"), min_s=1, max_s=30, background=True),
                  Stage("beside", (PY, "-c", probe), min_s=1, max_s=30),
                  Stage("after", (PY, "-c", probe), min_s=1, max_s=30, after="build",
                        env_if_after_passed={"BUILT": "1"})]
        results = Runner(out, clock(600)).run(stages)
        assert [r.status for r in results] == ["passed" if code == 0 else "failed", "passed", "passed"]
        assert (out / "beside.log").read_text().split()[0] == "False"  # ran while the build was going on
        assert (out / "after.log").read_text().strip() == want  # waited for it; its env only when it passed


def test_a_stage_at_its_cap_gets_sigint_first(tmp_path: Path) -> None:
    """Benchmarks and pytest write what they have on SIGINT: the stop sequence gives them the chance."""
    code = (f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    open({str(tmp_path / 'wrote')!r}, 'w').write('partial results')\n")
    # the cap leaves the interpreter time to start and enter the try block on a loaded machine
    (result,) = run_stages([Stage("slow", (PY, "-c", code), min_s=1, max_s=8)], tmp_path / "run", clock(600))
    assert result.status == "timeout"
    assert (tmp_path / "wrote").read_text() == "partial results"


def test_a_killed_benchmark_stage_leaves_its_finished_rows_in_json(tmp_path: Path) -> None:
    """Rows appended before a SIGKILL (SIGINT and SIGTERM ignored) end up in the family JSON."""
    out = tmp_path / "run"
    log = out / "bench" / "patches.jsonl"
    code = (f"import signal, time\nfrom benchmarks import row_log\n"
            f"for sig in (signal.SIGINT, signal.SIGTERM):\n    signal.signal(sig, signal.SIG_IGN)\n"
            f"path = __import__('pathlib').Path({str(log)!r}); path.parent.mkdir(parents=True)\n"
            f"row_log.append(path, {{'record': 'run', 'tier': 'quick', 'performance': True, 'note': 'n', "
            f"'environment': {{}}, 'ceilings': None, 'selection': 'rest'}})\n"
            f"for impl in ('reference', 'triton'):\n"
            f"    row_log.append(path, {{'record': 'row', 'family': 'patches', 'impl': impl, 'shape': {{'b': 1}}}})\n"
            f"time.sleep(60)\n")
    (result,) = run_stages([Stage("bench", (PY, "-c", code), min_s=1, max_s=8)], out, clock(600),
                           bundle_to=tmp_path / "run.tar.gz")
    assert result.status == "timeout"
    data = json.loads((out / "bench" / "patches.json").read_text())
    assert data["status"] == "incomplete" and [row["impl"] for row in data["rows"]] == ["reference", "triton"]
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        bundled = json.load(tar.extractfile("run/bench/patches.json"))
    assert bundled["rows"] == data["rows"]
    assert row_log.read_records(log)[-1]["record"] == "row"  # no end record: the run was killed


def test_the_budget_counts_from_the_process_start() -> None:
    code = ("import time; time.sleep(1.5); from benchmarks.gpu_check import Clock, process_age_s; "
            "c = Clock.from_process_start(100); print(process_age_s(), c.elapsed_s())")
    done = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    age, elapsed = map(float, done.stdout.split())
    assert 1.5 <= age < 60 and elapsed >= age - 0.05  # /proc's start time has a 10 ms tick
    assert process_age_s() > 0


def test_outcomes_are_read_from_the_verbose_test_log(tmp_path: Path) -> None:
    log = tmp_path / "gpu-tests.log"
    log.write_text("collected 4 items\n"
                   "tests/test_a.py::test_x[cuda] PASSED    [ 25%]\n"
                   "tests/test_a.py::test_y[cuda-1] FAILED  [ 50%]\n"
                   "tests/test_b.py::test_z SKIPPED (needs a...) [ 75%]\n"
                   "tests/test_b.py::test_w ERROR           [100%]\n"
                   "PASSED tests/test_a.py::test_x[cuda]\n")  # -rA's summary line is not counted twice
    assert outcomes_of_tests(log) == {"outcomes": {"passed": 1, "failed": 1, "skipped": 1, "error": 1},
                                      "failing": ["tests/test_a.py::test_y[cuda-1]", "tests/test_b.py::test_w"]}


def test_a_failed_editable_install_still_leaves_the_kernels_importable(tmp_path: Path) -> None:
    """GPU machine: pip failing marks the install failed, yet the tree's pacofr.kernels imports there."""
    tree = tmp_path / "tree"
    for package in ("pacofr", "kernels"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "pip fails on purpose" >&2; exit 3; fi\n'
                      f'exec {PY} "$@"\n')
    python.chmod(0o755)
    paths = Paths(tree, tmp_path / "out", tmp_path / "scratch")
    install = stages(str(python), paths, cpu=False, arch="9.0a", jobs=1)[0]
    (result,) = Runner(paths.out, clock(600), root=tree).run([install])
    assert (result.name, result.status, result.returncode) == ("install", "failed", 3)
    assert (tree / "pacofr" / "kernels").is_symlink()
    probe = (paths.out / "install.log").read_text()
    assert f"pacofr.kernels from {tree / 'pacofr' / 'kernels' / '__init__.py'}" in probe
