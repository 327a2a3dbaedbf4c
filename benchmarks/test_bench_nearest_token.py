"""pytest-benchmark suite of ``nearest_token`` (see benchmarks/conftest.py for CPU vs GPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_nearest_token import CHECK_REL_TOL, DENSE_REL_TOL, Shape, check, dense_lookup
from benchmarks.conftest import ON_GPU, require_backend
from pacofr.ops import nearest_token

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install pytest-benchmark)")

SHAPE = Shape(50176, 8192, 256, 1, "bf16") if ON_GPU else Shape(257, 64, 32, 1, "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def inputs(bench_device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Clustered queries, the codebook and the torch reference result."""
    generator = torch.Generator(device=bench_device).manual_seed(0)
    codebook = torch.randn(SHAPE.codes, SHAPE.dim, device=bench_device, generator=generator)
    owners = torch.randint(0, SHAPE.codes, (SHAPE.n,), device=bench_device, generator=generator)
    x = codebook[owners] + 0.1 * torch.randn(SHAPE.n, SHAPE.dim, device=bench_device, generator=generator)
    x, codebook = x.to(DTYPES[SHAPE.dtype]), codebook.to(DTYPES[SHAPE.dtype])
    return x, codebook, nearest_token(x, codebook, SHAPE.k, SHAPE.metric, backend="torch")


@pytest.mark.parametrize("impl", ["reference", "dense", "triton", "cuda"])
def test_nearest_token(timed, inputs, bench_device: torch.device, impl: str) -> None:
    x, codebook, reference = inputs
    if impl == "dense":
        fn, tol = (lambda: dense_lookup(x, codebook, SHAPE.k)), DENSE_REL_TOL[SHAPE.dtype]
    else:
        backend = "torch" if impl == "reference" else impl
        require_backend(backend, bench_device, "nearest_token")
        fn, tol = (lambda: nearest_token(x, codebook, SHAPE.k, SHAPE.metric, backend=backend)), CHECK_REL_TOL["ieee"]
    check(impl, SHAPE, x, codebook, fn(), reference, tol)
    timed(fn, family="nearest_token", impl=impl, shape=SHAPE)
