"""Benchmark of ``pacofr.ops.nearest_token`` (GPU tiers need a CUDA device; none has been run yet).

    python -m benchmarks.bench_nearest_token --quick --out DIR      # or via benchmarks.run
    python -m benchmarks.bench_nearest_token --full --out DIR
    python -m benchmarks.bench_nearest_token --cpu-smoke --out DIR  # CPU, tiny shapes, no times

Per shape (N queries, K codes, D dims, k neighbours, dtype) it first checks every implementation
against the chunked torch reference (tie-aware: each returned code's exact fp64 distance must be
within tolerance of the reference's at the same rank; the dense baseline, which ranks by a GEMM in
the input dtype, with a bf16-sized tolerance), then times side by side:
``reference`` (the chunked torch backend), ``dense`` (one GEMM + argmin/topk, the usual eager
code), ``dense_compiled`` (``torch.compile`` of it), ``triton``, ``cuda`` and the peer libraries
that are installed (:mod:`benchmarks.peers`: flash-kmeans, KeOps, vector-quantize-pytorch;
checked the same way, with the exact distances of their indices). Each row holds the
do_bench median/p20/p80, the peak extra memory, and % of floor (2*N*K*D FLOPs at the measured bf16
GEMM rate, or the HBM time of reading inputs and writing outputs when larger).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import SMOKE_TIER, Bench, headline_first
from benchmarks.peers import NEAREST_TOKEN_PEERS
from pacofr.ops import nearest_token

FAMILY = "nearest_token"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: rank-wise distance tolerance against the exact reference, per precision of the products
CHECK_REL_TOL = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 1e-3, "bf16": 8e-3}
#: the dense baseline ranks by one GEMM in the input dtype (bf16: 8 mantissa bits)
DENSE_REL_TOL = {"bf16": 2e-2, "fp32": 1e-5}


@dataclass(frozen=True)
class Shape:
    n: int
    codes: int
    dim: int
    k: int
    dtype: str
    metric: str = "l2"
    precision: str = "ieee"  #: of the products, for fp32 inputs (pacofr.ops.precision)


#: the headline shape of the GPU tiers (kernels.md's reference case), measured first
HEADLINE = Shape(50176, 8192, 256, 1, "bf16")


def shapes(tier: str) -> Iterator[Shape]:
    """The quick tier (a few minutes), the full matrix of the issue, or the tiny CPU smoke shapes;
    the first is the headline shape."""
    if tier == SMOKE_TIER:
        yield Shape(129, 33, 16, 1, "fp32")
        yield Shape(64, 100, 32, 4, "bf16")
        yield Shape(33, 7, 8, 1, "fp32", metric="cosine")
        return
    yield from headline_first(HEADLINE, _quick_shapes() if tier == "quick" else _full_shapes())


def _quick_shapes() -> Iterator[Shape]:
    for dim, codes in itertools.product((64, 256, 768), (8192, 16384)):
        yield Shape(50176, codes, dim, 1, "bf16")
    yield Shape(50176, 8192, 256, 8, "bf16")
    yield Shape(50176, 8192, 256, 1, "bf16", metric="cosine")
    for precision in ("ieee", "tf32x3", "tf32", "bf16"):
        yield Shape(50176, 8192, 256, 1, "fp32", precision=precision)


def _full_shapes() -> Iterator[Shape]:
    for n, dim, codes, k, dtype in itertools.product((50176, 37632), (64, 256, 768), (1024, 8192, 16384),
                                                     (1, 4, 8), ("bf16", "fp32")):
        yield Shape(n, codes, dim, k, dtype)
    for precision in ("tf32x3", "tf32", "bf16"):
        yield Shape(50176, 8192, 256, 1, "fp32", precision=precision)
    yield Shape(50176, 8192, 256, 4, "bf16", metric="cosine")


def dense_lookup(x: torch.Tensor, codebook: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual eager code: one GEMM in the input dtype, fp32 epilogue, argmin/topk (N x K buffer)."""
    scores = 0.5 * codebook.float().square().sum(1) - (x @ codebook.T).float()
    if k == 1:
        index = scores.argmin(dim=1, keepdim=True)
        best = scores.gather(1, index)
    else:
        best, index = scores.topk(k, dim=1, largest=False)
    return (x.float().square().sum(1, keepdim=True) + 2 * best).clamp_min(0), index


