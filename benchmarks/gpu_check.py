"""The one script a GPU lease runs: install, build, check and benchmark, most valuable evidence first, in a budget.

    python -m benchmarks.gpu_check --out /tmp/gpu_check --bundle $OUT/gpu_check.tar.gz   # on the GPU machine
    python -m benchmarks.gpu_check --cpu --out /tmp/cpu_check                          # CPU stand-ins

``python -m benchmarks.lease prepare`` prints the exact command for a lease (docs/gpu-lease.md).

The budget (``--budget``, default 480 s) counts from the start of this process, so the whole check,
its own start-up included, ends within it. Stages, a failed one stopping none of the later ones:

1. ``install``: the Python package, editable, WITHOUT ``pacofr._C`` (``PACOFR_BUILD_CUDA=0``), then
   ``import pacofr.kernels``: the Triton kernels must not depend on the CUDA build.
2. ``build-C``, in the background beside the next stages: ``pacofr._C`` for this GPU's architecture
   only (``9.0a`` on Hopper), in place (``setup.py build_ext --inplace``), on all cores but two. Its
   log is kept; when it fails, ``_C`` is reported unavailable and the Triton stages go on.
3. ``info``: ``python -m pacofr info --json`` (versions, device, backends).
4. ``triton-check``: every benchmark family's headline shape checked on the GPU with the triton
   backend against the torch reference (the training step: its loss terms and gradient), each run
   once, nothing timed, no compiled baseline, no peer library: the correctness evidence, while
   ``_C`` compiles.
5. ``headline`` (after ``build-C`` ends): the headline shapes timed: torch, ``torch.compile`` of
   the reference, triton, and cuda when ``_C`` built (checked before it is timed); the training
   step before the patch family and its compiled MAE baselines.
6. ``gpu-tests``: the ``gpu``-marked tests, op tests first, one line per test as it ends (``-v``),
   ``-rA`` and a JUnit file at the end (also after SIGINT).
7. ``bench-rest``: the other quick-tier shapes of every family, no compiled baselines, the
   training step's last.

Each stage runs as its own process group. Its cap is its share (``weight``) of the budget left when
it starts, against the stages still to come, so time a stage does not use goes to the later ones; a
stage is skipped (``skipped-for-time``) when its cap is under its minimum. A stage that outruns its
cap gets SIGINT (benchmarks and pytest then write what they have), then SIGTERM, then SIGKILL.
Benchmark rows reach ``<family>.jsonl`` as they are measured (:mod:`benchmarks.row_log`); after
every stage, and every ``REFRESH_S`` seconds during one, the family JSON files, ``summary.json`` and,
with ``--bundle FILE.tar.gz``, one archive of the output folder (and a copy of the summary beside
it) are rewritten, so a lease that ends at any moment returns what was measured until then. Stages
share Triton's on-disk cache: a kernel variant compiled by ``triton-check`` is loaded, not compiled
again, by the later stages (``triton_cache_new`` in the summary counts each stage's compilations).

``--cpu`` runs the same stage list with CPU stand-ins, for CI: ``install`` into a scratch folder
(the development install is left alone), ``build-C`` with the same command into a scratch folder
(a real compilation where a CUDA toolkit is found; ``python -m benchmarks.lease dry-run`` gives it a
compiler that fails at once), the benchmarks' ``cpu-smoke`` tier (``bench-rest`` without the
training step's other step kinds, which add minutes and no plumbing: tests/test_benchmarks_cpu.py
runs them), the ``gpu`` tests skipped as they are without a GPU. Exit status: 0 when every stage
passed, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import row_log

logger = logging.getLogger("benchmarks.gpu_check")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
RESERVE_S = 15.0  #: kept back at the end: stopping a stage (at most ~10 s) and the last summary and bundle
STOP_STEPS: tuple[tuple[int, float], ...] = ((signal.SIGINT, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0))
REFRESH_S = 30.0  #: summary and bundle are also refreshed this often while a stage runs
POLL_S = 0.2
BUNDLE_FILE_LIMIT = 4 * 2**20  #: a bigger file goes into the bundle as its last this many bytes
#: gpu test files in the order their evidence matters; other test files with gpu tests follow
GPU_TEST_ORDER: tuple[str, ...] = ("tests/test_info.py", "tests/test_nearest_token.py", "tests/test_soft_assign.py",
                                   "tests/test_patches.py", "tests/test_cuda_ops_gpu.py")
GPU_TEST_PATTERN = re.compile(r"mark\.gpu|def test_\w+\([^)]*\bdevice\b")  #: a gpu mark, or the device fixture
TEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)
#: the headline stage's family order: the training step (no compiled baseline) before the patch
#: family, whose four MAE baselines are the most torch.compile work of the stage
HEADLINE_FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "train_step", "patches")
CPU_REST_FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches")
KERNELS_PROBE = ("import pacofr, pacofr.kernels; print('pacofr from', pacofr.__file__); "
                 "print('pacofr.kernels from', pacofr.kernels.__file__)")


@dataclass(frozen=True)
class Stage:
    """One step of the check (see the module docstring).

    ``weight``: the stage's share of the time left when it starts, against the weights of the
    foreground stages still to come; 0 gives it a fixed cap of ``max_s`` instead. ``background``:
    it runs beside the following stages under ``max_s``. ``after``: wait for that background stage
    to end first, and add ``env_if_after_passed`` to the environment when it passed.
    """

    name: str
    command: tuple[str, ...]
    min_s: float
    weight: float = 0.0
    max_s: float = float("inf")
    env: dict[str, str] = field(default_factory=dict)
    stdout_file: str | None = None  #: file under the output folder that receives stdout (default: the log)
    background: bool = False
    after: str | None = None
    env_if_after_passed: dict[str, str] = field(default_factory=dict)


@dataclass
class StageResult:
    name: str
    status: str  #: running | passed | failed | timeout | skipped-for-time
    seconds: float
    returncode: int | None
    log: str | None
    cap_s: float | None = None
    started_s: float | None = None  #: since the start of the process
    evidence: dict = field(default_factory=dict)


@dataclass
class Clock:
    """The budget: ``deadline`` on the ``time.monotonic()`` scale (from the process start for a check)."""

    budget_s: float
    deadline: float

    @classmethod
    def from_process_start(cls, budget_s: float) -> Clock:
        return cls(budget_s, time.monotonic() - process_age_s() + budget_s)

    def elapsed_s(self) -> float:
        return self.budget_s - (self.deadline - time.monotonic())

    def left_s(self) -> float:
        """Seconds a stage may still use (the reserve for the end already taken off)."""
        return self.deadline - time.monotonic() - RESERVE_S


def process_age_s() -> float:
    """Seconds since this process started (Linux ``/proc``: its start time in clock ticks since
    boot against the uptime), so that interpreter start-up and imports count; 0 where unknown."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(after_name[19])  # field 22 of stat(5); the list starts at field 3
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


