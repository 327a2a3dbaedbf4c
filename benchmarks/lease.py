"""Prepare a GPU lease on this (CPU) machine, and rehearse it here.

    python -m benchmarks.lease prepare     # size check, peer wheels into .whl/, the exact run command
    python -m benchmarks.lease dry-run     # that command, with --cpu, on a copy of what would travel

``prepare``:

1. adds up what a lease sends (tracked files, untracked files git does not ignore, ``shared/``,
   the carried ``.whl/``) and stops, naming the largest, when it is over the 64 MiB a call takes;
2. fills ``.whl/`` (ignored by git) with the peer libraries the benchmarks time beside pacofr and
   what they need that the GPU machine's image lacks (:data:`DEVICE_PACKAGES_FILE`): flash-kmeans
   and vector-quantize-pytorch as wheels for Python 3.12 (``pip download``), pykeops and keopscore
   built into pure-Python wheels here (``pip wheel``: they publish source only). A wheel already
   in ``.whl/`` is kept (one version of each: two would stop the install there). A peer that cannot
   be fetched is reported and skipped: its benchmark rows then say it is not installed;
3. prints the device tool's ``run`` call: the command (install the carried wheels into
   ``.whl/site``, then ``python -m benchmarks.gpu_check``, its log and bundle under ``$OUT``), the
   ``carry`` list and a ``timeout_s`` that leaves the budget a margin.

``dry-run`` copies what would travel (not ``.whl/``: a tiny wheel made here stands in for the peers,
whose KeOps would compile C++ on the CPU for minutes) into a temporary folder and runs the same
command with ``--cpu`` there, with a CUDA toolkit and C++ compiler that fail at once (the
deliberately failing ``pacofr._C`` build), ``python3`` being this interpreter, ``$OUT`` and
``$TMPDIR`` temporary folders. It then checks what came back: the files ``$OUT`` would return
(within the tool's limits), the build reported failed and ``_C`` unavailable, the Triton stages and
their rows, the carried wheel installed. Exit status 0 when all holds, 1 otherwise (each problem
named), 2 for a usage error. CI runs it (tests/test_lease.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from benchmarks.gpu_check import DEFAULT_BUDGET_S

logger = logging.getLogger("benchmarks.lease")

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ".whl"
CARRY: tuple[str, ...] = (WHEELS,)
TRAVEL_LIMIT = 64 * 2**20  #: what one call of the device tool sends (working tree, shared/, carried paths)
OUT_LIMITS = {"files": 8, "file_bytes": 16 * 2**20, "total_bytes": 64 * 2**20}  #: what $OUT returns
OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")
BUDGET_S = int(DEFAULT_BUDGET_S)
TIMEOUT_S = BUDGET_S + 60  #: the wheel install and the check's own margin inside the call's limit
DEVICE_PACKAGES_FILE = Path(__file__).with_name("lease_device_packages.txt")
#: peers published as wheels: fetched for the GPU machine's Python (3.12, manylinux x86-64)
BINARY_PEERS: tuple[str, ...] = ("flash-kmeans", "vector-quantize-pytorch")
#: peers published as source only: built here into pure-Python wheels
SOURCE_PEERS: tuple[str, ...] = ("pykeops", "keopscore")
DEVICE_PYTHON = "3.12"
PLATFORMS: tuple[str, ...] = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                              "manylinux2014_x86_64", "manylinux1_x86_64")
#: marker environment of the GPU machine, for the peers' Requires-Dist
DEVICE_MARKERS = {"python_version": DEVICE_PYTHON, "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PROBE_WHEEL = "pacofr_lease_probe-1.0-py3-none-any.whl"
EXPECTED_STAGES: tuple[str, ...] = ("install", "build-C", "info", "triton-check", "headline", "gpu-tests",
                                    "bench-rest")
KERNEL_FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches")


class LeaseError(Exception):
    """A lease cannot be prepared as asked (the CLI prints it as one ``error:`` line)."""


# ----------------------------------------------------------------------------------------------
# what travels
# ----------------------------------------------------------------------------------------------

def travel_files(root: Path, carry: tuple[str, ...] = CARRY) -> list[Path]:
    """Files a call sends, relative to ``root``: tracked and untracked-not-ignored files (as git
    lists them, deleted ones left out), ``shared/`` and the carried paths, each once."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError) as err:
        raise LeaseError(f"{root} is not a git working tree that `git ls-files` can list ({err})") from None
    names = {Path(name) for name in listed if name and ((root / name).is_symlink() or (root / name).is_file())}
    for extra in ("shared", *carry):
        folder = root / extra
        if folder.is_file() or folder.is_symlink():
            names.add(Path(extra))
        elif folder.is_dir():
            names |= {path.relative_to(root) for path in folder.rglob("*") if path.is_file() or path.is_symlink()}
    return sorted(names)


