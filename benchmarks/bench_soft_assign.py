"""Benchmark of ``pacofr.ops.soft_assign`` and ``codebook_stats`` (GPU tiers need a CUDA device; not run yet).

    python -m benchmarks.bench_soft_assign --quick --out DIR      # or via benchmarks.run
    python -m benchmarks.bench_soft_assign --full --out DIR
    python -m benchmarks.bench_soft_assign --cpu-smoke --out DIR  # CPU, tiny shapes, no times

Soft assignment (N queries, K codes, D dims, top-m, dtype, metric, tau), two stages:

- ``forward``: top-m codes, softmax over their scores / tau, weighted sum of the m code rows;
- ``forward_backward``: the same plus the gradient w.r.t. the queries and the codebook.

Implementations timed side by side: ``reference`` (the torch backend: chunked scores, stable sort,
autograd through the m chosen rows only), ``reference_compiled`` (``torch.compile`` of it),
``dense`` (the usual eager code: one N x K fp32 score GEMM, ``topk``, softmax, gather; autograd goes
through ``topk`` into dense N x K x D GEMMs), ``triton`` and ``cuda``.

Codebook statistics (``stats`` stage; N assignments of m codes each, Zipf-skewed so that popular
codes expose atomic contention): ``reference`` (``index_add_``), ``reference_compiled``, ``onehot``
(hard assignments only: the vector-quantize-pytorch style N x K one-hot matrix + einsum),
``triton`` and ``cuda``.

Correctness gate before any time is recorded (raises on a mismatch):

- selection, tie-aware: the exact fp64 score of each returned code must be within tolerance of
  the reference's at the same rank (near-ties may pick different codes);
- values: weights and token must equal the reference math evaluated on the implementation's own
  indices (fp32), and so must the gradients of the forward_backward stage;
- stats: counts and sums against ``index_add_`` in fp64.

Floors (kernels.md section 3.4): forward = max(2*N*K*D FLOPs at the bf16 GEMM rate, bytes of
reading q and the codebook and writing token / indices / weights); forward_backward adds the
bytes of reading the output gradient, q and the m chosen rows and writing both gradients (fp32
codebook buffer); stats = reading x, indices, weights and writing counts and sums.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.harness import SMOKE_TIER, Bench, headline_first
from pacofr.ops import codebook_stats, soft_assign
from pacofr.ops.soft_assign import chosen_scores, codebook_stats_reference, soft_assign_reference

FAMILY = "soft_assign"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: selection tolerance: abs on cos for cosine, relative to ||q||^2 + max ||e||^2 for l2
#: rank-wise score tolerance of a selection against the exact reference, per ranking precision
SELECT_TOL = {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 1e-3, "bf16": 8e-3}
#: relative tolerance (on max |value|) of tokens and gradients, by the dtype they are stored in
VALUE_RTOL = {"fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2}
WEIGHT_ATOL = 2e-3

Impl = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Shape:
    """A soft-assignment shape: N x D queries against K codes, top-m."""

    n: int
    codes: int
    dim: int
    m: int
    dtype: str
    metric: str = "cosine"
    tau: float = 0.1
    precision: str = "ieee"  #: of the ranking, for fp32 inputs (pacofr.ops.precision)


@dataclass(frozen=True)
class StatsShape:
    """A codebook-statistics shape: N rows of m assignments (weighted when m > 1), D-dim vectors."""

    n: int
    codes: int
    dim: int
    m: int
    dtype: str
    zipf: float = 1.1  # exponent of the code popularity; 0 = uniform


#: the headline shapes of the GPU tiers, measured first
HEADLINE = Shape(50176, 8192, 256, 4, "bf16")
STATS_HEADLINE = StatsShape(50176, 8192, 256, 1, "bf16")


def shapes(tier: str) -> Iterator[Shape]:
    """Soft-assignment shapes of ``tier`` (kernels.md section 5.1); the first is the headline shape."""
    if tier == SMOKE_TIER:
        yield Shape(129, 33, 16, 4, "fp32")
        yield Shape(64, 100, 32, 1, "bf16", metric="l2")
        yield Shape(33, 7, 8, 4, "fp16", tau=1.0)
        return
    yield from headline_first(HEADLINE, _quick_shapes() if tier == "quick" else _full_shapes())


def _quick_shapes() -> Iterator[Shape]:
    for m in (1, 4, 8):
        yield Shape(50176, 8192, 256, m, "bf16")
    yield Shape(50176, 8192, 256, 4, "bf16", metric="l2")
    yield Shape(50176, 8192, 256, 4, "fp32", precision="bf16")  # fp32 beliefs, bf16 ranking (the model's call)


def _full_shapes() -> Iterator[Shape]:
    for n, dim, codes, m in itertools.product((50176, 37632), (32, 64, 256, 768), (1024, 8192, 16384), (1, 4, 8)):
        yield Shape(n, codes, dim, m, "bf16")
    for tau in (1.0, 0.01):
        yield Shape(50176, 8192, 256, 4, "bf16", tau=tau)
    yield Shape(50176, 8192, 256, 4, "bf16", metric="l2")
    yield Shape(50176, 8192, 256, 4, "fp32")


def stats_shapes(tier: str) -> Iterator[StatsShape]:
    """Statistics shapes of ``tier`` (hard m=1 and weighted m=8 assignments); the first is the headline."""
    if tier == SMOKE_TIER:
        yield StatsShape(129, 33, 16, 1, "fp32")
        yield StatsShape(64, 100, 32, 4, "bf16", zipf=0.0)
        return
    if tier == "quick":
        yield STATS_HEADLINE
        yield StatsShape(50176, 8192, 256, 8, "bf16")
        return
    yield from headline_first(STATS_HEADLINE, _full_stats_shapes())


def _full_stats_shapes() -> Iterator[StatsShape]:
    for n, dim, codes, m in itertools.product((50176, 37632), (32, 64, 256, 768), (1024, 8192, 16384), (1, 8)):
        yield StatsShape(n, codes, dim, m, "bf16")
    yield StatsShape(50176, 8192, 256, 8, "bf16", zipf=0.0)


# ----------------------------------------------------------------------------------------------
# baselines and the checking math
# ----------------------------------------------------------------------------------------------

def dense_soft_assign(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float, metric: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The usual eager code: an N x K fp32 score GEMM, ``topk``, softmax, gather.

    Scores in fp32 as eager VQ code does (``x.float()``; low-precision scores would make the
    weights wrong after 1/tau). Returns (token (N, D) in q's dtype, indices (N, m), weights
    (N, m)); autograd flows through ``topk`` into dense N x K x D GEMMs.
    """
    q32, cb32 = q.float(), codebook.float()
    if metric == "cosine":
        scores = F.normalize(q32, dim=1) @ F.normalize(cb32, dim=1).T
    else:  # -||q - e||^2 up to the per-row constant ||q||^2, which topk and softmax ignore
        scores = 2 * (q32 @ cb32.T) - cb32.square().sum(1)
    top, indices = scores.topk(m, dim=1)
    weights = torch.softmax(top / tau, dim=1)
    token = (weights.unsqueeze(-1) * cb32[indices]).sum(1)
    return token.to(q.dtype), indices, weights