# ----------------------------------------------------------------------------------------------
# the stage lists
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paths:
    """Where things are: ``root`` the source tree the stages run in, ``out`` what comes back
    (bundled), ``scratch`` what does not (build objects, the CPU install)."""

    root: Path
    out: Path
    scratch: Path


def gpu_test_files(root: Path) -> list[str]:
    """Test files holding gpu tests: :data:`GPU_TEST_ORDER` first, then the others, sorted."""
    found = {str(path.relative_to(root)) for path in (root / "tests").glob("test_*.py")
             if GPU_TEST_PATTERN.search(path.read_text(encoding="utf-8"))}
    first = [name for name in GPU_TEST_ORDER if name in found]
    return first + sorted(found - set(first))


def _install_stage(python: str, paths: Paths, cpu: bool) -> Stage:
    """Install without ``_C``, then import ``pacofr.kernels``.

    On the GPU machine: editable, probed where the later stages run; should pip fail, the stage
    fails but links ``pacofr/kernels`` to ``kernels/`` in that (throw-away) copy of the tree, so the
    Triton stages still find their kernels. With ``--cpu``: into a scratch folder, probed from there
    (the development install stays as it is)."""
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile"]
    if cpu:
        site = paths.scratch / "site"
        probe = ["env", f"PYTHONPATH={site}", python, "-c", KERNELS_PROBE]
        script = (f"{shlex.join([*pip, '--target', str(site), '.'])} && cd {shlex.quote(str(paths.scratch))} && "
                  f"{shlex.join(probe)}")
    else:
        script = (f"rc=0; {shlex.join([*pip, '-e', '.'])} || {{ rc=$?; echo 'pip failed: linking pacofr/kernels "
                  f"to kernels/ so the source tree has its Triton kernels' >&2; ln -sfn ../kernels pacofr/kernels; }}; "
                  f"{shlex.join([python, '-c', KERNELS_PROBE])} && exit $rc")
    return Stage("install", ("sh", "-c", script), min_s=10, max_s=150, env={"PACOFR_BUILD_CUDA": "0"})


