"""Losses of the MCF-style and FRA-style models against float64 references, and across two gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _tolerances import U32, gamma
from pacofr.models.peer_losses import PROB_FLOOR, cosine_regression, info_nce, sinkhorn, soft_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

# Measured bounds (fp32 result vs the float64 reference on the same input values), each about 3.5-4x the
# worst error seen on 1,300 fresh seeds of every shape below (random and clustered), CPU torch:
INFO_NCE_ABS = 24 * U32
"""info_nce's loss: measured worst 6.7 U32 absolute (losses 0.3 to 3)."""
INFO_NCE_GRAD = 24 * U32
"""info_nce's gradient w.r.t. query row i, in units of its natural scale 2 / (n ||q_i||) (the loss is a mean
over n rows, the softmax difference has norm <= 2, normalising divides by ||q_i||): measured worst 6.7."""
SINKHORN_REL = 128 * U32
"""sinkhorn, elementwise relative: measured worst 35.9 U32 after 50 iterations (10.5 after 3)."""
COSINE_REGRESSION_ABS = 32 * U32
"""cosine_regression of (3, 5, 8) inputs: measured worst 8.0 U32 absolute (2.3 for cos(z, z), exactly 0 in
exact arithmetic)."""


def info_nce_float64(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """2T * mean_i(logsumexp_j(cos(q_i, k_j) / T) - cos(q_i, k_i) / T), in float64."""
    q, k = q.double(), k.double()
    cos = (q @ k.T) / (q.norm(dim=1, keepdim=True) * k.norm(dim=1).unsqueeze(0))
    logits = cos / temperature
    return 2 * temperature * (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def sinkhorn_float64(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """SwAV's loop on a (K, n) matrix: clusters to 1/K, samples to 1/n; times n, transposed back."""
    q = probs.double().T.clone()
    q /= q.sum()
    clusters, samples = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= clusters
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).T


def _queries_and_keys(n: int, dim: int, clustered: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if clustered:  # two tight clusters: near-ties between the negatives of each cluster
        centres = torch.randn(2, dim, generator=generator)
        q = centres[torch.arange(n) % 2] + 1e-3 * torch.randn(n, dim, generator=generator)
        k = centres[torch.arange(n) % 2] + 1e-3 * torch.randn(n, dim, generator=generator)
        return q, k
    return torch.randn(n, dim, generator=generator), torch.randn(n, dim, generator=generator)


@pytest.mark.parametrize("clustered", [False, True], ids=["random", "clustered"])
@pytest.mark.parametrize("n, dim", [(1, 3), (7, 5), (33, 16)])
def test_info_nce_matches_float64(n: int, dim: int, clustered: bool, generator: torch.Generator) -> None:
    q, k = _queries_and_keys(n, dim, clustered, generator)
    q.requires_grad_(True)
    got = info_nce(q, k, 0.2)
    got.backward()
    q64 = q.detach().double().requires_grad_(True)
    want = info_nce_float64(q64, k, 0.2)
    want.backward()
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=INFO_NCE_ABS)
    row_scale = 2 / (n * q.detach().double().norm(dim=1, keepdim=True))
    assert ((q.grad.double() - q64.grad).abs() <= INFO_NCE_GRAD * row_scale).all()
    if n == 1:  # log_softmax of one logit is l - l - log(exp(0)) = 0 exactly, and so is its gradient
        assert got.item() == 0.0 and (q.grad == 0).all(), "one pair: the only candidate is the positive"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_info_nce_dtypes_and_non_contiguous_inputs(dtype: torch.dtype, generator: torch.Generator) -> None:
    q = torch.randn(10, 12, generator=generator).to(dtype)
    k = torch.randn(12, 10, generator=generator).to(dtype).T  # a transposed view
    assert not k.is_contiguous()
    got = info_nce(q, k, 0.2)
    want = info_nce_float64(q.float(), k.float(), 0.2)
    assert got.dtype == torch.float32
    # info_nce upcasts to fp32 exactly, so every dtype has the fp32 error of the same values (measured
    # worst 6.0 U32 for float16 and bfloat16 inputs)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=INFO_NCE_ABS)


def test_info_nce_keys_get_no_gradient(generator: torch.Generator) -> None:
    q = torch.randn(6, 4, generator=generator, requires_grad=True)
    k = torch.randn(6, 4, generator=generator, requires_grad=True)
    info_nce(q, k, 0.2).backward()
    assert k.grad is None and q.grad is not None


def test_cosine_regression_matches_float64(generator: torch.Generator) -> None:
    p = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    z = torch.randn(3, 5, 8, generator=generator, requires_grad=True)
    got = cosine_regression(p, z)
    p64, z64 = p.detach().double(), z.detach().double()
    want = (2 - 2 * (p64 * z64).sum(-1) / (p64.norm(dim=-1) * z64.norm(dim=-1))).mean()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=COSINE_REGRESSION_ABS)
    got.backward()
    assert z.grad is None and p.grad.abs().sum() > 0
    assert cosine_regression(z.detach(), z.detach()).item() == pytest.approx(0.0, abs=COSINE_REGRESSION_ABS)


@pytest.mark.parametrize("clustered", [False, True], ids=["random", "clustered"])
@pytest.mark.parametrize("n, k, iterations", [(1, 2, 1), (13, 3, 3), (64, 8, 3), (64, 8, 50)])
def test_sinkhorn_matches_float64_and_balances(n: int, k: int, iterations: int, clustered: bool,
                                               generator: torch.Generator) -> None:
    scores = torch.randn(n, k, generator=generator)
    if clustered:  # every sample prefers cluster 0: the balance must move mass away from it
        scores[:, 0] += 5.0
    probs = torch.softmax(scores / 0.5, dim=1)
    got = sinkhorn(probs, iterations)
    want = sinkhorn_float64(probs, iterations)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    torch.testing.assert_close(got.double(), want, rtol=SINKHORN_REL, atol=0)
    # the last step divides each row by its fp32 sum s (the quotients sum to S / s = 1 within gamma(k - 1)),
    # rounds k quotients (u) and the test sums them again (gamma(k - 1)): within gamma(2k - 1) of 1
    torch.testing.assert_close(got.sum(dim=1), torch.ones(n), rtol=0, atol=gamma(2 * k - 1))
    imbalance = lambda q: (q.sum(dim=0) - n / k).abs().max().item()  # noqa: E731
    # each imbalance is off by at most the rounding of an fp32 column sum of n values, gamma(n) * its sum
    rounding = gamma(n) * (probs.sum(dim=0).max().item() + got.sum(dim=0).max().item())
    assert imbalance(got) <= imbalance(probs) + rounding
    if iterations == 50 and n >= k:  # converged to the rounding floor of a column sum (measured: one ulp of n / k)
        assert imbalance(got) <= gamma(n) * n / k


def test_sinkhorn_keeps_a_non_finite_row_to_itself(generator: torch.Generator) -> None:
    probs = torch.softmax(torch.randn(6, 4, generator=generator), dim=1)
    probs[2] = float("nan")
    got = sinkhorn(probs, 3)
    assert torch.isfinite(torch.cat([got[:2], got[3:]])).all()
    assert (got[2] == 0).all()


def test_sinkhorn_of_an_empty_batch_is_empty() -> None:
    assert sinkhorn(torch.empty(0, 5), 3).shape == (0, 5)


def test_soft_cross_entropy_matches_float64_with_weights(generator: torch.Generator) -> None:
    targets = torch.softmax(torch.randn(2, 5, 4, generator=generator), dim=-1)
    probs = torch.softmax(torch.randn(2, 5, 4, generator=generator), dim=-1)
    probs[0, 0, 1] = 0.0  # clamped, not -inf
    weights = (torch.rand(2, 5, generator=generator) > 0.3).float()
    got = soft_cross_entropy(targets, probs, weights)
    per_row = -(targets.double() * probs.double().clamp_min(PROB_FLOOR).log()).sum(-1)
    want = (per_row * weights.double()).sum() / weights.double().sum().clamp_min(1.0)
    # every term -t log p >= 0: a row is within gamma(K + 2) of its sum (log within one ulp, 2u; product u;
    # K - 1 adds), the weighted sum of N rows adds gamma(N) (0/1 weights multiply exactly), the division u
    rows, classes = per_row.numel(), targets.shape[-1]
    torch.testing.assert_close(got.double(), want, rtol=gamma(rows + classes + 3), atol=0)
    assert math.isfinite(got.item())
    unweighted = soft_cross_entropy(targets, probs)
    torch.testing.assert_close(unweighted.double(), per_row.mean(), rtol=gamma(rows + classes + 3), atol=0)


# ---------------------------------------------------------------------------------------------- DDP
WORLD, PER_RANK = 2, 5


def _full_batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(WORLD * PER_RANK, 6, generator=g)
    k = torch.randn(WORLD * PER_RANK, 6, generator=g)
    probs = torch.softmax(torch.randn(WORLD * PER_RANK, 4, generator=g) * 3, dim=1)
    return q, k, probs


def _rank_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, probs = _full_batch()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        q_local = q[rows].clone().requires_grad_(True)
        loss = info_nce(q_local, k[rows], 0.2)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": q_local.grad, "sinkhorn": sinkhorn(probs[rows], 3)},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_the_whole_batch_losses(tmp_path: Path) -> None:
    mp.spawn(_rank_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path / "result")), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"result.{r}", weights_only=True) for r in range(WORLD)]
    q, k, probs = _full_batch()
    q64 = q.double().requires_grad_(True)
    whole = info_nce_float64(q64, k, 0.2)
    whole.backward()
    # DDP averages the ranks' gradients: the mean of the ranks' losses is the whole batch's loss, checked
    # against float64 with the single-process bounds (measured on 10 x 6 batches too)
    ranks_loss = sum(r["loss"].double() for r in ranks) / WORLD
    torch.testing.assert_close(ranks_loss, whole.detach(), rtol=0, atol=INFO_NCE_ABS)
    row_scale = 2 / (q.shape[0] * q.double().norm(dim=1, keepdim=True))
    ranks_grad = torch.cat([r["grad"] for r in ranks]).double() / WORLD
    assert ((ranks_grad - q64.grad).abs() <= INFO_NCE_GRAD * row_scale).all()
    ranks_sinkhorn = torch.cat([r["sinkhorn"] for r in ranks]).double()
    torch.testing.assert_close(ranks_sinkhorn, sinkhorn_float64(probs, 3), rtol=SINKHORN_REL, atol=0)
