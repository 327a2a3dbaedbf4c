"""CPU benchmark family: the torch backend of the codebook ops beside the best CPU libraries.

    python -m benchmarks.run --cpu --out benchmarks/results/<date>-cpu-2core

Rows (issue 19), fp32, one process, torch's threads (recorded in the environment):

* ``nearest_token``: ``pacofr_torch`` (the sort-free torch backend), ``pacofr_torch_sorted`` (the
  sort-based implementation it replaced, kept as the test oracle in ``tests/_oracles.py``),
  ``faiss_flat`` (faiss-cpu ``IndexFlatL2``, or ``IndexFlatIP`` on normalised vectors for cosine;
  the index is built outside the timing), ``cdist_topk`` (``torch.cdist`` + ``topk``/``min``, an
  N x K matrix) and ``pykeops_argkmin`` (pykeops ``argKmin`` on the CPU, compiled with g++ at
  first use, outside the timing; skipped with the reason when it does not import or build);
* ``soft_assign`` forward + backward (gradients of the queries and the codebook):
  ``pacofr_torch``, ``pacofr_torch_sorted`` and ``dense_topk_softmax`` (one N x K score GEMM,
  ``topk``, softmax, gather, autograd through it: :func:`benchmarks.bench_soft_assign.dense_soft_assign`).

Every implementation is checked before it is timed, with the gates of the GPU families: nearest
token tie-aware against the torch backend (:func:`benchmarks.bench_nearest_token.check`), soft
assignment's selection, weights, token and both gradients (:func:`benchmarks.bench_soft_assign.check_impl`).
Times are :func:`benchmarks.harness.time_cpu_ms` (best of N wall-clock runs, the load average around
them); each row also holds ``ratio_to_pacofr``, its best time over ``pacofr_torch``'s.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import bench_nearest_token, bench_soft_assign
from benchmarks.harness import Bench
from pacofr.ops import nearest_token, soft_assign

FAMILY = "cpu"
NEAREST_SHAPES = (
    bench_nearest_token.Shape(8192, 4096, 64, 1, "fp32"),
    bench_nearest_token.Shape(8192, 4096, 64, 8, "fp32"),
    bench_nearest_token.Shape(4096, 8192, 256, 1, "fp32"),
    bench_nearest_token.Shape(8192, 4096, 64, 1, "fp32", metric="cosine"),
)
SOFT_SHAPES = (
    bench_soft_assign.Shape(8192, 4096, 64, 4, "fp32"),
    bench_soft_assign.Shape(8192, 256, 32, 4, "fp32"),  # the demo's codebook
)
OURS = "pacofr_torch"


def load_test_oracles() -> ModuleType:
    """``tests/_oracles.py`` (the sort-based implementations), loaded by path: ``tests`` is no package."""
    path = Path(__file__).resolve().parents[1] / "tests" / "_oracles.py"
    spec = importlib.util.spec_from_file_location("pacofr_test_oracles", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------
# nearest_token peers: each returns (distances (N, k) as pacofr reports them, indices (N, k))
# ------------------------------------------------------------------------------------------

def faiss_search(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str) -> Callable[[], Any] | str:
    """A timed faiss-cpu exact search (index built here), or the reason it cannot run."""
    try:
        import faiss
    except ImportError as err:
        return f"faiss-cpu does not import ({err}); pip install faiss-cpu"
    dim = codebook.shape[1]
    if metric == "l2":
        index = faiss.IndexFlatL2(dim)
        index.add(codebook.numpy())

        def search() -> tuple[torch.Tensor, torch.Tensor]:
            distances, indices = index.search(x.numpy(), k)
            return torch.from_numpy(distances), torch.from_numpy(indices)
    else:
        index = faiss.IndexFlatIP(dim)
        index.add(F.normalize(codebook, dim=1).numpy())

        def search() -> tuple[torch.Tensor, torch.Tensor]:
            similarities, indices = index.search(F.normalize(x, dim=1).numpy(), k)
            return 1.0 - torch.from_numpy(similarities), torch.from_numpy(indices)
    return search


def cdist_topk(x: torch.Tensor, codebook: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.cdist`` (an N x K matrix of L2 distances) then ``min`` (k = 1) or ``topk``."""
    distances = torch.cdist(x, codebook)
    if k == 1:
        best, index = distances.min(dim=1, keepdim=True)
    else:
        best, index = distances.topk(k, dim=1, largest=False)
    return best.square(), index


def pykeops_argkmin(x: torch.Tensor, codebook: torch.Tensor, k: int) -> Callable[[], Any] | str:
    """A timed pykeops ``argKmin`` on squared L2 distances (compiled now), or the reason it cannot run."""
    try:
        from pykeops.torch import LazyTensor
    except Exception as err:  # noqa: BLE001 - any import failure (no compiler, no package) means skip
        return f"pykeops does not import ({type(err).__name__}: {err}); pip install pykeops (needs g++)"

    def search() -> tuple[torch.Tensor, torch.Tensor]:
        squared = ((LazyTensor(x[:, None, :]) - LazyTensor(codebook[None, :, :])) ** 2).sum(-1)
        index = squared.argKmin(k, dim=1).long()
        return (x[:, None, :] - codebook[index]).square().sum(-1), index

    try:
        search()  # compiles the reduction once
    except Exception as err:  # noqa: BLE001 - a failed build is a skip with its reason
        return f"pykeops failed to build or run its CPU reduction ({type(err).__name__}: {err})"
    return search