@dataclass
class SizeReport:
    """Bytes that would travel and the largest files."""

    total: int
    largest: list[tuple[int, str]]

    def text(self) -> str:
        tops = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for size, name in self.largest)
        return f"{self.total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB would travel; largest: {tops}"


def travel_size(root: Path, carry: tuple[str, ...] = CARRY) -> SizeReport:
    """What :func:`travel_files` adds up to (a link counts as itself, not what it points to)."""
    sizes = [((root / name).lstat().st_size, str(name)) for name in travel_files(root, carry)]
    return SizeReport(sum(size for size, _ in sizes), sorted(sizes, reverse=True)[:8])


def check_travel_size(root: Path, carry: tuple[str, ...] = CARRY) -> SizeReport:
    """:func:`travel_size`, raising :class:`LeaseError` when it is over the limit."""
    report = travel_size(root, carry)
    if report.total >= TRAVEL_LIMIT:
        raise LeaseError(f"{report.text()}: ignore or carry less (git-ignored files stay behind)")
    return report


# ----------------------------------------------------------------------------------------------
# peer wheels
# ----------------------------------------------------------------------------------------------

def device_packages(path: Path = DEVICE_PACKAGES_FILE) -> frozenset[str]:
    """Canonical names of the packages the GPU machine's image already holds."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(canonicalize_name(line.strip()) for line in lines if line.strip() and not line.startswith("#"))


def wheel_name(path: Path) -> str:
    """The canonical project name of a wheel file (``name-version-...whl``)."""
    return canonicalize_name(path.name.split("-")[0])


def wheel_requirements(path: Path) -> list[str]:
    """Canonical names the wheel requires on the GPU machine (markers evaluated there, extras left out)."""
    with zipfile.ZipFile(path) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(metadata).decode("utf-8"))
    needs = []
    for line in message.get_all("Requires-Dist") or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            logger.warning("%s: unreadable requirement %r skipped", path.name, line)
            continue
        if requirement.marker is None or requirement.marker.evaluate(DEVICE_MARKERS):
            needs.append(canonicalize_name(requirement.name))
    return needs


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=900,
                          check=False)


def fetch_wheel(name: str, folder: Path, build_here: bool) -> Path:
    """Put one wheel of ``name`` into ``folder``: a wheel for the GPU machine's Python, else (or with
    ``build_here``) one built here, which must be pure Python to run there. Raises LeaseError."""
    before = set(folder.glob("*.whl"))
    done = None
    if not build_here:
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        done = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
                    "--implementation", "cp", *platforms, "-d", str(folder), name)
    if done is None or done.returncode != 0:
        done = _pip("wheel", "-q", "--no-deps", "-w", str(folder), name)
    new = sorted(set(folder.glob("*.whl")) - before)
    if done.returncode != 0 or not new:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise LeaseError(f"{name}: {last}")
    wheel = new[0]
    tag = wheel.name.removesuffix(".whl").split("-")[-3:]
    if tag[1:] != ["none", "any"] and not tag[0].startswith("cp312"):
        wheel.unlink()
        raise LeaseError(f"{name}: only {wheel.name} could be had, which does not run on Python {DEVICE_PYTHON}")
    return wheel


def gather_wheels(folder: Path, peers: tuple[str, ...] = BINARY_PEERS,
                  source_peers: tuple[str, ...] = SOURCE_PEERS) -> tuple[list[Path], list[str]]:
    """Wheels of the peers and of everything they need that the GPU machine lacks, into ``folder``
    (a wheel already there is kept); returns (the wheels, the problems met)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = device_packages()
    present: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*.whl")):
        if wheel.name == PROBE_WHEEL:
            continue
        if wheel_name(wheel) in present:
            raise LeaseError(f"{folder} holds two wheels of {wheel_name(wheel)} ({present[wheel_name(wheel)].name}, "
                             f"{wheel.name}): the install there would stop; delete one")
        present[wheel_name(wheel)] = wheel
    queue = [(canonicalize_name(name), name in source_peers) for name in (*peers, *source_peers)]
    problems, seen = [], set()
    while queue:
        name, build_here = queue.pop(0)
        if name in seen or name in have:
            continue
        seen.add(name)
        wheel = present.get(name)
        if wheel is None:
            try:
                wheel = present[name] = fetch_wheel(name, folder, build_here)
            except LeaseError as err:
                problems.append(str(err))
                logger.warning("could not fetch %s", err)
                continue
            logger.info("fetched %s", wheel.name)
        queue += [(need, False) for need in wheel_requirements(wheel)]
    return sorted(present.values()), problems


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------

