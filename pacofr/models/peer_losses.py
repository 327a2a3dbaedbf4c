"""Losses of the MCF-style and FRA-style models, correct under data parallelism (docs/method.md "Peer methods").

- :func:`info_nce`: MoCo v3's contrastive loss; the keys of every rank are the negatives, so two
  ranks on half batches compute what one process computes on the whole batch;
- :func:`cosine_regression`: BYOL's ``2 - 2 cos(p, z)``;
- :func:`sinkhorn`: balanced soft assignments (SwAV's Sinkhorn-Knopp), the sums over samples
  all-reduced across ranks, so the balance holds over the global batch;
- :func:`soft_cross_entropy`: ``-sum_k target_k log p_k`` for probabilities ``p``.

All of it runs in fp32 with autocast off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pacofr.models.patch_codebook import world_size
from pacofr.ops.precision import full_precision

#: probabilities are clamped to this before a log (the smallest normal fp32: log = -87.3)
PROB_FLOOR = torch.finfo(torch.float32).tiny


def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def gather_from_ranks(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) of every rank concatenated in rank order, (world * n, ...) (no gradient); ``x`` itself
    without data parallelism. Every rank must pass the same shape."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, in place (no-op without data parallelism)."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss of one direction.

    Args:
        queries: (n, P) online predictions (any float dtype; gradients flow).
        keys: (n, P) momentum keys of the other view, row i the positive of query i (no gradient).
        temperature: softmax temperature T.

    Returns:
        0-d fp32 ``2 T * cross_entropy(q_i . k_j / T, positive j = i)`` over the l2-normalised
        vectors, the keys of all ranks (n * world) as candidates and the mean over this rank's
        queries (DDP's gradient average then gives the global mean).
    """
    with full_precision(queries.device):
        q = F.normalize(queries.float(), dim=1)
        k = F.normalize(gather_from_ranks(keys.detach().float()), dim=1)
        logits = q @ k.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * _rank()
        return F.cross_entropy(logits, labels) * (2.0 * temperature)


def cosine_regression(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BYOL's ``mean(2 - 2 cos(p, z))`` over the leading dimensions; (..., P) each, targets detached. 0-d fp32."""
    with full_precision(predictions.device):
        cos = F.cosine_similarity(predictions.float(), targets.detach().float(), dim=-1)
        return (2.0 - 2.0 * cos).mean()


@torch.no_grad()
def sinkhorn(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """Balanced assignment of n samples to K clusters (Sinkhorn-Knopp, as SwAV).

    Args:
        probs: (n, K) non-negative starting scores, e.g. ``softmax(scores / eps)`` per row.
        iterations: alternating normalisations (each: clusters, then samples).

    Returns:
        (n, K) fp32, every row summing to 1 and, over the samples of all ranks, every cluster
        holding (nearly, after finite iterations exactly in the column step) total / K of the mass.
        Non-finite rows are zeroed before the sums so they cannot spread to the others.
    """
    with full_precision(probs.device):
        q = probs.float().clone()
        q = torch.where(torch.isfinite(q).all(dim=1, keepdim=True), q, torch.zeros_like(q))
        num_clusters = q.shape[1]
        total = _all_reduce_sum(torch.tensor(float(q.shape[0]), device=q.device))
        for _ in range(iterations):
            column = _all_reduce_sum(q.sum(dim=0, keepdim=True))
            q = q / column.clamp_min(PROB_FLOOR) * (total / num_clusters)
            q = q / q.sum(dim=1, keepdim=True).clamp_min(PROB_FLOOR)
        return q


def soft_cross_entropy(targets: torch.Tensor, probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``-sum_k t_k log p_k`` averaged over rows (weighted by ``weights`` (...) when given). 0-d fp32.

    ``targets`` and ``probs`` (..., K); ``probs`` are clamped to :data:`PROB_FLOOR` before the log,
    ``targets`` are detached.
    """
    with full_precision(probs.device):
        per_row = -(targets.detach().float() * probs.float().clamp_min(PROB_FLOOR).log()).sum(dim=-1)
        if weights is None:
            return per_row.mean()
        weights = weights.float()
        return (per_row * weights).sum() / weights.sum().clamp_min(1.0)
