"""pytest-benchmark suite of ``soft_assign`` and ``codebook_stats`` (see benchmarks/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_soft_assign import (
    Shape,
    StatsShape,
    check_impl,
    dense_soft_assign,
    make_inputs,
    stats_inputs,
)
from benchmarks.conftest import ON_GPU, require_backend
from pacofr.ops import codebook_stats, soft_assign
from pacofr.ops.soft_assign import codebook_stats_reference

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

SHAPE = Shape(50176, 8192, 256, 4, "bf16") if ON_GPU else Shape(257, 64, 32, 4, "fp32")
STATS = StatsShape(50176, 8192, 256, 8, "bf16") if ON_GPU else StatsShape(257, 64, 32, 4, "fp32")


def _impl(name: str):
    if name == "dense":
        return lambda q, cb: dense_soft_assign(q, cb, SHAPE.m, SHAPE.tau, SHAPE.metric)
    backend = "torch" if name == "reference" else name
    return lambda q, cb: tuple(soft_assign(q, cb, SHAPE.m, SHAPE.tau, metric=SHAPE.metric, backend=backend))


@pytest.mark.parametrize("stage", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ["reference", "dense", "triton", "cuda"])
def test_soft_assign(timed, bench_device: torch.device, impl: str, stage: str) -> None:
    if impl in ("triton", "cuda"):
        require_backend(impl, bench_device, "soft_assign")
    generator = torch.Generator(device=bench_device).manual_seed(0)
    q, codebook, grad_out = make_inputs(SHAPE, bench_device, generator)
    reference = soft_assign(q, codebook, SHAPE.m, SHAPE.tau, metric=SHAPE.metric, backend="torch").indices
    fn = _impl(impl)
    check_impl(impl, SHAPE, fn, q, codebook, reference, grad_out)
    if stage == "forward":
        with torch.no_grad():
            timed(lambda: fn(q, codebook), family="soft_assign", impl=impl, stage=stage, shape=SHAPE)
        return
    q_leaf, cb_leaf = q.detach().requires_grad_(), codebook.detach().requires_grad_()
    timed(lambda: torch.autograd.grad(fn(q_leaf, cb_leaf)[0], (q_leaf, cb_leaf), grad_out),
          family="soft_assign", impl=impl, stage=stage, shape=SHAPE)


@pytest.mark.parametrize("impl", ["reference", "triton", "cuda"])
def test_codebook_stats(timed, bench_device: torch.device, impl: str) -> None:
    backend = "torch" if impl == "reference" else impl
    require_backend(backend, bench_device, "codebook_stats")
    generator = torch.Generator(device=bench_device).manual_seed(0)
    indices, weights, x = stats_inputs(STATS, bench_device, generator)

    def fn():
        return codebook_stats(indices, STATS.codes, weights=weights, x=x, backend=backend)

    counts, sums = fn()
    want_counts, want_sums = codebook_stats_reference(indices, STATS.codes, weights.double(), x.double())
    torch.testing.assert_close(counts.double(), want_counts, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(sums.double(), want_sums, atol=1e-3, rtol=1e-4)
    timed(fn, family="soft_assign", impl=impl, stage="stats", shape=STATS)
