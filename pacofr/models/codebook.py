"""The patch codebook: a (K, D) code table with soft assignment, EMA statistics and dead-code restart.

Parity with vector-quantize-pytorch (``EuclideanCodebook`` / ``CosineSimCodebook``), claimed only
for what is listed here:

* EMA: ``ema_counts.lerp_(counts, 1 - decay)`` and ``ema_sums.lerp_(sums, 1 - decay)`` on the raw
  batch statistics (its ``cluster_size`` / ``embed_avg``; ``ema_counts`` starts at zero and
  ``ema_sums`` at the initial codes, as there);
* Laplace smoothing: ``n_k = (c_k + eps) / (sum c + K * eps) * sum c`` and codes = ``ema_sums / n_k``;
  with ``use_cosine`` the input vectors are l2-normalised before the statistics and the new codes
  are l2-normalised after the division (its cosine codebook);
* dead codes: ``ema_counts < dead_code_threshold``; a restarted code takes a candidate vector,
  its ``ema_counts`` is reset to the threshold and its ``ema_sums`` to vector * threshold (its
  ``reset_cluster_size`` default).

Not reproduced: k-means initialisation inside the module, Gumbel sampling, multiple heads, affine
re-parametrisation. Differences: candidates for restarts are passed in by the caller and chosen by
:func:`pick_distinct_seeds` (k-means++ style, far from the live codes and from each other, never two
copies of one vector; vector-quantize-pytorch samples them uniformly, with replacement), and
statistics are computed by :func:`pacofr.ops.codebook_stats` (scatter, fp32) rather than a one-hot
matrix. For data parallelism set :attr:`Codebook.all_reduce` to a function that sums a tensor in
place across ranks (e.g. ``torch.distributed.all_reduce``); it is applied to the raw counts and
sums before the EMA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.ops import nearest_token
from pacofr.ops.checks import check_int, check_tensor
from pacofr.ops.soft_assign import NORM_EPS, SoftAssignment, codebook_stats, soft_assign

#: Two candidates closer than this fraction of the candidates' mean squared norm are copies.
SEED_MIN_GAP = 1e-4
#: :func:`pick_distinct_seeds` picks its seeds in at most this many rounds.
SEED_ROUNDS = 64


def _min_sq_distance(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(C,) fp32 squared distance of each row of x (C, D) to its nearest row of centres (n, D); inf if n = 0."""
    if centres.shape[0] == 0:
        return torch.full((x.shape[0],), math.inf, device=x.device)
    distance, _ = nearest_token(x.contiguous(), centres.contiguous(), k=1, metric="l2")
    return distance[:, 0]


class _SeedSpace:
    """Squared distances of candidate rows to the centres and picks so far, in one vector space."""

    def __init__(self, candidates: torch.Tensor, centres: torch.Tensor) -> None:
        self.x = candidates.float()
        norms = self.x.square().sum(dim=1).mean() if self.x.shape[0] else torch.ones(())
        self.gap = SEED_MIN_GAP * float(norms.clamp_min(torch.finfo(torch.float32).tiny))
        self.d2 = _min_sq_distance(self.x, centres.float().to(self.x.device))

    def allowed(self) -> torch.Tensor:
        """(C,) bool: rows that are no copy of a centre or a pick."""
        return self.d2 > self.gap

    def copies_of_earlier(self, picks: torch.Tensor) -> torch.Tensor:
        """(n,) bool: picks that copy an earlier pick of the same round."""
        pair = torch.cdist(self.x[picks], self.x[picks], compute_mode="donot_use_mm_for_euclid_dist").square()
        return ((pair <= self.gap) & torch.ones_like(pair, dtype=torch.bool).tril(-1)).any(dim=1)

    def add(self, picks: torch.Tensor) -> None:
        self.d2 = torch.minimum(self.d2, _min_sq_distance(self.x, self.x[picks]))