def _build_stage(python: str, paths: Paths, arch: str, jobs: int, cpu: bool) -> Stage:
    """``pacofr._C`` alone: in place on the GPU machine, into a scratch folder with ``--cpu``."""
    where = ("--build-lib", str(paths.scratch / "c-build")) if cpu else ("--inplace",)
    command = (python, "setup.py", "build_ext", *where, "--build-temp", str(paths.scratch / "build-temp"))
    env = {"PACOFR_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs)}
    return Stage("build-C", command, min_s=30, max_s=300, env=env, background=True)


def _only(families: tuple[str, ...]) -> tuple[str, ...]:
    """``benchmarks.run`` arguments running ``families`` in this order."""
    return tuple(arg for family in families for arg in ("--only", family))


def stages(python: str, paths: Paths, *, cpu: bool, arch: str, jobs: int) -> list[Stage]:
    """The stage list of the module docstring; ``cpu`` swaps in the CPU stand-ins."""
    check, bench = paths.out / "check", paths.out / "bench"
    tier = ("--cpu-smoke",) if cpu else ("--quick",)
    gpu_only = () if cpu else ("--check-only",)
    ceilings = () if cpu else ("--ceilings", str(bench / "ceilings.json"))
    run = (python, "-m", "benchmarks.run", *tier)
    # on the CPU the training step's other step kinds add minutes and no plumbing (the smoke tests cover them)
    rest_families = _only(CPU_REST_FAMILIES) if cpu else ()
    return [
        _install_stage(python, paths, cpu),
        _build_stage(python, paths, arch, jobs, cpu),
        Stage("info", (python, "-m", "pacofr", "info", "--json"), min_s=5, max_s=60, stdout_file="info.json"),
        Stage("triton-check", (*run, "--shapes", "headline", *gpu_only, "--fused-backends", "triton", "--no-compile",
                               "--no-peers", "--out", str(check)), min_s=30, weight=110),
        Stage("headline", (*run, "--shapes", "headline", *_only(HEADLINE_FAMILIES), *ceilings, "--out", str(bench)),
              min_s=30, weight=180, after="build-C"),
        Stage("gpu-tests", (python, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider",
                            f"--junitxml={paths.out / 'gpu_tests.xml'}", *gpu_test_files(paths.root)),
              min_s=20, weight=110, after="build-C", env_if_after_passed={"PACOFR_EXPECT_C": "1"}),
        Stage("bench-rest", (*run, "--shapes", "rest", "--append", *rest_families, *ceilings, "--out", str(bench)),
              min_s=20, weight=60),
    ]


# ----------------------------------------------------------------------------------------------
# running stages
# ----------------------------------------------------------------------------------------------

def stop_group(process: subprocess.Popen) -> None:
    """SIGINT the stage's process group (benchmarks and pytest then write what they have), then
    SIGTERM, then SIGKILL what is left, each after a short wait."""
    for sig, wait in STOP_STEPS:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Running:
    """A started stage: its process, its log files and when it must stop."""

    stage: Stage
    process: subprocess.Popen
    files: list
    started: float
    stop_at: float
    result: StageResult
    triton_cache_before: int

    def finish(self) -> StageResult:
        """Stop the stage if it is still running at ``stop_at``; fill in and return its result."""
        timed_out = False
        if self.process.poll() is None:
            stop_group(self.process)
            timed_out = True
        for handle in self.files:
            handle.close()
        code = self.process.returncode
        self.result.seconds = round(time.monotonic() - self.started, 1)
        self.result.returncode = None if timed_out else code
        self.result.status = "timeout" if timed_out else ("passed" if code == 0 else "failed")
        return self.result


def _default_sigint() -> None:
    """In the stage's process before it starts its program: SIGINT back to its default, which a
    background shell (nohup, ``&``) sets to ignored and children inherit; the stop sequence needs it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stage(stage: Stage, out: Path, cap_s: float, clock: Clock, extra_env: dict[str, str],
                root: Path = ROOT) -> Running:
    """Start ``stage`` in ``root`` in its own process group; output to ``<out>/<name>.log`` (stdout to its file)."""
    log = out / f"{stage.name}.log"
    err = open(log, "ab")
    std = open(out / stage.stdout_file, "ab") if stage.stdout_file else err
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env, **extra_env}
    process = subprocess.Popen(stage.command, cwd=root, env=env, stdout=std, stderr=err, start_new_session=True,
                               preexec_fn=_default_sigint)
    now = time.monotonic()
    result = StageResult(stage.name, "running", 0.0, None, log.name, cap_s=round(cap_s, 1),
                         started_s=round(clock.elapsed_s(), 1))
    return Running(stage, process, [err] + ([std] if std is not err else []), now, now + cap_s, result,
                   triton_cache_entries())


class Runner:
    """Runs a stage list inside a :class:`Clock`, refreshing the evidence as it goes."""

    def __init__(self, out: Path, clock: Clock, bundle_to: Path | None = None,
                 context: dict | None = None, root: Path = ROOT) -> None:
        self.out, self.clock, self.bundle_to, self.root = out, clock, bundle_to, root
        self.context = context or {}
        self.results: list[StageResult] = []
        self.background: dict[str, Running] = {}
        self.last_refresh = time.monotonic()

    def run(self, stage_list: list[Stage]) -> list[StageResult]:
        """Run ``stage_list`` in order (background stages beside the rest); return every result."""
        self.out.mkdir(parents=True, exist_ok=True)
        for index, stage in enumerate(stage_list):
            extra_env: dict[str, str] = {}
            if stage.after is not None:
                after = self.wait_for(stage.after)
                if after is not None and after.status == "passed":
                    extra_env = stage.env_if_after_passed
            cap = self.cap_for(stage, stage_list[index:])
            if cap < stage.min_s:
                result = StageResult(stage.name, "skipped-for-time", 0.0, None, None, cap_s=round(cap, 1),
                                     started_s=round(self.clock.elapsed_s(), 1))
                self.results.append(result)
                logger.info("stage %s: skipped, %.0f s left for it (needs %.0f)", stage.name, cap, stage.min_s)
                self.refresh()
                continue
            logger.info("stage %s: started, at most %.0f s", stage.name, cap)
            try:
                running = start_stage(stage, self.out, cap, self.clock, extra_env, self.root)
            except OSError as err:  # e.g. its program is missing there: recorded, the next stage goes on
                self.results.append(StageResult(stage.name, "failed", 0.0, None, None, cap_s=round(cap, 1),
                                                started_s=round(self.clock.elapsed_s(), 1),
                                                evidence={"error": f"could not start: {err}"}))
                logger.error("stage %s: could not start: %s", stage.name, err)
                self.refresh()
                continue
            self.results.append(running.result)
            if stage.background:
                self.background[stage.name] = running
                self.refresh()
                continue
            self.wait_until(running)
            self.done(running)
        for name in list(self.background):
            self.wait_for(name)
        self.refresh()
        return self.results

    def cap_for(self, stage: Stage, remaining: list[Stage]) -> float:
        """The stage's seconds: its weight's share of what is left, or its fixed ``max_s``."""
        left = self.clock.left_s()
        if stage.weight <= 0 or stage.background:
            return min(stage.max_s, left)
        weights = sum(s.weight for s in remaining if not s.background)
        return min(stage.max_s, left * stage.weight / weights)

    def wait_until(self, running: Running) -> None:
        """Wait for ``running`` to end or reach its cap, minding background stages and refreshing."""
        while running.process.poll() is None and time.monotonic() < running.stop_at:
            self.tick()
            time.sleep(POLL_S)

    def wait_for(self, name: str) -> StageResult | None:
        """Wait for background stage ``name`` to end or reach its cap; its result (None: never started)."""
        running = self.background.get(name)
        if running is None:
            return next((r for r in self.results if r.name == name), None)
        self.wait_until(running)
        self.done(running)
        return running.result

    def tick(self) -> None:
        """Stop background stages at their caps; refresh every ``REFRESH_S`` seconds."""
        for running in list(self.background.values()):
            if running.process.poll() is not None or time.monotonic() >= running.stop_at:
                self.done(running)
        if time.monotonic() - self.last_refresh >= REFRESH_S:
            self.refresh()

    def done(self, running: Running) -> None:
        """Finish a stage (once), gather its evidence, log it and refresh."""
        self.background.pop(running.stage.name, None)
        if running.result.status != "running":
            return
        result = running.finish()
        result.evidence = stage_evidence(running.stage, self.out)
        if not running.stage.background:  # only the build runs beside it, and it compiles no Triton kernel
            result.evidence["triton_cache_new"] = triton_cache_entries() - running.triton_cache_before
        shown = {key: value[-1:] if key == "log_tail" else value for key, value in result.evidence.items()}
        logger.info("stage %s: %s in %.1f s %s", result.name, result.status, result.seconds, json.dumps(shown))
        self.refresh()

    def refresh(self) -> None:
        """Family JSON files from their row logs, the summary and the bundle, as of now."""
        self.last_refresh = time.monotonic()
        for folder in ("check", "bench"):
            if (self.out / folder).is_dir():
                row_log.refresh_folder(self.out / folder)
        summary = write_summary(self.out, self.results, self.clock, self.context)
        if self.bundle_to is None:
            return
        try:
            bundle(self.out, self.bundle_to)
            copy = self.bundle_to.with_name(self.bundle_to.name.removesuffix(".tar.gz") + ".summary.json")
            copy.write_text(json.dumps(summary, indent=1) + "\n")
        except OSError as err:  # the stages go on; the next refresh tries again
            logger.warning("bundle %s not refreshed: %s", self.bundle_to, err)


def run_stages(stage_list: list[Stage], out: Path, clock: Clock, bundle_to: Path | None = None) -> list[StageResult]:
    """Run ``stage_list`` inside ``clock`` (see :class:`Runner`)."""
    return Runner(out, clock, bundle_to).run(stage_list)


# ----------------------------------------------------------------------------------------------
# evidence, summary, bundle
# ----------------------------------------------------------------------------------------------

def triton_cache_entries() -> int:
    """Kernel variants in Triton's on-disk cache (``TRITON_CACHE_DIR`` or ``~/.triton/cache``)."""
    folder = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def family_evidence(folder: Path) -> dict[str, dict]:
    """Per family JSON in ``folder``: its status and rows per implementation."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            continue
        impls: dict[str, int] = {}
        for row in data["rows"]:
            impls[row["impl"]] = impls.get(row["impl"], 0) + 1
        found[data["family"]] = {"status": data["status"], "rows": impls,
                                 "skipped": sorted({entry["impl"] for entry in data["skipped"]})}
    return found


def outcomes_of_tests(log: Path) -> dict:
    """Counts of the outcomes in a ``pytest -v`` log and the first failing test ids."""
    counts: dict[str, int] = {}
    failing = []
    text = log.read_text(errors="replace") if log.is_file() else ""
    for node, outcome in TEST_LINE.findall(text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failing.append(node)
    return {"outcomes": counts, "failing": failing[:50]}


def stage_evidence(stage: Stage, out: Path) -> dict:
    """What a finished stage leaves that matters: rows, test outcomes, the build's verdict."""
    if "benchmarks.run" in stage.command:
        folder = Path(stage.command[stage.command.index("--out") + 1])
        if not folder.is_dir():
            return {"families": {}}
        row_log.refresh_folder(folder)
        return {"families": family_evidence(folder)}
    if "pytest" in stage.command:
        return outcomes_of_tests(out / f"{stage.name}.log")
    if stage.name == "build-C":
        log = out / f"{stage.name}.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        return {"log_tail": lines[-40:]}
    return {}


def c_extension_verdict(results: list[StageResult]) -> dict:
    """Whether this check built ``pacofr._C``, from the build stage's result."""
    build = next((r for r in results if r.name == "build-C"), None)
    if build is None or build.status == "running":
        return {"available": None, "why": "the build has not ended"}
    if build.status == "passed":
        return {"available": True, "why": "built by this check"}
    why = {"failed": f"the build failed (exit {build.returncode}); see {build.log}",
           "timeout": f"the build outran its {build.cap_s} s cap; see {build.log}",
           "skipped-for-time": "no time was left to build it"}.get(build.status, build.status)
    return {"available": False, "why": why}


def machine() -> dict:
    """What this machine is, read without importing torch: nvidia-smi, Python, CPUs, ``PYTHONPATH``
    (the carried wheels; whether each peer imports is in the benchmark rows' skip reasons)."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    return {"gpu": gpu, "python": platform.python_version(), "executable": sys.executable,
            "cpus": os.cpu_count(), "platform": platform.platform(), "pythonpath": os.environ.get("PYTHONPATH")}


def write_summary(out: Path, results: list[StageResult], clock: Clock, context: dict) -> dict:
    """``summary.json`` in ``out`` (atomically); returns it."""
    summary = {**context, "budget_s": clock.budget_s, "elapsed_s": round(clock.elapsed_s(), 1),
               "c_extension": c_extension_verdict(results), "stages": [asdict(r) for r in results],
               "all_passed": bool(results) and all(r.status == "passed" for r in results)}
    partial = out / "summary.json.partial"
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    partial.replace(out / "summary.json")
    return summary


def bundle(out: Path, target: Path) -> None:
    """Pack the output folder into ``target`` (.tar.gz), replacing it atomically; a file over
    :data:`BUNDLE_FILE_LIMIT` goes in as its last that many bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if not path.is_file() or path.name.endswith(".partial"):
                continue
            name = f"{out.name}/{path.relative_to(out)}"
            size = path.stat().st_size
            if size <= BUNDLE_FILE_LIMIT:
                tar.add(path, arcname=name)
                continue
            with open(path, "rb") as handle:
                handle.seek(size - BUNDLE_FILE_LIMIT)
                data = f"[first {size - BUNDLE_FILE_LIMIT} bytes cut]\n".encode() + handle.read()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    partial.replace(target)


def summary_table(results: list[StageResult]) -> str:
    """One line per stage: status, seconds, cap and the gist of its evidence."""
    lines = [f"{'stage':<14} {'status':<17} {'seconds':>8} {'cap':>6}  evidence"]
    for r in results:
        gist = ""
        if "families" in r.evidence:
            gist = ", ".join(f"{name} {info['status']} {sum(info['rows'].values())} rows"
                             for name, info in r.evidence["families"].items())
        elif "outcomes" in r.evidence:
            gist = ", ".join(f"{count} {name}" for name, count in sorted(r.evidence["outcomes"].items()))
        cap = f"{r.cap_s:.0f}" if r.cap_s is not None else "-"
        lines.append(f"{r.name:<14} {r.status:<17} {r.seconds:>8.1f} {cap:>6}  {gist}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def gpu_arch() -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` for the visible GPU (``9.0a`` on compute capability 9.0), read from
    nvidia-smi (no torch import); None when no GPU answers."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if not cap or not re.fullmatch(r"\d+\.\d+", cap[0]):
        return None
    return f"{cap[0]}a" if cap[0] == "9.0" else cap[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, JSON and the summary")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check from the start of this process "
                             f"(default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--bundle", type=Path,
                        help="refresh this .tar.gz of --out (and a summary beside it) as it goes")
    parser.add_argument("--cpu", action="store_true", help="the same stages with CPU stand-ins (no GPU)")
    parser.add_argument("--jobs", type=int, help="compile jobs for the build (default: all CPUs but two; 1 with --cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.budget <= RESERVE_S:
        print(f"error: --budget must be more than {RESERVE_S:.0f} s, got {args.budget:g}", file=sys.stderr)
        return 2
    if args.bundle is not None and not args.bundle.name.endswith(".tar.gz"):
        print(f"error: --bundle must name a .tar.gz file, got {args.bundle}", file=sys.stderr)
        return 2
    clock = Clock.from_process_start(args.budget)
    arch = "9.0a" if args.cpu else gpu_arch()
    if arch is None:
        print("error: no CUDA device answers nvidia-smi; use --cpu for the CPU stand-in", file=sys.stderr)
        return 2
    jobs = args.jobs or (1 if args.cpu else max(1, (os.cpu_count() or 1) - 2))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = Paths(ROOT, out, Path(tempfile.mkdtemp(prefix="pacofr-check-")))
    context = {"mode": "cpu" if args.cpu else "gpu", "arch": arch, "machine": machine(),
               "command": [sys.executable, "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)]}
    logger.info("budget %.0f s from the process start, %.1f s gone; scratch %s", args.budget, clock.elapsed_s(),
                paths.scratch)
    bundle_to = args.bundle.resolve() if args.bundle else None
    results = Runner(out, clock, bundle_to, context, paths.root).run(
        stages(sys.executable, paths, cpu=args.cpu, arch=arch, jobs=jobs))
    print(summary_table(results))
    print(f"pacofr._C: {c_extension_verdict(results)}; {clock.elapsed_s():.0f} s of {args.budget:.0f}; "
          f"summary: {out / 'summary.json'}" + (f", bundle: {bundle_to}" if bundle_to else ""))
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
