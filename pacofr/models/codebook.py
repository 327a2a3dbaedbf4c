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

Not reproduced: k-means initialisation, Gumbel sampling, multiple heads, affine re-parametrisation.
Differences: candidates for restarts are passed in by the caller (chosen without ``.item()``, so no
host synchronisation), and statistics are computed by :func:`pacofr.ops.codebook_stats` (scatter,
fp32) rather than a one-hot matrix. For data parallelism set :attr:`Codebook.all_reduce` to a
function that sums a tensor in place across ranks (e.g. ``torch.distributed.all_reduce``); it is
applied to the raw counts and sums before the EMA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pacofr.ops._checks import check_int, check_tensor
from pacofr.ops.soft_assign import NORM_EPS, SoftAssignment, codebook_stats, soft_assign


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
        if self.all_reduce is not None:
            self.all_reduce(counts)
            self.all_reduce(sums)
        self.ema_counts.lerp_(counts, 1.0 - self.decay)
        self.ema_sums.lerp_(sums, 1.0 - self.decay)
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.eps) / (total + self.num_codes * self.eps) * total
        new_codes = self.ema_sums / smoothed.unsqueeze(1)
        if self.use_cosine:
            new_codes = F.normalize(new_codes, dim=1, eps=NORM_EPS)
        self.weight.copy_(new_codes)

    def dead_codes(self) -> torch.Tensor:
        """(K,) bool: codes whose EMA count is below ``dead_code_threshold`` (all False when it is 0)."""
        return self.ema_counts < self.dead_code_threshold

    @torch.no_grad()
    def restart_dead_codes(self, candidates: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Re-seed every dead code from a random row of ``candidates`` (C, D); returns the (K,) mask.

        Candidates are drawn without replacement when C >= K (with replacement otherwise) for all K
        codes and applied with ``torch.where``, so no host synchronisation happens. A restarted code
        gets ``ema_counts = dead_code_threshold`` and ``ema_sums = vector * dead_code_threshold``.
        With no candidates (C = 0) nothing changes.
        """
        candidates = check_tensor("candidates", candidates, ndim=2)
        if candidates.shape[1] != self.dim:
            raise ValueError(f"candidates must have {self.dim} columns, got shape {tuple(candidates.shape)}")
        dead = self.dead_codes()
        num = candidates.shape[0]
        if num == 0:
            return torch.zeros_like(dead)
        device = self.weight.device
        if num >= self.num_codes:
            pick = torch.randperm(num, generator=generator, device=candidates.device)[:self.num_codes]
        else:
            pick = torch.randint(num, (self.num_codes,), generator=generator, device=candidates.device)
        seeds = candidates[pick].to(device=device, dtype=torch.float32)
        if self.use_cosine:
            seeds = F.normalize(seeds, dim=1, eps=NORM_EPS)
        dead_col = dead.unsqueeze(1)
        reset = self.dead_code_threshold
        self.weight.copy_(torch.where(dead_col, seeds.to(self.weight.dtype), self.weight))
        self.ema_sums.copy_(torch.where(dead_col, seeds * reset, self.ema_sums))
        self.ema_counts.copy_(torch.where(dead, torch.full_like(self.ema_counts, reset), self.ema_counts))
        return dead

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