def pick_distinct_seeds(candidates: torch.Tensor, centres: torch.Tensor, count: int, *,
                        also_distinct: tuple[torch.Tensor, torch.Tensor] | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows of ``candidates`` to seed ``count`` new codes with, k-means++ style (D^2 sampling).

    Each round draws, without replacement, rows with probability proportional to their squared
    distance to the nearest of ``centres`` and of the rows already picked (Gumbel top-k; at most
    :data:`SEED_ROUNDS` rounds). A row within ``SEED_MIN_GAP`` (relative to the candidates' mean
    squared norm) of a centre or of another pick is never picked, so the seeds are distinct vectors,
    also from the live codes; fewer than ``count`` come back when the candidates hold fewer such rows.

    Args:
        candidates: (C, D) float vectors (compared in fp32).
        centres: (n, D) the codes that stay (n may be 0).
        count: how many seeds are wanted.
        also_distinct: optional (C, D2) second description of the same candidates and (n, D2) of the
            same centres (a code's belief beside its pixel prototype): picks are distinct there too.
        generator: random source (CPU or the candidates' device; None: the global RNG).
    Returns:
        (n_picked,) int64 row indices into ``candidates``, n_picked <= min(count, C), in pick order.
    """
    spaces = [_SeedSpace(candidates, centres)]
    if also_distinct is not None:
        spaces.append(_SeedSpace(*also_distinct))
    main = spaces[0]
    picked = [torch.zeros(0, dtype=torch.long, device=main.x.device)]
    if main.x.shape[0] == 0 or count <= 0:
        return picked[0]
    per_round = max(1, math.ceil(count / SEED_ROUNDS))
    remaining = count
    while remaining > 0:
        allowed = torch.stack([space.allowed() for space in spaces]).all(dim=0)
        available = int(allowed.sum())
        if available == 0:
            break
        weight = torch.where(torch.isinf(main.d2), torch.ones_like(main.d2), main.d2)
        uniform = torch.rand(main.x.shape[0], generator=generator,
                             device=generator.device if generator is not None else main.x.device).to(main.x.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
        keys = torch.where(allowed, torch.log(weight) + gumbel, torch.full_like(main.d2, -math.inf))
        round_picks = keys.topk(min(per_round, remaining, available)).indices
        copies = torch.stack([space.copies_of_earlier(round_picks) for space in spaces]).any(dim=0)
        round_picks = round_picks[~copies]
        picked.append(round_picks)
        for space in spaces:
            space.add(round_picks)
        remaining -= round_picks.numel()
    return torch.cat(picked)


class Codebook(nn.Module):
    """K learnable codes of dimension ``dim`` (``weight``, a Parameter) plus EMA usage buffers.

    Args:
        num_codes: K.
        dim: code dimension D.
        decay: EMA decay (vector-quantize-pytorch uses 0.8 by default; 0.99 here).
        eps: Laplace smoothing constant.
        dead_code_threshold: a code whose EMA count is below this is "dead"; 0 disables.
        use_cosine: codes are kept l2-normalised and :meth:`forward` ranks by cosine; otherwise
            raw codes and negative squared L2 distance.

    Buffers: ``ema_counts`` (K,) fp32, ``ema_sums`` (K, D) fp32.
    """

    def __init__(self, num_codes: int, dim: int, *, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 2.0, use_cosine: bool = True) -> None:
        super().__init__()
        self.num_codes = check_int("num_codes", num_codes, low=1)
        self.dim = check_int("dim", dim, low=1)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not dead_code_threshold >= 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.decay = float(decay)
        self.eps = float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        self.use_cosine = bool(use_cosine)
        self.all_reduce: Callable[[torch.Tensor], object] | None = None
        codes = torch.randn(num_codes, dim)
        codes = F.normalize(codes, dim=1) if use_cosine else codes / math.sqrt(dim)
        self.weight = nn.Parameter(codes)
        self.register_buffer("ema_counts", torch.zeros(num_codes))
        self.register_buffer("ema_sums", codes.clone())

    @property
    def metric(self) -> str:
        """``"cosine"`` or ``"l2"``: the metric :meth:`forward` passes to ``soft_assign``."""
        return "cosine" if self.use_cosine else "l2"

    def extra_repr(self) -> str:  # noqa: D102
        return (f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, eps={self.eps}, "
                f"dead_code_threshold={self.dead_code_threshold}, use_cosine={self.use_cosine}")

    def codes(self) -> torch.Tensor:
        """The code table as used for tokens: l2-normalised rows with ``use_cosine``, else raw."""
        return F.normalize(self.weight, dim=1, eps=NORM_EPS) if self.use_cosine else self.weight

    def forward(self, q: torch.Tensor, m: int, tau: float | torch.Tensor, *, straight_through: bool = False,
                backend: str = "auto") -> SoftAssignment:
        """``soft_assign(q, self.codes(), m, tau)`` with this codebook's metric; q (..., D), cast to
        the codes' dtype is the caller's job (they must match)."""
        return soft_assign(q, self.codes(), m, tau, metric=self.metric, straight_through=straight_through,
                           backend=backend)

    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """One EMA step from an assignment of ``x`` (N, D) to ``indices`` (N, m) or (N,).

        ``weights`` (shaped like ``indices``) weight each entry (None: 1 each; zeros exclude
        entries such as masked tokens). Updates ``ema_counts``, ``ema_sums`` and ``weight`` in place.
        """
        x = check_tensor("x", x, ndim=2)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} columns (the code dimension), got shape {tuple(x.shape)}")
        if self.use_cosine:
            x = F.normalize(x.float(), dim=1, eps=NORM_EPS)
        counts, sums = codebook_stats(indices, self.num_codes, weights=weights, x=x)
        self.ema_update_from_stats(counts, sums)

    @torch.no_grad()
    def ema_update_from_stats(self, counts: torch.Tensor, sums: torch.Tensor, *, laplace: bool = True) -> None:
        """The EMA step of :meth:`ema_update` from raw statistics: counts (K,) and sums (K, D) fp32
        (all-reduced here when :attr:`all_reduce` is set).

        ``laplace=False``: codes = ``ema_sums / ema_counts`` without smoothing, and a code whose EMA
        count is still 0 keeps its vector; with statistics that start at zero (``reseed(count=0)``)
        this is the bias-corrected EMA mean, so a new code moves to the mean of its first
        assignments at once (online k-means) instead of 1 - decay of the way per step.
        """
        if self.all_reduce is not None:
            self.all_reduce(counts)
            self.all_reduce(sums)
        self.ema_counts.lerp_(counts, 1.0 - self.decay)
        self.ema_sums.lerp_(sums, 1.0 - self.decay)
        if laplace:
            total = self.ema_counts.sum()
            smoothed = (self.ema_counts + self.eps) / (total + self.num_codes * self.eps) * total
            new_codes = self.ema_sums / smoothed.unsqueeze(1)
        else:
            tiny = torch.finfo(torch.float32).tiny
            means = self.ema_sums / self.ema_counts.clamp_min(tiny).unsqueeze(1)
            new_codes = torch.where((self.ema_counts > tiny).unsqueeze(1), means, self.weight.detach().float())
        if self.use_cosine:
            new_codes = F.normalize(new_codes, dim=1, eps=NORM_EPS)
        self.weight.copy_(new_codes)

    def dead_codes(self) -> torch.Tensor:
        """(K,) bool: codes whose EMA count is below ``dead_code_threshold`` (all False when it is 0)."""
        return self.ema_counts < self.dead_code_threshold

    @torch.no_grad()
    def reseed(self, rows: torch.Tensor, vectors: torch.Tensor, count: float) -> None:
        """Set codes ``rows`` (n,) int64 to ``vectors`` (n, D) (l2-normalised with ``use_cosine``), with
        ``ema_counts = count`` and ``ema_sums = vector * count``."""
        vectors = vectors.to(device=self.weight.device, dtype=torch.float32)
        if self.use_cosine:
            vectors = F.normalize(vectors, dim=1, eps=NORM_EPS)
        self.weight.index_copy_(0, rows, vectors.to(self.weight.dtype))
        self.ema_sums.index_copy_(0, rows, vectors * count)
        self.ema_counts.index_fill_(0, rows, count)

    @torch.no_grad()
    def restart_dead_codes(self, candidates: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-seed dead codes from distinct rows of ``candidates`` (C, D); returns the (K,) mask of restarted codes.

        The rows are chosen by :func:`pick_distinct_seeds` (far from the live codes and from each
        other, no two copies; compared after l2-normalisation with ``use_cosine``). A restarted code
        gets ``ema_counts = dead_code_threshold`` and ``ema_sums = vector * dead_code_threshold``.
        Dead codes left without a distinct candidate stay dead (and wait for the next call); with no
        candidates (C = 0) nothing changes. Costs a few host synchronisations (one per round).
        """
        candidates = check_tensor("candidates", candidates, ndim=2)
        if candidates.shape[1] != self.dim:
            raise ValueError(f"candidates must have {self.dim} columns, got shape {tuple(candidates.shape)}")
        dead = self.dead_codes()
        restarted = torch.zeros_like(dead)
        rows = torch.nonzero(dead).flatten()
        if rows.numel() == 0 or candidates.shape[0] == 0:
            return restarted
        space = candidates.float().to(self.weight.device)
        if self.use_cosine:
            space = F.normalize(space, dim=1, eps=NORM_EPS)
        picks = pick_distinct_seeds(space, self.codes().detach().float()[~dead], rows.numel(), generator=generator)
        rows = rows[:picks.numel()]
        self.reseed(rows, space[picks], self.dead_code_threshold)
        restarted[rows] = True
        return restarted

    @staticmethod
    def usage_entropy(probs: torch.Tensor) -> torch.Tensor:
        """Entropy (nats, 0-d fp32) of the mean code usage; differentiable.

        ``probs`` (..., K): per-query code probabilities (each row summing to 1; rows are averaged),
        or a (K,) vector of non-negative usage counts/weights (normalised to sum 1). Zero-probability
        codes contribute 0.
        """
        probs = check_tensor("probs", probs)
        if probs.dim() == 0 or probs.shape[-1] == 0:
            raise ValueError(f"probs must have a non-empty last (code) dimension, got shape {tuple(probs.shape)}")
        usage = probs.float().reshape(-1, probs.shape[-1]).sum(dim=0)
        p = usage / usage.sum().clamp_min(torch.finfo(torch.float32).tiny)
        return -(torch.special.xlogy(p, p)).sum()

    @classmethod
    def perplexity(cls, probs: torch.Tensor) -> torch.Tensor:
        """``exp(usage_entropy(probs))``: the effective number of codes in use (1 to K)."""
        return cls.usage_entropy(probs).exp()
