"""Test-session set-up shared by every test module.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter, which must
be switched on before ``triton`` is first imported: this file does it at collection time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # import now, so that no test that edits the environment decides Triton's mode
        import triton.language  # noqa: F401
    except ImportError:
        pass

import pytest  # noqa: E402  (after the environment is set)

import pacofr  # noqa: E402

# The wheel check (.ci/wheel_check.py) runs a copy of these tests against the wheel it installed and sets
# PACOFR_TESTS_INSTALLED to that virtualenv: a pacofr imported from anywhere else (the source tree)
# would test the wrong thing.
_INSTALLED_IN = os.environ.get("PACOFR_TESTS_INSTALLED")
if _INSTALLED_IN and not os.path.realpath(pacofr.__file__).startswith(os.path.realpath(_INSTALLED_IN) + os.sep):
    raise pytest.UsageError(f"pacofr was imported from {pacofr.__file__}, not from the wheel installed in {_INSTALLED_IN}")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` cleanly when no CUDA device is visible."""
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible); run python -m benchmarks.gpu_check on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device the suite can run on here (CUDA tests are skipped without a GPU)."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny shapes run fastest so, and far slower with two threads on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator seeded freshly per test from the OS, its seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed: {seed}")
    return torch.Generator().manual_seed(seed)
