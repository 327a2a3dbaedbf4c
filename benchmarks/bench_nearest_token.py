"""Benchmark of ``pacofr.ops.nearest_token`` (needs a CUDA device; nothing here has been run yet).

    python -m benchmarks.bench_nearest_token --quick --out DIR      # or via benchmarks.run
    python -m benchmarks.bench_nearest_token --full --out DIR

Per shape (N queries, K codes, D dims, k neighbours, dtype) it first checks the triton and cuda
backends against the chunked torch reference (tie-aware: each returned code's exact fp64 distance
must be within tolerance of the reference's at the same rank), then times side by side:
``reference`` (the chunked torch backend), ``dense`` (one GEMM + argmin/topk, the usual eager
code), ``dense_compiled`` (``torch.compile`` of it), ``triton`` and ``cuda``. Each row holds the
do_bench median/p20/p80, the peak extra memory, and % of floor (2*N*K*D FLOPs at the measured bf16
GEMM rate, or the HBM time of reading inputs and writing outputs when larger).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from benchmarks.harness import Bench, compiled
from pacofr.ops import nearest_token
from pacofr.ops._dispatch import backend_status

logger = logging.getLogger("benchmarks.nearest_token")
FAMILY = "nearest_token"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CHECK_REL_TOL = {"exact": 1e-5, "tf32": 1e-3}


@dataclass(frozen=True)
class Shape:
    n: int
    codes: int
    dim: int
    k: int
    dtype: str
    metric: str = "l2"
    tf32: bool = False


def shapes(tier: str) -> Iterator[Shape]:
    """The quick tier (a few minutes) or the full matrix of the issue."""
    if tier == "quick":
        for dim, codes in itertools.product((64, 256, 768), (8192, 16384)):
            yield Shape(50176, codes, dim, 1, "bf16")
        yield Shape(50176, 8192, 256, 8, "bf16")
        yield Shape(50176, 8192, 256, 1, "bf16", metric="cosine")
        yield Shape(50176, 8192, 256, 1, "fp32")
        yield Shape(50176, 8192, 256, 1, "fp32", tf32=True)
        return
    for n, dim, codes, k, dtype in itertools.product((50176, 37632), (64, 256, 768), (1024, 8192, 16384),
                                                     (1, 4, 8), ("bf16", "fp32")):
        yield Shape(n, codes, dim, k, dtype)
    yield Shape(50176, 8192, 256, 1, "fp32", tf32=True)
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


def check(shape: Shape, x: torch.Tensor, codebook: torch.Tensor, backend: str,
          reference: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Tie-aware check of one backend against the reference; raises on a real error."""
    dist, index = nearest_token(x, codebook, shape.k, shape.metric, allow_tf32=shape.tf32, backend=backend)
    mine = exact_distances(x, codebook, index, shape.metric)
    theirs = exact_distances(x, codebook, reference[1], shape.metric)
    if shape.metric == "l2":
        scale = x.double().square().sum(1, keepdim=True) + codebook.double().square().sum(1).max()
    else:
        scale = torch.ones((x.shape[0], 1), dtype=torch.float64, device=x.device)
    tol = CHECK_REL_TOL["tf32" if shape.tf32 else "exact"] * scale
    excess = ((mine - theirs).abs() - tol).max().item()
    dist_excess = ((dist.double() - mine).abs() - tol).max().item()
    if excess > 0 or dist_excess > 0:
        raise AssertionError(f"{backend} disagrees with the reference on {shape}: rank excess {excess:.3g}, "
                             f"distance excess {dist_excess:.3g}")
    return {"index_agreement": (index.long() == reference[1].long()).float().mean().item()}


def run(tier: str, bench: Bench, *, with_compile: bool = True) -> None:
    """Check then time every implementation on every shape of ``tier``; rows go into ``bench``."""
    generator = torch.Generator(device=bench.device).manual_seed(0)
    for shape in shapes(tier):
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
        if shape.metric == "l2":
            impls["dense"] = lambda: dense_lookup(x, codebook, shape.k)
            if with_compile:
                compiled_lookup = compiled(dense_lookup)
                impls["dense_compiled"] = lambda: compiled_lookup(x, codebook, shape.k)
        checks: dict[str, dict[str, float]] = {}
        for backend in ("triton", "cuda"):
            ok, why = backend_status(backend, x.device, FAMILY)
            if not ok:
                logger.warning("%s unavailable: %s", backend, why)
                continue
            checks[backend] = check(shape, x, codebook, backend, reference)
            impls[backend] = (lambda backend=backend: nearest_token(
                x, codebook, shape.k, shape.metric, allow_tf32=shape.tf32, backend=backend))
        for impl, fn in impls.items():
            row = bench.record(family=FAMILY, impl=impl, shape=asdict(shape), fn=fn, floor_ms=floor,
                               extra={"gflop": flops / 1e9, **checks.get(impl, {})})
            logger.info("%s %s: %.3f ms (%.0f%% of floor), peak +%.0f MiB", shape, impl, row["median_ms"],
                        row["pct_of_floor"], row["peak_extra_mib"])
        del x, codebook, noise, owners, reference
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_nearest_token", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", dest="tier", action="store_const", const="quick", help="a few minutes (default)")
    tier.add_argument("--full", dest="tier", action="store_const", const="full", help="the issue's whole matrix")
    parser.add_argument("--out", required=True, help="folder for nearest_token.json")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    bench = Bench.start()
    tier_name = args.tier or "quick"
    run(tier_name, bench, with_compile=not args.no_compile)
    logger.info("wrote %s", bench.write(args.out, FAMILY, tier_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
