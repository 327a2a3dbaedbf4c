"""Shared benchmark machinery: timing, peak memory, device ceilings, environment record, JSON.

Every family module ``benchmarks/bench_<family>.py`` exposes
``run(tier: str, bench: Bench, *, with_compile: bool = True) -> None`` and uses :class:`Bench` to
time implementations side by side (eager reference, ``torch.compile`` of it, triton, cuda) after
checking them against the reference (a mismatch raises before any time is recorded). Kernel times
are ``triton.testing.do_bench`` medians with p20/p80 in milliseconds (CUDA events); memory is the
peak allocated above the inputs' footprint; "% of floor" compares with the device's measured bf16
GEMM rate and copy bandwidth.

Three kinds of session:

* GPU tiers (``quick``, ``full``): need a CUDA device, measure the ceilings first.
* ``cpu-smoke``: CPU tensors, tiny shapes, every implementation checked and then run once so the
  code paths stay tested without a GPU. It records no times, no memory and no % of floor: these
  are not performance numbers, and the JSON says so.
* ``cpu``: CPU performance (:mod:`benchmarks.bench_cpu`): best-of-N wall-clock times
  (:func:`time_cpu_ms`) with the load average around each, no memory and no floor.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import pacofr
from pacofr._triton import interpreter_enabled
from pacofr.ops._dispatch import backend_status

SMOKE_TIER = "cpu-smoke"
SMOKE_NOTE = ("cpu-smoke run: CPU backends (torch eager; triton through its interpreter when "
              "TRITON_INTERPRET=1) on tiny shapes, to keep the benchmark code paths tested. Every "
              "implementation was checked against the torch reference and then run once. These are NOT "
              "performance numbers: no times, memory or % of floor are recorded; GPU numbers need a GPU "
              "(python -m benchmarks.run --quick on a CUDA device).")
CPU_TIER = "cpu"
CPU_NOTE = ("CPU run: best-of-N wall-clock times (time.perf_counter) in one process on the torch threads "
            "recorded in the environment, after a correctness check of every implementation; the load "
            "average before and after each measurement is in its row. On a shared machine the times are "
            "upper bounds.")
GPU_NOTE = ("GPU run: do_bench medians (p20/p80) with CUDA events after a correctness check against the "
            "torch reference; % of floor against the ceilings measured on this device in this run.")
NO_GPU_MESSAGE = ("no CUDA device is visible: the quick and full benchmark tiers time GPU kernels and need a "
                  "GPU. Run `python -m benchmarks.run --cpu-smoke --out DIR` for the CPU smoke tier "
                  "(correctness and code paths only, no performance numbers).")
JSON_SCHEMA = 1

logger = logging.getLogger("benchmarks")


def has_cuda() -> bool:
    """Whether a CUDA device is visible to torch."""
    return torch.cuda.is_available()


def require_cuda() -> torch.device:
    """The CUDA device to benchmark on; SystemExit with a clear message when there is none."""
    if not has_cuda():
        raise SystemExit(NO_GPU_MESSAGE)
    return torch.device("cuda", torch.cuda.current_device())


def _git_commit() -> str | None:
    """HEAD of the repository holding this file (read-only ``git rev-parse``), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_model() -> str | None:
    """The "model name" line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return None
    return triton.__version__


def environment(device: torch.device) -> dict[str, Any]:
    """Device, driver and software versions, date and git commit of this run on ``device``."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        hardware = {"device": props.name, "capability": f"sm_{props.major}{props.minor}",
                    "multiprocessors": props.multi_processor_count, "driver": _nvidia_driver()}
    else:
        hardware = {"device": f"cpu ({platform.processor() or platform.machine()})", "capability": None,
                    "multiprocessors": None, "driver": None, "cpu_count": os.cpu_count(),
                    "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(),
                    "loadavg": list(os.getloadavg())}
    return {
        **hardware,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _triton_version(),
        "triton_interpret": interpreter_enabled(),
        "pacofr": pacofr.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def time_cpu_ms(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Best, median, p20 and p80 of ``repeats`` wall-clock runs of ``fn`` in ms (after ``warmup``
    untimed ones), with the 1-minute load average before and after."""
    for _ in range(warmup):
        fn()
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    p20, p50, p80 = torch.quantile(torch.tensor(times, dtype=torch.float64),
                                   torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"best_ms": min(times), "median_ms": p50, "p20_ms": p20, "p80_ms": p80, "repeats": repeats,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}


def time_ms(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100) -> dict[str, float]:
    """Median, p20 and p80 of ``fn``'s run time in ms (CUDA events via ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}


def time_steps_ms(fn: Callable[[], Any], *, warmup: int, iters: int) -> dict[str, float]:
    """Median, p20 and p80 (ms) of ``iters`` calls of a long ``fn`` (a training step), each timed
    with its own pair of CUDA events after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([start.elapsed_time(end) for start, end in pairs], dtype=torch.float64)
    p20, p50, p80 = torch.quantile(times, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80, "iters": iters}


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """This device's bf16 GEMM rate (TFLOP/s) and copy bandwidth (TB/s, read + write), measured."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm = time_ms(lambda: a @ b)["median_ms"]
    src = torch.randn(512 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src))["median_ms"]
    return {
        "bf16_gemm_tflops": 2 * n**3 / (gemm * 1e-3) / 1e12,
        "copy_tb_s": 2 * src.numel() * 4 / (copy * 1e-3) / 1e12,
    }


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = json.dumps(item, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


@dataclass
class Bench:
    """One benchmark session on one device: ceilings measured once, rows collected.

    ``smoke=True`` is the CPU smoke tier: no ceilings, :meth:`record` runs ``fn`` once and stores
    no time, memory or floor (those fields are None). ``cpu_timing=True`` is the CPU performance
    tier: :meth:`record` stores :func:`time_cpu_ms` (no memory, no floor).
    """

    device: torch.device
    ceilings: dict[str, float] | None
    smoke: bool = False
    cpu_timing: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def start(cls, *, smoke: bool = False, cpu: bool = False) -> Bench:
        """A GPU session (ceilings measured now), the CPU smoke session or the CPU timing session."""
        if smoke or cpu:
            return cls(device=torch.device("cpu"), ceilings=None, smoke=smoke, cpu_timing=cpu and not smoke)
        device = require_cuda()
        return cls(device=device, ceilings=measure_ceilings(device))

    def reset(self) -> None:
        """Forget the rows and skipped backends (between families)."""
        self.rows = []
        self.skipped = []

    def floor_ms(self, *, flops: float = 0.0, bytes_moved: float = 0.0,
                 flop_rate: str = "bf16_gemm_tflops") -> float | None:
        """max(compute time, memory time) at the measured ceilings; None without ceilings (CPU)."""
        if not self.ceilings:
            return None
        compute = flops / (self.ceilings[flop_rate] * 1e12) if flops else 0.0
        memory = bytes_moved / (self.ceilings["copy_tb_s"] * 1e12) if bytes_moved else 0.0
        return max(compute, memory) * 1e3

    def compile(self, fn: Callable) -> Callable:
        """``torch.compile`` of a reference function (the strongest cheap baseline). In the smoke
        tier it uses dynamo's ``eager`` backend: the tracing path is tested without inductor's
        CPU code generation (minutes on a small machine)."""
        return torch.compile(fn, dynamic=False, backend="eager" if self.smoke else "inductor")

    def skip(self, family: str, impl: str, reason: str) -> None:
        """Note (once) that ``impl`` was not run for ``family`` and why."""
        entry = {"family": family, "impl": impl, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)
            logger.warning("%s: %s skipped: %s", family, impl, reason)

    def fused_backends(self, family: str, op: str) -> list[str]:
        """The fused backends ("triton", "cuda") that can run ``op`` on this device; the others
        are noted as skipped for ``family`` with the reason."""
        names = []
        for backend in ("triton", "cuda"):
            ok, why = backend_status(backend, self.device, op)
            if ok:
                names.append(backend)
            else:
                self.skip(family, backend, why)
        return names

    def record(self, *, family: str, impl: str, shape: dict[str, Any], fn: Callable[[], Any],
               floor_ms: float | None, checked: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Time ``fn`` and its peak memory (GPU) or run it once (smoke); store and return the row.

        ``checked``: whether this implementation's output was compared with the reference before.
        """
        if self.smoke:
            fn()
            timing: dict[str, Any] = {"median_ms": None, "p20_ms": None, "p80_ms": None}
            peak_mib = None
        elif self.cpu_timing:
            timing = time_cpu_ms(fn)
            peak_mib = None
        else:
            timing = time_ms(fn)
            peak_mib = peak_extra_bytes(fn) / 2**20
        median = timing["median_ms"]
        pct = 100.0 * floor_ms / median if (floor_ms is not None and median) else None
        row = {"family": family, "impl": impl, "shape": shape, "checked": checked, **timing,
               "peak_extra_mib": peak_mib, "floor_ms": floor_ms, "pct_of_floor": pct, **(extra or {})}
        self.rows.append(row)
        self.log_row(row)
        return row

    def add_row(self, row: dict[str, Any]) -> None:
        """Store a row measured by the family itself (e.g. a whole training step)."""
        self.rows.append(row)
        self.log_row(row)

    @staticmethod
    def log_row(row: dict[str, Any]) -> None:
        """One log line per row; says "ran (cpu-smoke, not timed)" when there is no time."""
        where = f"{row['family']} {row['impl']} {row['shape']}"
        if row.get("best_ms") is not None:
            logger.info("%s: best %.1f ms, median %.1f ms of %d (load %.2f -> %.2f)", where, row["best_ms"],
                        row["median_ms"], row["repeats"], row["loadavg_before"], row["loadavg_after"])
            return
        if row.get("median_ms") is None:
            logger.info("%s: ran (cpu-smoke, not timed), checked=%s", where, row.get("checked"))
            return
        pct = row.get("pct_of_floor")
        pct_text = f", {pct:.0f}% of floor" if pct is not None else ""
        peak = row.get("peak_extra_mib")
        peak_text = f", peak +{peak:.0f} MiB" if peak is not None else ""
        logger.info("%s: %.3f ms%s%s", where, row["median_ms"], pct_text, peak_text)

    def payload(self, name: str, tier: str, *, status: str = "ok", error: str | None = None) -> dict[str, Any]:
        """The JSON document of one family (see :meth:`write`)."""
        return {
            "schema": JSON_SCHEMA,
            "family": name,
            "tier": tier,
            "performance": not self.smoke,
            "note": SMOKE_NOTE if self.smoke else CPU_NOTE if self.cpu_timing else GPU_NOTE,
            "status": status,
            "error": error,
            "environment": environment(self.device),
            "ceilings": self.ceilings,
            "shapes": _unique([row["shape"] for row in self.rows]),
            "skipped": self.skipped,
            "rows": self.rows,
        }

    def write(self, out_dir: str | os.PathLike, name: str, tier: str, *, status: str = "ok",
              error: str | None = None) -> Path:
        """Write ``{out_dir}/{name}.json`` (environment, tier, note, ceilings, shapes, rows); return its path."""
        if self.smoke != (tier == SMOKE_TIER) or self.cpu_timing != (tier == CPU_TIER):
            raise ValueError(f"tier {tier!r} does not match this session (smoke={self.smoke}, "
                             f"cpu_timing={self.cpu_timing})")
        path = Path(out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.payload(name, tier, status=status, error=error), indent=2))
        os.replace(tmp, path)
        return path

    def empty_cache(self) -> None:
        """Release cached device memory between shapes (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
