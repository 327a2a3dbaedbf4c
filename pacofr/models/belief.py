"""The patch codebook side of PaCo-FR: Belief Predictor, codes, pixel prototypes, code tokens.

- :class:`BeliefPredictor`: MLP on a patch's normalised pixels, P -> hidden -> dc, output
  l2-normalised (the belief query q).
- :class:`PatchCodebook`: the codebook E (a :class:`pacofr.models.codebook.Codebook`, cosine),
  ``code2pix`` (dc -> P, the pixel prototype of a code: the patch-pixel anchor), ``code2tok``
  (dc -> D, a soft token as an encoder input), the losses over the belief softmax (never as an
  N x K matrix: :mod:`pacofr.models.code_softmax`), the top-M soft token, the nearest-prototype
  labels of incubation and the code-usage bookkeeping for dead-code restarts.

Everything that looks codes up, normalises or takes a softmax runs in fp32 with autocast off; the
score products follow ``cfg.codebook_precision``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pacofr.models import code_softmax
from pacofr.models.codebook import Codebook
from pacofr.models.config import ModelConfig
from pacofr.models.precision import full_precision
from pacofr.ops import codebook_stats, nearest_token
from pacofr.ops.soft_assign import SoftAssignment, soft_assign


class BeliefPredictor(nn.Module):
    """q = normalize(W2 gelu(W1 x + b1) + b2): (N, P) normalised pixels -> (N, dc) fp32 unit vectors."""

    def __init__(self, patch_dim: int, hidden: int, code_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(patch_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, code_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (..., P) -> q (..., dc), fp32, unit norm."""
        hidden = self.fc2(self.act(self.fc1(patches)))
        with full_precision(hidden.device):
            return F.normalize(hidden.float(), dim=-1)


