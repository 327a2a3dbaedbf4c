"""Shared benchmark machinery: timing, peak memory, device ceilings, environment record, JSON.

Every family module ``benchmarks/bench_<family>.py`` exposes ``run(tier: str, bench: Bench) -> None``
and uses :class:`Bench` to time implementations side by side (eager reference, ``torch.compile`` of
it, triton, cuda) after checking them against the reference (a mismatch raises before any time is
recorded). Kernel times are ``triton.testing.do_bench`` medians with p20/p80 in milliseconds (CUDA
events); memory is the peak allocated above the inputs' footprint; "% of floor" compares with the
device's measured bf16 GEMM rate and copy bandwidth.

The first shape a family's ``shapes(tier)`` yields is its *headline* shape. A session runs all
shapes, the headline only or the rest (:meth:`Bench.select`), and builds ``torch.compile``
baselines for the headline shape only unless asked otherwise (:meth:`Bench.should_compile`): each
compiled baseline costs a compilation per shape. Every row goes to the family's JSON Lines file the
moment it is measured (:mod:`benchmarks.row_log`), so a killed run keeps what it measured.

Four kinds of session:

* GPU tiers (``quick``, ``full``): need a CUDA device, measure the ceilings first (or read them
  from a file an earlier process of the same run wrote).
* GPU check-only (``check_only``): the GPU tiers' shapes and correctness checks, each
  implementation run once after its check, no times (the GPU check runs it first, for evidence
  before any compilation of baselines and any timing).
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

import pacofr
from benchmarks import row_log
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
CHECK_NOTE = ("GPU check-only run: every implementation was checked against the torch reference on the GPU "
              "and then run once. No times, memory or % of floor are recorded here; the timed rows are in "
              "the benchmark run's own files.")
NO_GPU_MESSAGE = ("no CUDA device is visible: the quick and full benchmark tiers time GPU kernels and need a "
                  "GPU. Run `python -m benchmarks.run --cpu-smoke --out DIR` for the CPU smoke tier "
                  "(correctness and code paths only, no performance numbers).")
FUSED_BACKENDS: tuple[str, ...] = ("triton", "cuda")
SELECTIONS: tuple[str, ...] = ("all", "headline", "rest")
COMPILE_POLICIES: tuple[str, ...] = ("headline", "all", "none")

logger = logging.getLogger("benchmarks")
ShapeT = TypeVar("ShapeT")


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


def headline_first(headline: ShapeT, shapes: Iterable[ShapeT]) -> Iterator[ShapeT]:
    """``headline``, then every shape of ``shapes`` that is not it (a family's GPU tiers put their headline first)."""
    yield headline
    yield from (shape for shape in shapes if shape != headline)


def load_or_measure_ceilings(device: torch.device, path: Path | None) -> dict[str, float]:
    """The ceilings stored in ``path`` by an earlier process of the same run, else measured now (and
    stored there when ``path`` is given): the GPU check measures them once, not once per stage."""
    if path is not None and path.is_file():
        ceilings = json.loads(path.read_text())
        logger.info("ceilings read from %s: %s", path, ceilings)
        return ceilings
    ceilings = measure_ceilings(device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text(json.dumps(ceilings))
        os.replace(partial, path)
    return ceilings


@dataclass
class Bench:
    """One benchmark session on one device: ceilings measured once, rows collected and logged.

    ``smoke=True`` is the CPU smoke tier and ``check_only=True`` the GPU check-only session: no
    ceilings, :meth:`record` runs ``fn`` once and stores no time, memory or floor (those fields are
    None). ``cpu_timing=True`` is the CPU performance tier: :meth:`record` stores :func:`time_cpu_ms`
    (no memory, no floor). ``fused`` are the fused backends this session may run (the others are
    skipped rows); ``selection`` and ``compile_policy`` pick the shapes and the compiled baselines;
    ``peers=False`` leaves the peer libraries out.
    Between :meth:`open` and :meth:`write` every row and skip is appended to the family's JSON Lines
    file as it happens.
    """

    device: torch.device
    ceilings: dict[str, float] | None
    smoke: bool = False
    cpu_timing: bool = False
    check_only: bool = False
    fused: tuple[str, ...] = FUSED_BACKENDS
    selection: str = "all"
    compile_policy: str = "headline"
    peers: bool = True  #: time the installed peer libraries (benchmarks.peers) beside pacofr
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    log: Path | None = None  #: the open family's JSON Lines file

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.compile_policy not in COMPILE_POLICIES:
            raise ValueError(f"compile_policy must be one of {COMPILE_POLICIES}, got {self.compile_policy!r}")
        unknown = set(self.fused) - set(FUSED_BACKENDS)
        if unknown:
            raise ValueError(f"fused backends must be among {FUSED_BACKENDS}, got {sorted(unknown)}")

    @classmethod
    def start(cls, *, smoke: bool = False, cpu: bool = False, check_only: bool = False,
              ceilings_file: Path | None = None, **options: Any) -> Bench:
        """A GPU session (ceilings measured now, or read from ``ceilings_file``), the GPU check-only
        session, the CPU smoke session or the CPU timing session; ``options`` are the other fields."""
        if smoke or cpu:
            return cls(device=torch.device("cpu"), ceilings=None, smoke=smoke, cpu_timing=cpu and not smoke,
                       **options)
        device = require_cuda()
        ceilings = None if check_only else load_or_measure_ceilings(device, ceilings_file)
        return cls(device=device, ceilings=ceilings, check_only=check_only, **options)

    @property
    def timed(self) -> bool:
        """Whether :meth:`record` measures times (not in the smoke tier nor a check-only session)."""
        return not (self.smoke or self.check_only)

    def select(self, shapes: Iterable[ShapeT]) -> Iterator[tuple[ShapeT, bool]]:
        """The shapes of this session's selection, each with whether it is the headline (the first)."""
        for index, shape in enumerate(shapes):
            headline = index == 0
            if self.selection == "headline" and not headline:
                return
            if self.selection != "rest" or not headline:
                yield shape, headline

    def should_compile(self, headline: bool) -> bool:
        """Whether to build ``torch.compile`` baselines for a shape (by default the headline only)."""
        return self.compile_policy == "all" or (self.compile_policy == "headline" and headline)

    def reset(self) -> None:
        """Forget the rows and skipped backends (between families)."""
        self.rows = []
        self.skipped = []

    def note(self) -> str:
        """What the numbers of this session are (the JSON's ``note``)."""
        if self.smoke:
            return SMOKE_NOTE
        if self.check_only:
            return CHECK_NOTE
        return CPU_NOTE if self.cpu_timing else GPU_NOTE

    def open(self, out_dir: str | os.PathLike, name: str, tier: str, *, append: bool = False) -> Path:
        """Start family ``name``: forget earlier rows, start ``{out_dir}/{name}.jsonl`` (or add a run to
        it with ``append``) with a run record; return its path."""
        if self.smoke != (tier == SMOKE_TIER) or self.cpu_timing != (tier == CPU_TIER):
            raise ValueError(f"tier {tier!r} does not match this session (smoke={self.smoke}, "
                             f"cpu_timing={self.cpu_timing})")
        self.reset()
        path = row_log.jsonl_path(out_dir, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.unlink(missing_ok=True)
        row_log.append(path, {
            "record": "run", "tier": tier, "performance": self.timed, "note": self.note(),
            "selection": self.selection, "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(self.device), "ceilings": self.ceilings})
        self.log = path
        return path

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
            if self.log is not None:
                row_log.append(self.log, {"record": "skip", **entry})

    def fused_backends(self, family: str, op: str) -> list[str]:
        """The fused backends ("triton", "cuda") this session runs and that can run ``op`` on this
        device; the others are noted as skipped for ``family`` with the reason."""
        names = []
        for backend in FUSED_BACKENDS:
            ok, why = ((False, f"not asked for in this session (fused backends: {', '.join(self.fused)})")
                       if backend not in self.fused else backend_status(backend, self.device, op))
            if ok:
                names.append(backend)
            else:
                self.skip(family, backend, why)
        return names

    def record(self, *, family: str, impl: str, shape: dict[str, Any], fn: Callable[[], Any],
               floor_ms: float | None, checked: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Time ``fn`` and its peak memory (GPU) or run it once (smoke, check-only); store and return the row.

        ``checked``: whether this implementation's output was compared with the reference before.
        """
        if not self.timed:
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
        self.add_row(row)
        return row

    def add_row(self, row: dict[str, Any]) -> None:
        """Store a row (measured by :meth:`record` or by the family itself, e.g. a whole training
        step), append it to the open family's JSON Lines file and log it."""
        self.rows.append(row)
        if self.log is not None:
            row_log.append(self.log, {"record": "row", **row})
        self.log_row(row)

    @staticmethod
    def log_row(row: dict[str, Any]) -> None:
        """One log line per row; says "ran (not timed)" when there is no time."""
        where = f"{row['family']} {row['impl']} {row['shape']}"
        if row.get("best_ms") is not None:
            logger.info("%s: best %.1f ms, median %.1f ms of %d (load %.2f -> %.2f)", where, row["best_ms"],
                        row["median_ms"], row["repeats"], row["loadavg_before"], row["loadavg_after"])
            return
        if row.get("median_ms") is None:
            logger.info("%s: ran (not timed), checked=%s", where, row.get("checked"))
            return
        pct = row.get("pct_of_floor")
        pct_text = f", {pct:.0f}% of floor" if pct is not None else ""
        peak = row.get("peak_extra_mib")
        peak_text = f", peak +{peak:.0f} MiB" if peak is not None else ""
        logger.info("%s: %.3f ms%s%s", where, row["median_ms"], pct_text, peak_text)

    def write(self, out_dir: str | os.PathLike, name: str, tier: str, *, status: str = "ok",
              error: str | None = None) -> Path:
        """End family ``name``: an end record in its JSON Lines file (opened now, with the rows held
        in memory, when :meth:`open` was not called), then ``{out_dir}/{name}.json`` rebuilt from it
        (environment, tier, note, ceilings, runs, shapes, rows); return the JSON's path."""
        path = row_log.jsonl_path(out_dir, name)
        if self.log != path:
            rows, skipped = self.rows, self.skipped
            self.open(out_dir, name, tier)
            for entry in skipped:
                self.skip(entry["family"], entry["impl"], entry["reason"])
            for row in rows:
                row_log.append(path, {"record": "row", **row})
            self.rows = rows
        row_log.append(path, {"record": "end", "status": status, "error": error})
        self.log = None
        return row_log.write_payload(path)

    def empty_cache(self) -> None:
        """Release cached device memory between shapes (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