def run_command(*, cpu: bool = False, budget_s: int = BUDGET_S) -> str:
    """The shell command a lease runs in the repository root (``--cpu``: the dry run's)."""
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               f"--target {WHEELS}/site {WHEELS}/*.whl || exit 1; export PYTHONPATH=$PWD/{WHEELS}/site")
    check = (f"python3 -m benchmarks.gpu_check --out ${{TMPDIR:-/tmp}}/gpu_check --bundle $OUT/gpu_check.tar.gz "
             f"--budget {budget_s}" + (" --cpu" if cpu else ""))
    return (f"set -o pipefail; if ls {WHEELS}/*.whl >/dev/null 2>&1; then {install}; fi; "
            f"PYTHONUNBUFFERED=1 {check} 2>&1 | tee $OUT/gpu_check.log")


def run_call() -> str:
    """The device tool's call, as its arguments in JSON."""
    return json.dumps({"command": run_command(), "carry": list(CARRY), "timeout_s": TIMEOUT_S}, indent=1)


def prepare(root: Path, fetch: bool) -> int:
    """``prepare`` (see the module docstring); prints what it found and the call to make."""
    problems: list[str] = []
    if fetch:
        wheels, problems = gather_wheels(root / WHEELS)
        print(f"{len(wheels)} wheels in {WHEELS}/: " + ", ".join(wheel.name for wheel in wheels))
        for problem in problems:
            print(f"warning: not fetched: {problem} (its benchmark rows will say it is not installed)")
    print(check_travel_size(root).text())
    print("Run on the GPU machine (device tool `run`, these arguments):")
    print(run_call())
    print(f"It ends within {BUDGET_S} s; docs/gpu-lease.md says what comes back and how to read it.")
    return 0


# ----------------------------------------------------------------------------------------------
# the dry run
# ----------------------------------------------------------------------------------------------

FAILING_TOOL = "#!/bin/sh\necho \"$0: a deliberately failing compiler (benchmarks.lease dry-run)\" >&2\nexit 1\n"


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def failing_toolchain(folder: Path) -> dict[str, str]:
    """A CUDA toolkit whose nvcc and C/C++ compilers exit 1 at once; the environment that selects it."""
    for tool in ("nvcc", "c++", "g++", "gcc", "cc"):
        _executable(folder / "bin" / tool, FAILING_TOOL)
    (folder / "include").mkdir(exist_ok=True)
    (folder / "include" / "cuda.h").write_text("/* stand-in: the build fails before reading it */\n")
    return {"CUDA_HOME": str(folder), "CXX": str(folder / "bin" / "c++"), "CC": str(folder / "bin" / "cc")}


