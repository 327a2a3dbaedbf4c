"""Shared benchmark machinery: timing, peak memory, device ceilings, environment record, JSON.

Every family module in this folder exposes ``run(tier: str, bench: Bench) -> list[dict]`` and uses
:class:`Bench` to time implementations side by side (eager reference, ``torch.compile`` of it,
triton, cuda) after checking them against the reference. Times are ``triton.testing.do_bench``
medians with p20/p80 in milliseconds; memory is the peak allocated above the inputs' footprint.
Nothing here runs without a CUDA device: GPU numbers need a GPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import pacofr


def require_cuda() -> torch.device:
    """The CUDA device to benchmark on; a clear error when there is none."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks time GPU kernels and need a CUDA device; none is visible here")
    return torch.device("cuda", torch.cuda.current_device())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    """Device, driver and software versions, date and git commit of this run."""
    import triton

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        driver = None
    return {
        "device": props.name,
        "capability": f"sm_{props.major}{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": driver,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "pacofr": pacofr.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def time_ms(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100) -> dict[str, float]:
    """Median, p20 and p80 of ``fn``'s run time in ms (CUDA events via ``triton.testing.do_bench``)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": p50, "p20_ms": p20, "p80_ms": p80}


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


@dataclass
class Bench:
    """One benchmark session on one device: ceilings measured once, rows collected."""

    device: torch.device
    ceilings: dict[str, float]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def start(cls) -> Bench:
        device = require_cuda()
        return cls(device=device, ceilings=measure_ceilings(device))

    def floor_ms(self, *, flops: float = 0.0, bytes_moved: float = 0.0, flop_rate: str = "bf16_gemm_tflops") -> float:
        """max(compute time, memory time) at the measured ceilings."""
        compute = flops / (self.ceilings[flop_rate] * 1e12) if flops else 0.0
        memory = bytes_moved / (self.ceilings["copy_tb_s"] * 1e12) if bytes_moved else 0.0
        return max(compute, memory) * 1e3

    def record(self, *, family: str, impl: str, shape: dict[str, Any], fn: Callable[[], Any],
               floor_ms: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Time ``fn`` and its peak memory; store and return the row (with % of floor)."""
        timing = time_ms(fn)
        row = {"family": family, "impl": impl, "shape": shape, **timing,
               "peak_extra_mib": peak_extra_bytes(fn) / 2**20, "floor_ms": floor_ms,
               "pct_of_floor": 100.0 * floor_ms / timing["median_ms"] if timing["median_ms"] > 0 else None,
               **(extra or {})}
        self.rows.append(row)
        return row

    def write(self, out_dir: str | os.PathLike, name: str, tier: str) -> Path:
        """Write ``{name}.json`` with the environment, ceilings and rows; return its path."""
        path = Path(out_dir) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(), "tier": tier, "ceilings": self.ceilings, "rows": self.rows}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)
        return path


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of a reference function (the strongest cheap baseline)."""
    return torch.compile(fn, dynamic=False)