def bench_nearest(bench: Bench, shape: bench_nearest_token.Shape, oracles: ModuleType,
                  generator: torch.Generator) -> None:
    """Check, then time every nearest_token implementation on ``shape``."""
    codebook = torch.randn(shape.codes, shape.dim, generator=generator)
    owners = torch.randint(0, shape.codes, (shape.n,), generator=generator)
    x = codebook[owners] + 0.1 * torch.randn(shape.n, shape.dim, generator=generator)
    impls: dict[str, Callable[[], Any]] = {
        OURS: lambda: nearest_token(x, codebook, shape.k, shape.metric, backend="torch"),
        "pacofr_torch_sorted": lambda: oracles.nearest_token_sorted(x, codebook, shape.k, shape.metric),
    }
    peers: dict[str, Callable[[], Any] | str] = {"faiss_flat": faiss_search(x, codebook, shape.k, shape.metric)}
    if shape.metric == "l2":
        peers["cdist_topk"] = lambda: cdist_topk(x, codebook, shape.k)
        peers["pykeops_argkmin"] = pykeops_argkmin(x, codebook, shape.k)
    for name, peer in peers.items():
        if isinstance(peer, str):
            bench.skip(FAMILY, name, peer)
        else:
            impls[name] = peer
    reference = impls[OURS]()
    checks = {name: bench_nearest_token.check(name, shape, x, codebook, fn(), reference,
                                              bench_nearest_token.CHECK_REL_TOL["ieee"])
              for name, fn in impls.items()}
    record_shape(bench, {"op": "nearest_token", **asdict(shape)}, impls, checks)


def bench_soft(bench: Bench, shape: bench_soft_assign.Shape, oracles: ModuleType, generator: torch.Generator) -> None:
    """Check, then time forward + backward of every soft_assign implementation on ``shape``."""
    q, codebook, grad_out = bench_soft_assign.make_inputs(shape, torch.device("cpu"), generator)
    impls: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
        OURS: lambda q_, cb_: tuple(soft_assign(q_, cb_, shape.m, shape.tau, metric=shape.metric, backend="torch")),
        "pacofr_torch_sorted": lambda q_, cb_: oracles.soft_assign_sorted(q_, cb_, shape.m, shape.tau, shape.metric),
        "dense_topk_softmax": lambda q_, cb_: bench_soft_assign.dense_soft_assign(q_, cb_, shape.m, shape.tau,
                                                                                 shape.metric),
    }
    reference_indices = impls[OURS](q, codebook)[1]
    checks = {name: {"index_agreement": bench_soft_assign.check_impl(name, shape, fn, q, codebook,
                                                                      reference_indices, grad_out)}
              for name, fn in impls.items()}
    q_leaf, cb_leaf = q.detach().requires_grad_(), codebook.detach().requires_grad_()
    timed = {name: (lambda fn=fn: torch.autograd.grad(fn(q_leaf, cb_leaf)[0], (q_leaf, cb_leaf), grad_out))
             for name, fn in impls.items()}
    record_shape(bench, {"op": "soft_assign", "stage": "forward_backward", **asdict(shape)}, timed, checks)


def record_shape(bench: Bench, shape: dict[str, Any], impls: dict[str, Callable[[], Any]],
                 checks: dict[str, dict[str, float]]) -> None:
    """Time every (already checked) implementation of one shape; add each row's ratio to ours."""
    rows = [bench.record(family=FAMILY, impl=name, shape=shape, fn=fn, floor_ms=None, checked=True,
                         extra=checks[name]) for name, fn in impls.items()]
    ours = next(row for row in rows if row["impl"] == OURS)
    for row in rows:
        row["ratio_to_pacofr"] = (row["best_ms"] / ours["best_ms"]
                                  if row.get("best_ms") is not None and ours.get("best_ms") else None)


def run(tier: str, bench: Bench, *, nearest_shapes: tuple[bench_nearest_token.Shape, ...] = NEAREST_SHAPES,
        soft_shapes: tuple[bench_soft_assign.Shape, ...] = SOFT_SHAPES) -> None:
    """Check then time every implementation on every shape (``tier`` is ``"cpu"``; there is no
    ``torch.compile`` baseline on the CPU: inductor's CPU code generation takes minutes here)."""
    del tier
    oracles = load_test_oracles()
    generator = torch.Generator().manual_seed(0)
    for shape in nearest_shapes:
        bench_nearest(bench, shape, oracles, generator)
    for shape in soft_shapes:
        bench_soft(bench, shape, oracles, generator)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run --cpu`` with the same options."""
    from benchmarks.run import main as run_main

    return run_main(["--cpu", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
