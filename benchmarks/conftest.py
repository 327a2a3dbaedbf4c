"""pytest-benchmark suites of pacofr: ``pytest benchmarks/ --benchmark-json OUT.json``.

The suites (``benchmarks/test_bench_<family>.py``) check each implementation against the torch
reference, then time it with pytest-benchmark's ``benchmark`` fixture (on a GPU each call ends
with ``torch.cuda.synchronize()``). On a GPU they use one quick-tier shape per family; without
one they run tiny shapes with the CPU backends so the suites stay tested: those timings are CPU
times of toy shapes, marked as such in ``extra_info``, not performance numbers. The fused
backends are skipped with the reason (triton on CPU would only time its interpreter). These
files are outside ``tests/``, so ``pytest tests`` never collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from pacofr.ops._dispatch import backend_status

ON_GPU = torch.cuda.is_available()
CPU_ROUNDS = 5
CPU_NOTE = "CPU run on a toy shape to keep the suite tested: not a performance number; GPU numbers need a GPU"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


def require_backend(backend: str, device: torch.device, op: str) -> None:
    """Skip the test, with the reason, when ``backend`` cannot be timed on ``device``."""
    if backend in ("triton", "cuda") and device.type != "cuda":
        pytest.skip(f"{backend} is a GPU backend; without a CUDA device there is nothing to time "
                    "(the cpu-smoke tier of python -m benchmarks.run checks it through the interpreter)")
    ok, why = backend_status(backend, device, op)
    if not ok:
        pytest.skip(f"{backend} unavailable: {why}")


@pytest.fixture
def timed(benchmark: Any, bench_device: torch.device) -> Callable[..., Any]:
    """``timed(fn, **info)``: benchmark ``fn`` (synchronised on a GPU) with ``info`` in extra_info."""
    def run(fn: Callable[[], Any], **info: Any) -> Any:
        benchmark.extra_info.update({key: str(value) for key, value in info.items()})
        benchmark.extra_info["device"] = (torch.cuda.get_device_name(bench_device) if bench_device.type == "cuda"
                                          else "cpu")
        if bench_device.type != "cuda":  # a few rounds suffice to keep the suite tested
            benchmark.extra_info["note"] = CPU_NOTE
            return benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=1)

        def synced() -> Any:
            out = fn()
            torch.cuda.synchronize()
            return out

        return benchmark(synced)

    return run
