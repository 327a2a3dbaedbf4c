"""Preparing a GPU lease (benchmarks.lease): what travels, the peer wheels, and the dry run of the lease command.

The dry run is CI's rehearsal of a lease: the exact command ``prepare`` prints, with ``--cpu``, on a
copy of what would travel, with a CUDA toolkit and compilers that fail at once. It must still bring
back the Triton rows, a summary saying ``_C`` is unavailable and why, and files the device tool
returns.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import lease

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, timeout=60)


def test_travel_size_counts_tracked_untracked_and_carried_files_not_ignored_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("ignored/\n.whl/\n")
    (tmp_path / "tracked.py").write_bytes(b"x" * 100)
    _git(tmp_path, "add", ".gitignore", "tracked.py")
    (tmp_path / "untracked.txt").write_bytes(b"y" * 50)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"z" * 5000)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "peer-1.0-py3-none-any.whl").write_bytes(b"w" * 30)
    report = lease.travel_size(tmp_path)
    assert report.total == 100 + 50 + 30 + len("ignored/\n.whl/\n")
    assert report.largest[0] == (100, "tracked.py")
    assert lease.travel_size(tmp_path, carry=()).total == report.total - 30
    monkeypatch.setattr(lease, "TRAVEL_LIMIT", report.total)
    with pytest.raises(lease.LeaseError, match=r"would travel; largest: tracked.py"):
        lease.check_travel_size(tmp_path)


def _wheel(folder: Path, name: str, requires: list[str]) -> Path:
    """A minimal wheel of ``name`` whose METADATA lists ``requires``."""
    path = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA", metadata)
    return path


def test_requirements_are_read_for_the_gpu_machines_python(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "peer", ["einx>=0.3", "Torch_Einops-Utils>=0.1", "torch>=2.4",
                                      "tomli; python_version < '3.11'", "pytest; extra == 'test'",
                                      "frozendict; sys_platform == 'linux'"])
    assert lease.wheel_requirements(wheel) == ["einx", "torch-einops-utils", "torch", "frozendict"]


def test_peer_wheels_and_what_they_need_that_the_machine_lacks(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's needs are fetched once, the image's packages (torch, einops) never; a wheel already
    there is kept; a peer that cannot be fetched is reported and the others still come."""
    needs = {"peer-a": ["needed-b", "torch", "einops"], "needed-b": ["peer-a"], "source-c": []}
    fetched = []

    def fake_fetch(name: str, folder: Path, build_here: bool) -> Path:
        fetched.append((name, build_here))
        if name == "missing-d":
            raise lease.LeaseError("missing-d: no matching distribution")
        return _wheel(folder, name, needs[name])

    monkeypatch.setattr(lease, "fetch_wheel", fake_fetch)
    folder = tmp_path / ".whl"
    folder.mkdir()
    kept = _wheel(folder, "source-c", [])
    wheels, problems = lease.gather_wheels(folder, peers=("peer-a", "missing-d"), source_peers=("source-c",))
    assert fetched == [("peer-a", False), ("missing-d", False), ("needed-b", False)]
    assert sorted(path.name for path in wheels) == sorted(
        [kept.name, "peer_a-1.0-py3-none-any.whl", "needed_b-1.0-py3-none-any.whl"])
    assert problems == ["missing-d: no matching distribution"]
    _wheel(folder, "Peer_A", []).rename(folder / "peer_a-2.0-py3-none-any.whl")
    with pytest.raises(lease.LeaseError, match="two wheels of peer-a"):
        lease.gather_wheels(folder, peers=("peer-a",), source_peers=())


def test_the_dry_run_command_is_the_lease_command_with_cpu() -> None:
    command = lease.run_command()
    assert lease.run_command(cpu=True) == command.replace(" --budget 480", " --budget 480 --cpu")
    assert "--cpu" not in command and "$OUT/gpu_check.tar.gz" in command and "tee $OUT/gpu_check.log" in command
    call = json.loads(lease.run_call())
    assert call["command"] == command and call["carry"] == [".whl"] and call["timeout_s"] > lease.BUDGET_S


@pytest.mark.slow
def test_dry_run_of_the_lease_with_a_failing_c_build_returns_triton_results(tmp_path: Path) -> None:
    """CI's rehearsal (about 2.5 minutes on 2 cores): the _C build fails, the Triton stages and the
    summary still come back within the device tool's limits."""
    result = lease.dry_run(tmp_path / "work")
    assert result.problems == [], result.problems
    status = {stage["name"]: stage["status"] for stage in result.summary["stages"]}
    assert status == {**{name: "passed" for name in lease.EXPECTED_STAGES}, "build-C": "failed"}
    assert result.summary["c_extension"] == {"available": False, "why": "the build failed (exit 1); see build-C.log"}
    build = next(stage for stage in result.summary["stages"] if stage["name"] == "build-C")
    assert any(str(tmp_path / "work" / "toolchain" / "bin") in line for line in build["evidence"]["log_tail"])
    with tarfile.open(result.out / "gpu_check.tar.gz") as tar:
        check = json.load(tar.extractfile("gpu_check/check/nearest_token.json"))
        bench = json.load(tar.extractfile("gpu_check/bench/nearest_token.json"))
    assert {row["impl"] for row in check["rows"]} >= {"reference", "triton"}
    assert not any(row["impl"].endswith("_compiled") for row in check["rows"])  # no baseline compiled first
    assert any(entry["impl"] == "cuda" and entry["reason"] for entry in bench["skipped"])  # said why, not failed
    assert [run["selection"] for run in bench["runs"]] == ["headline", "rest"]
    assert (result.out / "gpu_check.log").read_text().count("stage triton-check: passed") == 1
