"""The one script a GPU lease runs: build, check and benchmark in priority order inside a time budget.

    python -m benchmarks.gpu_check --out /tmp/gpu_check --bundle $OUT/gpu_check.tar.gz --budget 510
    python -m benchmarks.gpu_check --cpu --out /tmp/cpu_check        # the same stages on the CPU smoke tier

Stages, most important first (a failed stage does not stop the later ones):

1. ``build``: ``pacofr._C`` for this GPU's architecture only (``TORCH_CUDA_ARCH_LIST`` = its
   compute capability, ``9.0a`` on Hopper), all cores, in place (``pip install -e . --no-deps
   --no-build-isolation``);
2. ``info``: ``python -m pacofr info --json`` (versions, device, whether ``_C`` loads and runs here);
3. ``gpu-tests``: the ``gpu``-marked tests only (CI runs the rest without a GPU);
4. ``bench-nearest_token``, ``bench-soft_assign``, ``bench-patches``: the quick kernel benchmarks;
5. ``bench-train_step``: the end-to-end training step.

Each stage runs as its own process group with a time cap (``min(cap, budget left)``; a stage that
outruns it is stopped and marked ``timeout``) and is skipped, marked ``skipped-for-time``, when less
than its minimum is left. After every stage ``summary.json`` in ``--out`` is rewritten and, with
``--bundle``, the whole output folder is packed into one ``.tar.gz`` (a lease returns few files),
so whatever has run comes back even if the lease ends mid-way. The run ends with a table of what
ran, passed, failed or was skipped. Exit status: 0 when every stage passed, else 1.

``--cpu`` runs the same stage list with CPU stand-ins (no build, the CPU smoke tier of the
benchmarks, the ``gpu`` tests skipped as they are without a GPU), so CI tests the stage logic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger("benchmarks.gpu_check")

KERNEL_FAMILIES: tuple[str, ...] = ("nearest_token", "soft_assign", "patches")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    """One step of the check: a command, the most seconds it may take and the fewest worth starting with."""

    name: str
    command: tuple[str, ...]
    cap_s: float
    min_s: float
    env: dict[str, str] = field(default_factory=dict)
    stdout_file: str | None = None  #: file under the output folder that receives stdout (default: the log)


@dataclass
class StageResult:
    name: str
    status: str  #: passed | failed | timeout | skipped-for-time
    seconds: float
    returncode: int | None
    log: str | None


def cuda_arch_list(python: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for the visible GPU (``9.0a`` on compute capability 9.0)."""
    out = subprocess.run([python, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                         capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    return f"{out}a" if out == "9.0" else out


def gpu_stages(out: Path, python: str, jobs: int) -> list[Stage]:
    """The stages of a GPU run (see the module docstring)."""
    bench = out / "bench"
    build_env = {"PACOFR_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": cuda_arch_list(python), "MAX_JOBS": str(jobs)}
    stages = [
        Stage("build", (python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."),
              cap_s=300, min_s=90, env=build_env),
        Stage("info", (python, "-m", "pacofr", "info", "--json"), cap_s=60, min_s=10, stdout_file="info.json"),
        Stage("gpu-tests", (python, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                            f"--junitxml={out / 'gpu_tests.xml'}"), cap_s=180, min_s=60,
              env={"PACOFR_EXPECT_C": "1"}),
    ]
    stages += [Stage(f"bench-{family}", (python, "-m", "benchmarks.run", "--quick", "--only", family,
                                         "--out", str(bench)), cap_s=100, min_s=30) for family in KERNEL_FAMILIES]
    stages.append(Stage("bench-train_step", (python, "-m", "benchmarks.run", "--quick", "--only", "train_step",
                                             "--out", str(bench)), cap_s=150, min_s=45))
    return stages


def cpu_stages(out: Path, python: str) -> list[Stage]:
    """The same stage list on the CPU: no build, CPU smoke tier, GPU tests skipped as without a GPU."""
    bench = out / "bench"
    stages = [
        Stage("build", (python, "-c", "import pacofr._extension as e; print(e.status())"), cap_s=60, min_s=5),
        Stage("info", (python, "-m", "pacofr", "info", "--json"), cap_s=60, min_s=5, stdout_file="info.json"),
        Stage("gpu-tests", (python, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                            f"--junitxml={out / 'gpu_tests.xml'}"), cap_s=180, min_s=10),
    ]
    stages += [Stage(f"bench-{family}", (python, "-m", "benchmarks.run", "--cpu-smoke", "--only", family,
                                         "--out", str(bench)), cap_s=300, min_s=10) for family in KERNEL_FAMILIES]
    stages.append(Stage("bench-train_step", (python, "-m", "benchmarks.run", "--cpu-smoke", "--only", "train_step",
                                             "--out", str(bench)), cap_s=300, min_s=10))
    return stages


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the stage's process group, then SIGKILL what is left after a few seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(stage: Stage, out: Path, timeout_s: float) -> StageResult:
    """Run one stage in its own process group under ``timeout_s``; output to ``<out>/<name>.log``."""
    log = out / f"{stage.name}.log"
    stdout_path = out / stage.stdout_file if stage.stdout_file else log
    start = time.monotonic()
    with open(log, "ab") as err, open(stdout_path, "ab") as std:
        process = subprocess.Popen(stage.command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **stage.env},
                                   stdout=std, stderr=err, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            return StageResult(stage.name, "timeout", time.monotonic() - start, None, log.name)
    status = "passed" if returncode == 0 else "failed"
    return StageResult(stage.name, status, time.monotonic() - start, returncode, log.name)


def bundle(out: Path, target: Path) -> None:
    """Pack the whole output folder into ``target`` (.tar.gz), replacing it atomically."""
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    partial.replace(target)


def run_stages(stages: list[Stage], out: Path, budget_s: float, bundle_to: Path | None = None) -> list[StageResult]:
    """Run ``stages`` in order inside ``budget_s`` seconds; summary (and bundle) after each one."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: list[StageResult] = []
    for stage in stages:
        left = budget_s - (time.monotonic() - start)
        if left < stage.min_s:
            result = StageResult(stage.name, "skipped-for-time", 0.0, None, None)
        else:
            logger.info("stage %s (at most %.0f s of the %.0f s left)", stage.name, min(stage.cap_s, left), left)
            result = run_stage(stage, out, min(stage.cap_s, left))
        logger.info("stage %s: %s in %.1f s", stage.name, result.status, result.seconds)
        results.append(result)
        write_summary(out, results, budget_s, time.monotonic() - start)
        if bundle_to is not None:
            bundle(out, bundle_to)
    return results


def write_summary(out: Path, results: list[StageResult], budget_s: float, elapsed_s: float) -> None:
    summary = {"budget_s": budget_s, "elapsed_s": round(elapsed_s, 1), "stages": [asdict(r) for r in results],
               "all_passed": all(r.status == "passed" for r in results)}
    partial = out / "summary.json.partial"
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    partial.replace(out / "summary.json")


def summary_table(results: list[StageResult]) -> str:
    lines = [f"{'stage':<20} {'status':<17} {'seconds':>8}"]
    lines += [f"{r.name:<20} {r.status:<17} {r.seconds:>8.1f}" for r in results]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, JSON and the summary")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for all stages (default 510)")
    parser.add_argument("--bundle", type=Path, help="refresh this .tar.gz of --out after every stage")
    parser.add_argument("--cpu", action="store_true", help="the same stages on the CPU smoke tier (no GPU)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile jobs for the build")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.budget <= 0:
        print(f"python -m benchmarks.gpu_check: --budget must be positive, got {args.budget}", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        stages = cpu_stages(out, sys.executable)
    else:
        import torch

        if not torch.cuda.is_available():
            print("python -m benchmarks.gpu_check: no CUDA device is visible; use --cpu for the CPU stand-in",
                  file=sys.stderr)
            return 2
        stages = gpu_stages(out, sys.executable, max(1, args.jobs))
    results = run_stages(stages, out, args.budget, args.bundle)
    print(summary_table(results))
    return 0 if all(r.status == "passed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
