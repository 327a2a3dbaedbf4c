"""The patch codebook side of PaCo-FR: Belief Predictor, codes, pixel prototypes, code tokens.

- :class:`BeliefPredictor`: MLP on a patch's normalised pixels, P -> hidden -> dc, output
  l2-normalised (the belief query q).
- :class:`PatchCodebook`: the codebook E (a :class:`pacofr.models.codebook.Codebook`, cosine), the
  pixel prototype of every code (the patch-pixel anchor: ``prototypes="table"`` an EMA k-means
  table of norm-pix patches, a second, Euclidean :class:`Codebook`; ``"linear"`` ``code2pix``,
  dc -> P), ``code2tok`` (dc -> D, a soft token as an encoder input), the losses over the belief
  softmax (never as an N x K matrix: :mod:`pacofr.models.code_softmax`), the top-M soft token
  (with a straight-through path to q, ``bp_ste``), the nearest-prototype labels, and the
  bookkeeping after each optimiser step: usage EMA, prototype EMA, data initialisation and
  distinct dead-code restarts, the usage report.

Everything that looks codes up, normalises or takes a softmax runs in fp32 with autocast off; the
score products follow ``cfg.codebook_precision``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pacofr.models import code_softmax
from pacofr.models.codebook import Codebook, pick_distinct_seeds
from pacofr.models.config import ModelConfig
from pacofr.ops.precision import full_precision
from pacofr.ops import codebook_stats, nearest_token
from pacofr.ops.soft_assign import NORM_EPS, SoftAssignment, soft_assign

#: Cosine similarity above which two code rows count as duplicates (stat ``cand_dup_fraction``).
DUPLICATE_COSINE = 0.99


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


@dataclass
class MaintenanceInput:
    """What the forwards since the last optimiser step hand to :meth:`PatchCodebook.maintain` (detached).

    Attributes:
        usage_indices: (N, m) int64 code choices whose usage is tracked (labels k* as (N, 1) in
            incubation, the top-M candidates afterwards).
        usage_weights: (N, m) fp32 candidate weights, or None (each choice counts 1).
        q_labelled / labels: (N_l, dc) beliefs and their labels (N_l,) for ``code_update="ema"``; or None.
        proto_counts / proto_sums: (K,) and (K, P) fp32 nearest-prototype statistics of the patches
            that update the prototype table; or None.
        candidates_q / candidates_x: (C, dc) beliefs and (C, P) norm-pix patches of the same C
            patches, from which new codes (and their prototypes) are seeded.
    """

    usage_indices: torch.Tensor
    usage_weights: torch.Tensor | None
    q_labelled: torch.Tensor | None
    labels: torch.Tensor | None
    proto_counts: torch.Tensor | None
    proto_sums: torch.Tensor | None
    candidates_q: torch.Tensor
    candidates_x: torch.Tensor


class PatchCodebook(nn.Module):
    """Codes E (K, dc), Belief Predictor, pixel prototypes and ``code2tok`` (see the module doc).

    Submodules: ``codebook`` (cosine, dc), ``belief``, ``code2tok``; with ``prototypes="table"``
    ``pixel_book`` (a Euclidean Codebook of K norm-pix patches, not trained by gradient), with
    ``"linear"`` ``code2pix``. Buffers: ``usage_steps`` (0-d int64) counts the maintenance steps
    done (the first one seeds every code from the data, :meth:`maintain`); ``usage_monitor`` and
    ``proto_monitor`` (K,) fp32 are EMAs of each code's usage and of how often its prototype is the
    nearest, and ``code_age`` (K,) int64 the steps since the code was seeded: a monitor divided by
    ``1 - decay^age`` is the code's bias-corrected usage since it was seeded (1 = uniform usage),
    which decides the dead codes and the usage report.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_codes = cfg.codebook_size
        self.num_candidates = cfg.num_candidates
        self.tau = cfg.tau_b
        self.straight_through = cfg.straight_through
        self.bp_ste = cfg.bp_ste
        self.backend = cfg.backend
        self.precision = cfg.codebook_precision
        self.dead_code_warmup = cfg.dead_code_warmup
        self.low_usage_threshold = cfg.low_usage_threshold
        self.dead_code_threshold = cfg.dead_code_threshold if cfg.restart_dead_codes else 0.0
        self.decay = cfg.codebook_decay
        # the Codebooks keep the EMA statistics; which codes are dead is decided here, from the monitors
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, decay=cfg.codebook_decay,
                                 dead_code_threshold=0.0, use_cosine=True)
        self.belief = BeliefPredictor(cfg.patch_dim, cfg.bp_hidden, cfg.code_dim)
        self.pixel_book: Codebook | None = None
        self.code2pix: nn.Linear | None = None
        if cfg.prototypes == "table":
            self.pixel_book = Codebook(cfg.codebook_size, cfg.patch_dim, decay=cfg.codebook_decay,
                                       dead_code_threshold=0.0, use_cosine=False)
            self.pixel_book.weight.requires_grad_(False)
        else:
            self.code2pix = nn.Linear(cfg.code_dim, cfg.patch_dim)
        self.code2tok = nn.Linear(cfg.code_dim, cfg.embed_dim)
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("usage_monitor", torch.zeros(cfg.codebook_size))
        self.register_buffer("proto_monitor", torch.zeros(cfg.codebook_size))
        self.register_buffer("code_age", torch.zeros(cfg.codebook_size, dtype=torch.long))

    # ------------------------------------------------------------------------------------------
    # forward-side pieces
    # ------------------------------------------------------------------------------------------
    @property
    def has_table(self) -> bool:
        """True with ``prototypes="table"`` (prototypes are EMA centroids, not a function of E)."""
        return self.pixel_book is not None

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
        """Top-M soft token e_soft (N, dc) fp32, its candidate indices (N, M) and weights (N, M).

        With ``bp_ste`` the token is ``e_soft + q - stopgrad(q)``: the same value, and the gradient
        that reaches the token also reaches q unchanged (the VQ-VAE straight-through estimator), so
        the Belief Predictor learns from the reconstruction at every M (the softmax over M = 1
        candidate is constant and passes nothing).
        """
        with full_precision(q.device):
            assignment = soft_assign(q.float(), codes.float(), self.num_candidates, self.tau, metric="cosine",
                                     straight_through=self.straight_through, precision=self.precision,
                                     backend=self.backend)
            if not self.bp_ste:
                return assignment
            token = assignment.token + (q.float() - q.float().detach())
            return SoftAssignment(token, assignment.indices, assignment.weights)

    def prototype_table(self) -> torch.Tensor:
        """(K, P) fp32 pixel prototypes of all codes, detached (norm-pix space)."""
        if self.pixel_book is not None:
            return self.pixel_book.weight.detach().float()
        return self.prototypes(self.codes(detach=True)).detach()

    def prototypes(self, codes: torch.Tensor) -> torch.Tensor:
        """``prototypes="linear"``: code2pix(codes), (..., dc) -> (..., P) fp32, differentiable."""
        if self.code2pix is None:
            raise RuntimeError("prototypes='table' keeps one prototype per code: use prototype_table() or "
                               "token_prototype(assignment)")
        with full_precision(codes.device):
            return F.linear(codes.float(), self.code2pix.weight.float(), self.code2pix.bias.float())

    def labelled_prototypes(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, P) fp32 prototypes of codes ``labels`` (N,): differentiable through code2pix ("linear")."""
        if self.pixel_book is not None:
            return self.pixel_book.weight.detach().float()[labels]
        return self.prototypes(self.codes()[labels])

    def token_prototype(self, assignment: SoftAssignment) -> torch.Tensor:
        """(N, P) fp32 pixel prototype of soft tokens: sum_m w_m T[idx_m] for the table (differentiable
        through the weights), code2pix(token) for the linear map (through the token)."""
        if self.pixel_book is None:
            return self.prototypes(assignment.token)
        with full_precision(assignment.weights.device):
            rows = self.pixel_book.weight.detach().float()[assignment.indices]  # (N, M, P)
            return torch.einsum("nm,nmp->np", assignment.weights.float(), rows)

    @torch.no_grad()
    def nearest_prototype(self, patches: torch.Tensor) -> torch.Tensor:
        """Labels k* = argmin_k ||x - prototype_k||^2: patches (N, P) -> (N,) int64 (a row holding NaN,
        which nearest_token leaves without a code, gets 0: its losses are NaN and the step is skipped).
        Autocast is off: under it the torch backend's score GEMM would run in bf16."""
        with full_precision(patches.device):
            _, idx = nearest_token(patches.float().contiguous(), self.prototype_table().contiguous(), k=1,
                                   metric="l2", precision=self.precision, backend=self.backend)
        return idx[:, 0].clamp_min(0)

    @torch.no_grad()
    def prototype_stats(self, patches: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-code count (K,) and sum (K, P) of ``patches`` (N, P) labelled ``labels`` (N,), fp32;
        ``weights`` (N,) weight each patch (None: 1)."""
        counts, sums = codebook_stats(labels, self.num_codes, weights=weights, x=patches.float(), backend=self.backend)
        return counts, sums

    @torch.no_grad()
    def assignment_stats(self, assignment: SoftAssignment, labels: torch.Tensor | None,
                         codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quality of the soft tokens (detached 0-d fp32): ``cand_entropy`` (mean entropy of the M
        candidate weights, nats; log M is uniform), ``cand_top1_weight``, ``cand_dup_fraction``
        (patches with another candidate whose code has cosine > 0.99 with the top-1's), and with
        nearest-prototype ``labels`` (N,) ``bp_top1_agreement`` (top-1 candidate == k*)."""
        weights = assignment.weights.float()
        entropy = -(torch.special.xlogy(weights, weights)).sum(dim=-1)
        stats = {"cand_entropy": entropy.mean(), "cand_top1_weight": weights[:, 0].mean()}
        chosen = codes.detach().float()[assignment.indices]  # (N, M, dc) unit rows
        with full_precision(chosen.device):
            cosine = torch.einsum("nd,nmd->nm", chosen[:, 0], chosen[:, 1:])
        stats["cand_dup_fraction"] = ((cosine > DUPLICATE_COSINE).any(dim=-1).float().mean() if cosine.shape[1]
                                      else torch.zeros((), device=weights.device))
        if labels is not None:
            stats["bp_top1_agreement"] = (assignment.indices[:, 0] == labels).float().mean()
        return stats

    # ------------------------------------------------------------------------------------------
    # bookkeeping after the optimiser step (never inside a forward)
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
        self.codebook.ema_counts.lerp_(counts, 1.0 - self.decay)
        self.usage_monitor.lerp_(counts, 1.0 - self.decay)
        return counts

    @torch.no_grad()
    def ema_codes(self, q: torch.Tensor, indices: torch.Tensor) -> None:
        """code_update="ema": move each code to the EMA mean of the beliefs q (N, dc) labelled with it
        (indices (N,)); updates the usage EMA too (same units as :meth:`track_usage`)."""
        self.codebook.all_reduce = dist.all_reduce if world_size() > 1 else None
        weights = torch.full(indices.shape, self._usage_scale(indices.shape[0]), device=indices.device)
        counts, _ = codebook_stats(indices, self.num_codes, weights=weights)
        if world_size() > 1:
            dist.all_reduce(counts)
        self.usage_monitor.lerp_(counts, 1.0 - self.decay)
        self.codebook.ema_update(q.float(), indices, weights=weights)

    @torch.no_grad()
    def update_prototypes(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA k-means step of the prototype table from raw statistics (counts (K,), sums (K, P)):
        each prototype becomes the bias-corrected EMA mean of the patches nearest to it (usage units:
        a uniformly used prototype counts 1 per step; all ranks summed)."""
        if self.pixel_book is None:
            return
        if world_size() > 1:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        scale = self.num_codes / counts.sum().clamp_min(1.0)
        self.pixel_book.ema_update_from_stats(counts * scale, sums * scale, laplace=False)
        self.proto_monitor.lerp_(counts * scale, 1.0 - self.decay)

    def _corrected(self, monitor: torch.Tensor) -> torch.Tensor:
        """(K,) a usage monitor divided by 1 - decay^age: each code's mean usage since it was seeded."""
        return monitor / (1.0 - torch.pow(self.decay, self.code_age.float())).clamp_min(1e-12)

    def _below(self, threshold: float) -> torch.Tensor:
        """(K,) bool: codes used below ``threshold`` of uniform usage, or whose prototype is that rarely the nearest."""
        low = self._corrected(self.usage_monitor) < threshold
        if self.pixel_book is not None:
            low |= self._corrected(self.proto_monitor) < threshold
        return low

    @torch.no_grad()
    def usage_report(self) -> dict[str, float]:
        """``low_usage_fraction``: codes whose usage since they were seeded is below
        ``low_usage_threshold`` of uniform usage (with the table, a code also counts when its
        prototype is that rarely the nearest); ``dead_fraction``: codes below the restart threshold.
        Measured before the restarts of the step (:meth:`maintain` calls it first)."""
        return {"low_usage_fraction": float(self._below(self.low_usage_threshold).float().mean()),
                "dead_fraction": float(self._below(self.dead_code_threshold).float().mean())}

    @torch.no_grad()
    def maintain(self, work: MaintenanceInput) -> dict[str, float]:
        """The codebook's step after an optimiser step: usage EMA (or EMA codes), prototype EMA,
        the usage report (before any restart), then the first step's data initialisation of every
        code, or the restart of the dead codes: seeded at least ``dead_code_warmup`` steps ago and
        used below ``dead_code_threshold`` of uniform usage since. Returns the report plus
        ``restarted_codes``."""
        if work.labels is not None:
            self.ema_codes(work.q_labelled, work.labels)
        else:
            self.track_usage(work.usage_indices, work.usage_weights)
        if work.proto_counts is not None:
            self.update_prototypes(work.proto_counts, work.proto_sums)
        first = int(self.usage_steps) == 0
        self.usage_steps += 1
        self.code_age += 1
        report = self.usage_report()
        if first:
            rows = torch.ones(self.num_codes, dtype=torch.bool, device=self.code_age.device)
        else:
            rows = (self.code_age >= max(self.dead_code_warmup, 1)) & self._below(self.dead_code_threshold)
        report["restarted_codes"] = float(self._seed(rows, work))
        return report

    def _seed(self, rows_mask: torch.Tensor, work: MaintenanceInput) -> int:
        """Re-seed the codes in ``rows_mask`` (K,) from distinct candidate patches: the code from the
        patch's belief, its table prototype from its pixels (with EMA statistics from zero, so its
        first assignments set it); candidates are chosen k-means++ style in the prototypes' pixel
        space (the table) or in code space (linear). Their usage record starts again (age 0).
        Rank 0's result is broadcast under data parallelism. Returns the number of codes re-seeded."""
        rows = torch.nonzero(rows_mask).flatten()
        seeded = torch.zeros((), dtype=torch.long, device=rows_mask.device)
        if rows.numel():
            keep = ~rows_mask
            beliefs = (F.normalize(work.candidates_q.float(), dim=1, eps=NORM_EPS), self.codes(detach=True)[keep])
            if self.pixel_book is not None:  # far in pixel space, and no copy of a code in belief space either
                picks = pick_distinct_seeds(work.candidates_x.float(), self.pixel_book.weight.detach().float()[keep],
                                            rows.numel(), also_distinct=beliefs)
            else:
                picks = pick_distinct_seeds(*beliefs, rows.numel())
            rows = rows[:picks.numel()]
            self.codebook.reseed(rows, work.candidates_q[picks], 1.0)
            if self.pixel_book is not None:
                self.pixel_book.reseed(rows, work.candidates_x[picks], 0.0)
            for monitor in (self.usage_monitor, self.proto_monitor, self.code_age):
                monitor.index_fill_(0, rows, 0)
            seeded = torch.tensor(rows.numel(), device=rows_mask.device)
        if world_size() > 1:
            for book in (self.codebook, self.pixel_book):
                if book is not None:
                    for tensor in (book.weight.data, book.ema_sums, book.ema_counts):
                        dist.broadcast(tensor, src=0)
            for tensor in (self.usage_monitor, self.proto_monitor, self.code_age, seeded):
                dist.broadcast(tensor, src=0)
        return int(seeded)

    @torch.no_grad()
    def usage_stats(self, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Perplexity and normalised entropy of one step's usage counts (K,) (detached 0-d fp32)."""
        return {"perplexity": Codebook.perplexity(counts),
                "usage_entropy_norm": Codebook.usage_entropy(counts) / max(math.log(self.num_codes), 1e-12)}