def probe_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel (``pacofr_lease_probe``) standing in for the carried peers."""
    files = {"pacofr_lease_probe/__init__.py": b'"""Installed by the lease dry run from the carried wheels."""\n',
             "pacofr_lease_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: pacofr-lease-probe\n"
                                                          b"Version: 1.0\n",
             "pacofr_lease_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: benchmarks.lease\n"
                                                       b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PROBE_WHEEL
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        record_name = "pacofr_lease_probe-1.0.dist-info/RECORD"
        archive.writestr(record_name, f"{record}{record_name},,\n")
    return path


def copy_travelling_tree(root: Path, target: Path) -> None:
    """What a call sends, minus the carried wheels (the dry run brings its own probe wheel)."""
    for name in travel_files(root, carry=()):
        source, copy = root / name, target / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, copy)


@dataclass
class DryRun:
    """What a dry run left: its return code, the folders, and the problems found in what came back."""

    returncode: int
    tree: Path
    out: Path
    summary: dict
    problems: list[str]


def dry_run(work: Path, root: Path = ROOT, timeout_s: float = 900) -> DryRun:
    """Run the lease command with ``--cpu`` on a copy of the travelling tree under ``work``; check it."""
    tree, out, tmp = work / "tree", work / "OUT", work / "tmp"
    for folder in (out, tmp):
        folder.mkdir(parents=True)
    copy_travelling_tree(root, tree)
    probe_wheel(tree / WHEELS)
    _executable(work / "python" / "python3", f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(failing_toolchain(work / "toolchain"))
    env.update(OUT=str(out), TMPDIR=str(tmp),
               PATH=os.pathsep.join([str(work / "toolchain" / "bin"), str(work / "python"), env.get("PATH", "")]))
    command = run_command(cpu=True)
    logger.info("dry run in %s: %s", tree, command)
    done = subprocess.run(["bash", "-c", command], cwd=tree, env=env, timeout=timeout_s, check=False)
    summary_file = out / "gpu_check.summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return DryRun(done.returncode, tree, out, summary, dry_run_problems(done.returncode, tree, out, summary))


def dry_run_problems(returncode: int, tree: Path, out: Path, summary: dict) -> list[str]:
    """What is wrong with what a dry run brought back (empty: all as it must be)."""
    problems = out_limit_problems(out)
    if not summary:
        return [*problems, f"no gpu_check.summary.json in $OUT (exit status {returncode})"]
    status = {stage["name"]: stage["status"] for stage in summary["stages"]}
    if tuple(status) != EXPECTED_STAGES:
        problems.append(f"stages {list(status)}, expected {list(EXPECTED_STAGES)}")
    if status.get("build-C") != "failed" or summary["c_extension"]["available"] is not False:
        problems.append(f"the failing _C build was not reported failed: {status.get('build-C')}, "
                        f"{summary['c_extension']}")
    problems += [f"stage {name}: {status.get(name)}" for name in EXPECTED_STAGES
                 if name != "build-C" and status.get(name) != "passed"]
    if returncode != 1:  # the build failed on purpose, the rest passed
        problems.append(f"exit status {returncode}, expected 1 (only build-C failing)")
    if summary["elapsed_s"] > summary["budget_s"]:
        problems.append(f"took {summary['elapsed_s']} s of a {summary['budget_s']} s budget")
    problems += family_problems(out / "gpu_check.tar.gz")
    if not (tree / WHEELS / "site" / "pacofr_lease_probe" / "__init__.py").is_file():
        problems.append("the carried probe wheel was not installed into .whl/site")
    if f"{WHEELS}/site" not in (summary["machine"].get("pythonpath") or ""):
        problems.append("the check did not run with the carried wheels on PYTHONPATH")
    return problems


def out_limit_problems(out: Path) -> list[str]:
    """Whether ``$OUT`` holds the three files and stays within what the device tool returns."""
    files = sorted(path for path in out.rglob("*") if path.is_file())
    problems = [f"$OUT lacks {name}" for name in ("gpu_check.tar.gz", "gpu_check.summary.json", "gpu_check.log")
                if not (out / name).is_file()]
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"$OUT holds {len(files)} files, more than the {OUT_LIMITS['files']} that come back")
    problems += [f"$OUT/{path.name}: {path.stat().st_size} bytes, over {OUT_LIMITS['file_bytes']}"
                 for path in files if path.stat().st_size > OUT_LIMITS["file_bytes"]]
    problems += [f"$OUT/{path.name}: a name that does not come back" for path in files
                 if not OUT_NAME.fullmatch(path.name)]
    if sum(path.stat().st_size for path in files) > OUT_LIMITS["total_bytes"]:
        problems.append("$OUT holds more than comes back together")
    return problems


def family_problems(bundle_path: Path) -> list[str]:
    """The bundle must hold the Triton rows of the headline check and timings, and the build's log."""
    if not bundle_path.is_file():
        return ["no bundle"]
    with tarfile.open(bundle_path) as tar:
        names = set(tar.getnames())
        problems = [f"the bundle lacks {name}" for name in ("gpu_check/summary.json", "gpu_check/build-C.log")
                    if name not in names]
        for folder in ("check", "bench"):
            for family in KERNEL_FAMILIES:
                name = f"gpu_check/{folder}/{family}.json"
                if name not in names:
                    problems.append(f"the bundle lacks {name}")
                    continue
                data = json.load(tar.extractfile(name))
                if data["status"] != "ok":
                    problems.append(f"{name}: status {data['status']} ({data['error']})")
                elif not any(row["impl"] == "triton" for row in data["rows"]):
                    problems.append(f"{name}: no triton row")
    return problems


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lease", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="size check, peer wheels, the run call to make")
    prep.add_argument("--no-wheels", action="store_true", help="fetch no peer wheels (keep what .whl/ holds)")
    rehearse = verbs.add_parser("dry-run", help="the run command with --cpu on a copy of the travelling tree")
    rehearse.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.verb == "prepare":
            return prepare(ROOT, fetch=not args.no_wheels)
        if args.keep is not None and args.keep.exists():
            raise LeaseError(f"--keep {args.keep}: the folder exists; name a new one")
        work = args.keep or Path(tempfile.mkdtemp(prefix="pacofr-lease-"))
        result = dry_run(work.resolve())
    except LeaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"dry run: {problem}")
    print(f"dry run {'passed' if not result.problems else 'FAILED'}: exit status {result.returncode}, "
          f"$OUT in {result.out}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