def world_size() -> int:
    """Number of data-parallel ranks (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class PatchCodebook(nn.Module):
    """Codes E (K, dc), Belief Predictor, ``code2pix`` and ``code2tok`` (see the module doc).

    Buffer ``usage_steps`` (0-d int64) counts the usage updates seen (dead-code warm-up).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_codes = cfg.codebook_size
        self.num_candidates = cfg.num_candidates
        self.tau = cfg.tau_b
        self.straight_through = cfg.straight_through
        self.backend = cfg.backend
        self.precision = cfg.codebook_precision
        self.dead_code_warmup = cfg.dead_code_warmup
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, decay=cfg.codebook_decay,
                                 dead_code_threshold=cfg.dead_code_threshold if cfg.restart_dead_codes else 0.0,
                                 use_cosine=True)
        self.belief = BeliefPredictor(cfg.patch_dim, cfg.bp_hidden, cfg.code_dim)
        self.code2pix = nn.Linear(cfg.code_dim, cfg.patch_dim)
        self.code2tok = nn.Linear(cfg.code_dim, cfg.embed_dim)
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))

    def codes(self, detach: bool = False) -> torch.Tensor:
        """(K, dc) fp32 l2-normalised codes (``detach``: no gradient to E)."""
        codes = self.codebook.codes()
        return codes.detach() if detach else codes

    def cross_entropy(self, q: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L_bp = CE(q . E^T / tau_b, labels) over q (N, dc), labels (N,); and the top-1 accuracy (0-d, no grad)."""
        with full_precision(q.device):
            return code_softmax.code_cross_entropy(q.float(), codes.float(), labels, self.tau, precision=self.precision)

    def mean_belief(self, q: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Batch-mean belief softmax(q . E^T / tau_b).mean(0): (K,) fp32 (the usage whose entropy L_ent raises)."""
        with full_precision(q.device):
            return code_softmax.mean_code_probs(q.float(), codes.float(), self.tau, precision=self.precision)

    def belief_kl(self, q: torch.Tensor, q_target: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """mean KL(belief(q_target) || belief(q)) over rows (0-d fp32; the target is a constant)."""
        with full_precision(q.device):
            return code_softmax.code_kl(q.float(), codes.float(), q_target.float(), self.tau, precision=self.precision)

    def soft_token(self, q: torch.Tensor, codes: torch.Tensor) -> SoftAssignment:
        """Top-M soft token e_soft (N, dc) fp32, its candidate indices (N, M) and weights (N, M)."""
        with full_precision(q.device):
            return soft_assign(q.float(), codes.float(), self.num_candidates, self.tau, metric="cosine",
                               straight_through=self.straight_through, precision=self.precision, backend=self.backend)

    def prototypes(self, codes: torch.Tensor) -> torch.Tensor:
        """Pixel prototypes code2pix(codes): (..., dc) -> (..., P) fp32 (norm-pix space)."""
        with full_precision(codes.device):
            return F.linear(codes.float(), self.code2pix.weight.float(), self.code2pix.bias.float())

    @torch.no_grad()
    def nearest_prototype(self, patches: torch.Tensor) -> torch.Tensor:
        """Incubation labels k* = argmin_k ||x - code2pix(E_k)||^2: patches (N, P) -> (N,) int64."""
        protos = self.prototypes(self.codes(detach=True))
        _, idx = nearest_token(patches.float().contiguous(), protos.contiguous(), k=1, metric="l2",
                               precision=self.precision, backend=self.backend)
        return idx[:, 0]

    # ------------------------------------------------------------------------------------------
    # code-usage bookkeeping (called after the optimiser step, never inside a forward)
    # ------------------------------------------------------------------------------------------
    def _usage_scale(self, num_queries: int) -> float:
        """Weight per query so that one step's usage sums to K over all ranks (uniform usage = 1)."""
        return self.num_codes / max(1, num_queries * world_size())

    @torch.no_grad()
    def track_usage(self, indices: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """EMA of code usage from an assignment (indices (N, m) or (N,), weights like them or None).

        Returns the raw (K,) usage counts of this step (all ranks summed), for statistics.
        """
        scale = self._usage_scale(indices.shape[0])
        w = torch.full(indices.shape, scale, device=indices.device) if weights is None else weights.float() * scale
        counts, _ = codebook_stats(indices, self.num_codes, weights=w)
        if world_size() > 1:
            dist.all_reduce(counts)
        self.codebook.ema_counts.lerp_(counts, 1.0 - self.codebook.decay)
        self.usage_steps += 1
        return counts

    @torch.no_grad()
    def ema_codes(self, q: torch.Tensor, indices: torch.Tensor) -> None:
        """code_update="ema": move each code to the EMA mean of the beliefs q (N, dc) labelled with it
        (indices (N,)); updates the usage EMA too (same units as :meth:`track_usage`)."""
        self.codebook.all_reduce = dist.all_reduce if world_size() > 1 else None
        weights = torch.full(indices.shape, self._usage_scale(indices.shape[0]), device=indices.device)
        self.codebook.ema_update(q.float(), indices, weights=weights)
        self.usage_steps += 1

    @torch.no_grad()
    def restart_dead(self, candidates: torch.Tensor) -> int:
        """Re-seed dead codes from the beliefs ``candidates`` (C, dc) once the warm-up is over.

        Under data parallelism rank 0's codes are broadcast so every rank keeps the same codebook.
        Returns the number of codes restarted (one host synchronisation).
        """
        if int(self.usage_steps) < self.dead_code_warmup or self.codebook.dead_code_threshold <= 0:
            return 0
        restarted = self.codebook.restart_dead_codes(candidates.float())
        if world_size() > 1:
            for tensor in (self.codebook.weight.data, self.codebook.ema_sums, self.codebook.ema_counts):
                dist.broadcast(tensor, src=0)
        return int(restarted.sum())

    @torch.no_grad()
    def usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Perplexity of this step's usage, fraction of dead codes (detached 0-d fp32 tensors)."""
        dead = self.codebook.dead_codes().float().mean()
        return {"perplexity": Codebook.perplexity(counts), "dead_fraction": dead,
                "usage_entropy_norm": Codebook.usage_entropy(counts) / max(math.log(self.num_codes), 1e-12)}