def exact_distances(x: torch.Tensor, codebook: torch.Tensor, index: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 distances ``(N, k)`` of the given codes, computed directly (chunked over rows)."""
    out = torch.empty(index.shape, dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], 4096):
        rows = x[r0:r0 + 4096].double()[:, None, :]
        codes = codebook.double()[index[r0:r0 + 4096].long()]
        if metric == "l2":
            out[r0:r0 + 4096] = (rows - codes).square().sum(-1)
        else:
            cos = torch.nn.functional.cosine_similarity(rows, codes, dim=-1, eps=1e-300)
            out[r0:r0 + 4096] = 1.0 - cos
    return out


def check(name: str, shape: Shape, x: torch.Tensor, codebook: torch.Tensor,
          result: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
          rel_tol: float) -> dict[str, float]:
    """Tie-aware check of one implementation's ``(dist, index)`` against the reference.

    Each returned code's exact fp64 distance must be within ``rel_tol * scale`` of the reference's
    at the same rank, and the returned distance within the same of that exact distance (scale:
    ``||x||^2 + max ||e||^2`` for l2, 1 for cosine). Raises AssertionError naming ``name``.
    """
    dist, index = result
    mine = exact_distances(x, codebook, index, shape.metric)
    theirs = exact_distances(x, codebook, reference[1], shape.metric)
    if shape.metric == "l2":
        scale = x.double().square().sum(1, keepdim=True) + codebook.double().square().sum(1).max()
    else:
        scale = torch.ones((x.shape[0], 1), dtype=torch.float64, device=x.device)
    tol = rel_tol * scale
    excess = ((mine - theirs).abs() - tol).max().item()
    dist_excess = ((dist.double() - mine).abs() - tol).max().item()
    if excess > 0 or dist_excess > 0:
        raise AssertionError(f"{name} disagrees with the reference on {shape}: rank excess {excess:.3g}, "
                             f"distance excess {dist_excess:.3g}")
    return {"index_agreement": (index.long() == reference[1].long()).float().mean().item()}


def bench_shape(bench: Bench, shape: Shape, generator: torch.Generator, with_compile: bool) -> None:
    """Check then time every implementation on ``shape``; rows go into ``bench``."""
    dtype = DTYPES[shape.dtype]
    codebook = torch.randn(shape.codes, shape.dim, device=bench.device, generator=generator).to(dtype)
    owners = torch.randint(0, shape.codes, (shape.n,), device=bench.device, generator=generator)
    noise = torch.randn(shape.n, shape.dim, device=bench.device, generator=generator)
    x = (codebook[owners].float() + 0.1 * noise).to(dtype)
    reference = nearest_token(x, codebook, shape.k, shape.metric, backend="torch")
    flops = 2.0 * shape.n * shape.codes * shape.dim
    bytes_moved = (shape.n + shape.codes) * shape.dim * x.element_size() + shape.n * shape.k * 12
    floor = bench.floor_ms(flops=flops, bytes_moved=bytes_moved)
    impls: dict[str, Callable[[], object]] = {
        "reference": lambda: nearest_token(x, codebook, shape.k, shape.metric, backend="torch"),
    }
    checks: dict[str, dict[str, float]] = {"reference": {}}
    if shape.metric == "l2":
        impls["dense"] = lambda: dense_lookup(x, codebook, shape.k)
        if with_compile:
            compiled_lookup = bench.compile(dense_lookup)
            impls["dense_compiled"] = lambda: compiled_lookup(x, codebook, shape.k)
        for impl in [name for name in impls if name.startswith("dense")]:
            checks[impl] = check(impl, shape, x, codebook, impls[impl](), reference, DENSE_REL_TOL[shape.dtype])
    for peer in NEAREST_TOKEN_PEERS if bench.peers else ():
        try:  # a peer that cannot run here (e.g. its JIT fails on this machine) is a skipped row, not a lost shape
            lookup = peer.prepare(x, codebook, shape.k, shape.metric)
            index = lookup() if not isinstance(lookup, str) else None
        except Exception as err:  # noqa: BLE001 - recorded as the skip reason
            lookup = f"failed to run here: {type(err).__name__}: {err}"
        if isinstance(lookup, str):
            bench.skip(FAMILY, peer.name, lookup)
            continue
        impls[peer.name] = lookup
        checks[peer.name] = check(peer.name, shape, x, codebook,
                                  (exact_distances(x, codebook, index, shape.metric).float(), index), reference,
                                  DENSE_REL_TOL[shape.dtype])
    for backend in bench.fused_backends(FAMILY, "nearest_token"):
        impls[backend] = (lambda backend=backend: nearest_token(
            x, codebook, shape.k, shape.metric, precision=shape.precision, backend=backend))
        checks[backend] = check(backend, shape, x, codebook, impls[backend](), reference,
                                CHECK_REL_TOL[shape.precision])
    for impl, fn in impls.items():
        bench.record(family=FAMILY, impl=impl, shape=asdict(shape), fn=fn, floor_ms=floor,
                     checked=impl in checks, extra={"gflop": flops / 1e9, **checks[impl]})


def run(tier: str, bench: Bench) -> None:
    """Check then time every implementation on the shapes of ``tier`` that ``bench`` selects; rows go into ``bench``."""
    generator = torch.Generator(device=bench.device).manual_seed(0)
    for shape, headline in bench.select(shapes(tier)):
        bench_shape(bench, shape, generator, bench.should_compile(headline))
        bench.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run --only nearest_token`` with the same options."""
    from benchmarks.run import main as run_main

    return run_main(["--only", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
