"""The CI scripts' own logic: the wheel-contents comparison and the stage runner of ``make test``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (ROOT / ".ci" / "wheel_check.py").is_file(),
                                reason="runs from a source checkout (tests copied next to an installed wheel lack .ci/)")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / ".ci" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(path: Path, names: set[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(names):
            archive.writestr(name, "")
        archive.writestr("pacofr-0.1.0.dist-info/RECORD", "")
    return path


def test_wheel_contents_must_match_the_tree(tmp_path: Path) -> None:
    check = _load("wheel_check")
    expected = check.expected_wheel_files()
    # the tree's own facts, read from git and not from the checker: modules of every subpackage, the
    # kernels mapped into pacofr/kernels, configs and the demo faces
    assert {"pacofr/train/__init__.py", "pacofr/kernels/__init__.py", "pacofr/configs/demo.yaml",
            "pacofr/assets/demo_faces/index.jsonl"} <= expected
    assert check.check_wheel_contents(_wheel(tmp_path / "ok.whl", expected), cuda=False).startswith(f"{len(expected)} ")
    missing = sorted(expected)[0]
    with pytest.raises(check.CheckFailed, match=missing.replace(".", r"\.")):
        check.check_wheel_contents(_wheel(tmp_path / "missing.whl", expected - {missing}), cuda=False)
    with pytest.raises(check.CheckFailed, match="not package files"):
        check.check_wheel_contents(_wheel(tmp_path / "stray.whl", expected | {"pacofr/tests/x.py"}), cuda=False)
    with pytest.raises(check.CheckFailed, match="holds no pacofr/_C"):
        check.check_wheel_contents(_wheel(tmp_path / "nocuda.whl", expected), cuda=True)
    so = "pacofr/_C.cpython-311-x86_64-linux-gnu.so"
    assert check.check_wheel_contents(_wheel(tmp_path / "cuda.whl", expected | {so}), cuda=True).endswith("(+ _C)")


def test_stage_runner_runs_every_stage_and_reports_each_failure(tmp_path: Path) -> None:
    fake_make = tmp_path / "make"
    fake_make.write_text("#!/bin/sh\necho \"ran $2\" >> \"$STAGES_LOG\"\ncase \"$2\" in broken*) exit 3;; esac\n")
    fake_make.chmod(0o755)
    env = {**os.environ, "MAKE": str(fake_make), "STAGES_LOG": str(tmp_path / "log")}
    summary = ROOT / "build" / "stages.json"
    before = summary.read_text() if summary.exists() else None
    try:
        done = subprocess.run([sys.executable, str(ROOT / ".ci" / "stages.py"), "first", "broken-one", "last"],
                              env=env, capture_output=True, text=True)
        assert done.returncode == 1
        assert (tmp_path / "log").read_text().split("\n")[:3] == ["ran first", "ran broken-one", "ran last"]
        assert "failed stages: broken-one" in done.stdout
        stages = json.loads(summary.read_text())["stages"]
        assert [(s["stage"], s["passed"], s["status"]) for s in stages] == [
            ("first", True, 0), ("broken-one", False, 3), ("last", True, 0)]
    finally:  # the real `make test` summary is not ours to overwrite, nor a fake one ours to leave
        if before is not None:
            summary.write_text(before)
        else:
            summary.unlink(missing_ok=True)