def given_indices(q: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, tau: float,
                  metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (token fp32 (N, D), weights (N, m)) for a fixed selection ``indices``; differentiable."""
    rows = codebook.float()[indices]
    raw = chosen_scores(q.float(), rows, metric)
    weights = torch.softmax((raw - raw.amax(dim=1, keepdim=True).detach()) / tau, dim=1)
    return (weights.unsqueeze(-1) * rows).sum(1), weights


def exact_scores(q: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 raw scores (N, m) of the given codes: cos, or -||q - e||^2 summed directly (row chunks)."""
    out = torch.empty(indices.shape, dtype=torch.float64, device=q.device)
    for r0 in range(0, q.shape[0], 4096):
        rows = q[r0:r0 + 4096].double()
        codes = codebook.double()[indices[r0:r0 + 4096].long()]
        out[r0:r0 + 4096] = chosen_scores(rows, codes, metric)
    return out


def check_selection(name: str, shape: Shape, q: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                    reference: torch.Tensor, tol: float) -> float:
    """Tie-aware: rank-wise exact scores of ``indices`` match the reference's; returns index agreement."""
    mine = exact_scores(q, codebook, indices, shape.metric)
    theirs = exact_scores(q, codebook, reference, shape.metric)
    if shape.metric == "l2":
        scale = q.double().square().sum(1, keepdim=True) + codebook.double().square().sum(1).max()
    else:
        scale = torch.ones((q.shape[0], 1), dtype=torch.float64, device=q.device)
    excess = ((mine - theirs).abs() - tol * scale).max().item()
    if excess > 0:
        raise AssertionError(f"{name} selects different codes than the reference on {shape}: "
                             f"score excess {excess:.3g} beyond tolerance")
    return (indices.long() == reference.long()).float().mean().item()


def _assert_rel(name: str, what: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """|actual - expected| <= rtol * max(max |expected|, 1e-3) elementwise."""
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-3)
    worst = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    if not worst <= rtol * scale:
        raise AssertionError(f"{name}: {what} differs from the reference math by {worst:.3g} "
                             f"(> {rtol:g} x {scale:.3g})")


# ----------------------------------------------------------------------------------------------
# soft assignment
# ----------------------------------------------------------------------------------------------

def _impls(bench: Bench, shape: Shape, backends: list[str], with_compile: bool) -> dict[str, Callable]:
    """name -> fn(q, codebook) -> (token, indices, weights) for every implementation."""
    def ours(backend: str) -> Callable:
        return lambda q, cb: tuple(soft_assign(q, cb, shape.m, shape.tau, metric=shape.metric,
                                               precision=shape.precision, backend=backend))

    impls: dict[str, Callable] = {"reference": ours("torch")}
    if with_compile:
        compiled_reference = bench.compile(soft_assign_reference)
        impls["reference_compiled"] = lambda q, cb: tuple(compiled_reference(q, cb, shape.m, shape.tau,
                                                                             metric=shape.metric))
    impls["dense"] = lambda q, cb: dense_soft_assign(q, cb, shape.m, shape.tau, shape.metric)
    for backend in backends:
        impls[backend] = ours(backend)
    return impls


def check_impl(name: str, shape: Shape, fn: Callable, q: torch.Tensor, codebook: torch.Tensor,
               reference_indices: torch.Tensor, grad_out: torch.Tensor) -> float:
    """Selection, weights, token and both gradients of one implementation; returns index agreement."""
    q_leaf = q.detach().requires_grad_()
    cb_leaf = codebook.detach().requires_grad_()
    token, indices, weights = fn(q_leaf, cb_leaf)
    agreement = check_selection(name, shape, q, codebook, indices, reference_indices, SELECT_TOL[shape.precision])
    grads = torch.autograd.grad(token, (q_leaf, cb_leaf), grad_out)
    q_ref = q.detach().requires_grad_()
    cb_ref = codebook.detach().requires_grad_()
    want_token, want_weights = given_indices(q_ref, cb_ref, indices.detach(), shape.tau, shape.metric)
    want_grads = torch.autograd.grad(want_token, (q_ref, cb_ref), grad_out.float())
    rtol = VALUE_RTOL[shape.dtype]
    torch.testing.assert_close(weights.float(), want_weights.detach(), atol=WEIGHT_ATOL, rtol=0,
                               msg=lambda m: f"{name}: weights on {shape}: {m}")
    _assert_rel(name, "token", token.detach(), want_token.detach(), rtol)
    _assert_rel(name, "gradient of q", grads[0], want_grads[0], rtol)
    _assert_rel(name, "gradient of the codebook", grads[1], want_grads[1], rtol)
    return agreement


def make_inputs(shape: Shape, device: torch.device, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered queries (code + 0.1 noise), the codebook and an output gradient, in the shape's dtype."""
    dtype = DTYPES[shape.dtype]
    codebook = torch.randn(shape.codes, shape.dim, device=device, generator=generator)
    owners = torch.randint(0, shape.codes, (shape.n,), device=device, generator=generator)
    q = codebook[owners] + 0.1 * torch.randn(shape.n, shape.dim, device=device, generator=generator)
    grad_out = torch.randn(shape.n, shape.dim, device=device, generator=generator)
    return q.to(dtype), codebook.to(dtype), grad_out.to(dtype)


def bench_assign(bench: Bench, shape: Shape, backends: list[str], with_compile: bool,
                 generator: torch.Generator) -> None:
    """Check, then record forward and forward_backward of every implementation on ``shape``."""
    q, codebook, grad_out = make_inputs(shape, bench.device, generator)
    reference_indices = soft_assign(q, codebook, shape.m, shape.tau, metric=shape.metric, backend="torch").indices
    impls = _impls(bench, shape, backends, with_compile)
    agreement = {name: check_impl(name, shape, fn, q, codebook, reference_indices, grad_out)
                 for name, fn in impls.items()}
    size = q.element_size()
    n, k, d, m = shape.n, shape.codes, shape.dim, shape.m
    flops = 2.0 * n * k * d
    forward_bytes = (n + k) * d * size + n * d * size + n * m * (8 + 4)
    backward_bytes = n * d * size * 3 + n * m * d * size + k * d * 4 + n * m * (8 + 4)
    q_leaf, cb_leaf = q.detach().requires_grad_(), codebook.detach().requires_grad_()
    stages = {
        "forward": (bench.floor_ms(flops=flops, bytes_moved=forward_bytes),
                    {name: (lambda fn=fn: fn(q, codebook)) for name, fn in impls.items()}),
        "forward_backward": (bench.floor_ms(flops=flops, bytes_moved=forward_bytes + backward_bytes),
                             {name: (lambda fn=fn: torch.autograd.grad(fn(q_leaf, cb_leaf)[0], (q_leaf, cb_leaf),
                                                                       grad_out))
                              for name, fn in impls.items()}),
    }
    for stage, (floor, fns) in stages.items():
        for name, fn in fns.items():
            with torch.set_grad_enabled(stage != "forward"):
                bench.record(family=FAMILY, impl=name, shape={**asdict(shape), "stage": stage}, fn=fn,
                             floor_ms=floor, checked=True,
                             extra={"stage": stage, "gflop": flops / 1e9, "index_agreement": agreement[name]})


# ----------------------------------------------------------------------------------------------
# codebook statistics
# ----------------------------------------------------------------------------------------------

def onehot_stats(indices: torch.Tensor, num_codes: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vector-quantize-pytorch style for hard assignments ``indices`` (N, 1): a dense (N, K) fp32
    one-hot matrix, its column sums (counts) and an einsum with ``x`` (sums)."""
    onehot = F.one_hot(indices[:, 0].long(), num_codes).float()
    return onehot.sum(dim=0), torch.einsum("nk,nd->kd", onehot, x.float())


def stats_inputs(shape: StatsShape, device: torch.device, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Zipf-distributed indices (N, m) int64, softmax weights (N, m) when m > 1, vectors (N, D)."""
    popularity = torch.arange(1, shape.codes + 1, device=device, dtype=torch.float64).pow(-shape.zipf)
    flat = torch.multinomial(popularity.float(), shape.n * shape.m, replacement=True, generator=generator)
    indices = flat.view(shape.n, shape.m)
    weights = None
    if shape.m > 1:
        weights = torch.softmax(torch.randn(shape.n, shape.m, device=device, generator=generator), dim=1)
    x = torch.randn(shape.n, shape.dim, device=device, generator=generator).to(DTYPES[shape.dtype])
    return indices, weights, x


def bench_stats(bench: Bench, shape: StatsShape, backends: list[str], with_compile: bool,
                generator: torch.Generator) -> None:
    """Check, then record codebook statistics of every implementation on ``shape``."""
    indices, weights, x = stats_inputs(shape, bench.device, generator)
    want_counts, want_sums = codebook_stats_reference(indices, shape.codes, None if weights is None
                                                      else weights.double(), x.double())
    impls: dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {
        "reference": lambda: tuple(codebook_stats(indices, shape.codes, weights=weights, x=x, backend="torch")),
    }
    if shape.m == 1:
        impls["onehot"] = lambda: onehot_stats(indices, shape.codes, x)
    if with_compile:
        compiled_reference = bench.compile(codebook_stats_reference)
        impls["reference_compiled"] = lambda: tuple(compiled_reference(indices, shape.codes, weights, x))
    for backend in backends:
        impls[backend] = (lambda backend=backend: tuple(codebook_stats(indices, shape.codes, weights=weights, x=x,
                                                                       backend=backend)))
    for name, fn in impls.items():
        counts, sums = fn()
        torch.testing.assert_close(counts.double(), want_counts, atol=1e-3, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: counts on {shape}: {m}")
        torch.testing.assert_close(sums.double(), want_sums, atol=1e-3, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: sums on {shape}: {m}")
    bytes_moved = (shape.n * shape.dim * x.element_size() + shape.n * shape.m * (8 + (4 if weights is not None else 0))
                   + shape.codes * (shape.dim + 1) * 4)
    floor = bench.floor_ms(bytes_moved=bytes_moved)
    for name, fn in impls.items():
        bench.record(family=FAMILY, impl=name, shape={**asdict(shape), "stage": "stats"}, fn=fn, floor_ms=floor,
                     checked=True, extra={"stage": "stats", "min_bytes": bytes_moved})


def run(tier: str, bench: Bench) -> None:
    """Check then time every implementation on the shapes of ``tier`` that ``bench`` selects; rows go into ``bench``."""
    generator = torch.Generator(device=bench.device).manual_seed(0)
    backends = bench.fused_backends(FAMILY, "soft_assign")
    for shape, headline in bench.select(shapes(tier)):
        bench_assign(bench, shape, backends, bench.should_compile(headline), generator)
        bench.empty_cache()
    for stats_shape, headline in bench.select(stats_shapes(tier)):
        bench_stats(bench, stats_shape, backends, bench.should_compile(headline), generator)
        bench.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.run --only soft_assign`` with the same options."""
    from benchmarks.run import main as run_main

    return run_main(["--only", FAMILY, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
