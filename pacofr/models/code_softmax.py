"""Softmax over all K codes without an (N, K) buffer: the Belief Predictor's losses, in row chunks.

The belief logits of N patches against K codes are ``s = q . E^T / tau`` (fp32, N x K). At
ViT-B/16 scale (N = 256 x 196 patches, K = 4096) that matrix is 822 MB, plus as much again for its
gradient; the three losses that need a softmax over every code never hold it. They process
``rows = SCORE_CHUNK_ELEMENTS // K`` rows at a time, keep only per-row statistics (the
log-sum-exp) for the backward pass, and recompute each chunk's scores there (the way fused
linear cross-entropy kernels handle large vocabularies). Gradients are exact (the same math as
autograd through the dense softmax), tested against the dense float64 reference.

* :func:`code_cross_entropy` -- ``mean_i CE(s_i, label_i)`` (L_bp) and the top-1 accuracy;
* :func:`mean_code_probs` -- ``mean_i softmax(s_i)``, the batch-mean belief whose entropy L_ent maximises;
* :func:`code_kl` -- ``mean_i KL(softmax(t_i) || softmax(s_i))`` (the context-belief loss).

Inputs: q (N, dc) and codes (K, dc) fp32 (other float dtypes are upcast), tau a positive float;
``precision`` rounds the operands of the score products as in :mod:`pacofr.ops.precision` (the
gradient passes straight through the rounding, as under autocast).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from pacofr.ops.precision import check_precision, round_operands

SCORE_CHUNK_ELEMENTS = 1 << 22
"""Scores held at once (16 MiB of fp32): rows per chunk = max(1, this // K)."""


def row_chunks(rows: int, codes: int, budget: int = SCORE_CHUNK_ELEMENTS) -> Iterator[slice]:
    """Consecutive row slices of at most ``max(1, budget // codes)`` rows covering ``range(rows)``."""
    step = max(1, budget // max(1, codes))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


class _Operands:
    """q and codes as fp32 with the precision's rounding applied once; scores of a row chunk."""

    def __init__(self, q: torch.Tensor, codes: torch.Tensor, tau: float, precision: str) -> None:
        self.q = round_operands(q.float(), precision)
        self.codes = round_operands(codes.float(), precision)
        self.inv_tau = 1.0 / tau

    def scores(self, rows: slice) -> torch.Tensor:
        """(len(rows), K) fp32 logits of the chunk."""
        return (self.q[rows] @ self.codes.T) * self.inv_tau

    def backprop(self, rows: slice, grad_scores: torch.Tensor, grad_q: torch.Tensor | None,
                 grad_codes: torch.Tensor | None) -> None:
        """Accumulate the chunk's d(loss)/d(scores) into the gradients of q (rows) and codes."""
        grad_logits = grad_scores * self.inv_tau
        if grad_q is not None:
            grad_q[rows] = grad_logits @ self.codes
        if grad_codes is not None:
            grad_codes.addmm_(grad_logits.T, self.q[rows])


def _check(q: torch.Tensor, codes: torch.Tensor, tau: float, precision: str) -> None:
    if q.dim() != 2 or codes.dim() != 2 or q.shape[1] != codes.shape[1]:
        raise ValueError(f"q must be (N, dc) and codes (K, dc) with the same dc, got {tuple(q.shape)} and "
                         f"{tuple(codes.shape)}")
    if codes.shape[0] == 0:
        raise ValueError("codes must hold at least one code (K >= 1)")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    check_precision(precision)


def _grad_buffers(ctx, q: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_q = torch.empty(q.shape, dtype=torch.float32, device=q.device) if ctx.needs_input_grad[0] else None
    grad_codes = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device) if ctx.needs_input_grad[1] else None
    return grad_q, grad_codes


def _cast(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class _CodeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, codes, labels, tau, precision, budget):  # noqa: D102
        ops = _Operands(q, codes, tau, precision)
        n = q.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=q.device)
        total = torch.zeros((), dtype=torch.float32, device=q.device)
        correct = torch.zeros((), dtype=torch.float32, device=q.device)
        for rows in row_chunks(n, codes.shape[0], budget):
            scores = ops.scores(rows)
            lse[rows] = torch.logsumexp(scores, dim=1)
            label = labels[rows].unsqueeze(1)
            total += (lse[rows] - scores.gather(1, label).squeeze(1)).sum()
            correct += (scores.argmax(dim=1) == labels[rows]).sum()
        ctx.save_for_backward(q, codes, labels, lse)
        ctx.tau, ctx.precision, ctx.budget = tau, precision, budget
        accuracy = correct / max(n, 1)
        ctx.mark_non_differentiable(accuracy)
        return total / max(n, 1), accuracy

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):  # noqa: D102
        del grad_correct
        q, codes, labels, lse = ctx.saved_tensors
        ops = _Operands(q, codes, ctx.tau, ctx.precision)
        grad_q, grad_codes = _grad_buffers(ctx, q, codes)
        scale = grad_loss.float() / max(q.shape[0], 1)
        for rows in row_chunks(q.shape[0], codes.shape[0], ctx.budget):
            probs = torch.exp(ops.scores(rows) - lse[rows, None])
            probs.scatter_add_(1, labels[rows].unsqueeze(1), -torch.ones_like(lse[rows, None]))
            ops.backprop(rows, probs * scale, grad_q, grad_codes)
        return _cast(grad_q, q), _cast(grad_codes, codes), None, None, None, None


def code_cross_entropy(q: torch.Tensor, codes: torch.Tensor, labels: torch.Tensor, tau: float, *,
                       precision: str = "ieee", budget: int = SCORE_CHUNK_ELEMENTS
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(q @ codes.T / tau, labels)`` and the fraction of rows whose argmax is their label.

    q (N, dc), codes (K, dc), labels (N,) int64 in [0, K). Returns two 0-d fp32 tensors; the loss is
    differentiable w.r.t. q and codes, the accuracy is not. N = 0 gives 0 and 0.
    """
    _check(q, codes, tau, precision)
    if labels.shape != (q.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({q.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    return _CodeCrossEntropy.apply(q, codes, labels, float(tau), precision, budget)


class _MeanCodeProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, codes, tau, precision, budget):  # noqa: D102
        ops = _Operands(q, codes, tau, precision)
        n, k = q.shape[0], codes.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=q.device)
        total = torch.zeros(k, dtype=torch.float32, device=q.device)
        for rows in row_chunks(n, k, budget):
            scores = ops.scores(rows)
            lse[rows] = torch.logsumexp(scores, dim=1)
            total += torch.exp(scores - lse[rows, None]).sum(dim=0)
        ctx.save_for_backward(q, codes, lse)
        ctx.tau, ctx.precision, ctx.budget = tau, precision, budget
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_mean):  # noqa: D102
        q, codes, lse = ctx.saved_tensors
        ops = _Operands(q, codes, ctx.tau, ctx.precision)
        grad_q, grad_codes = _grad_buffers(ctx, q, codes)
        g = grad_mean.float() / max(q.shape[0], 1)
        for rows in row_chunks(q.shape[0], codes.shape[0], ctx.budget):
            probs = torch.exp(ops.scores(rows) - lse[rows, None])
            grad_scores = probs * (g[None, :] - (probs @ g)[:, None])
            ops.backprop(rows, grad_scores, grad_q, grad_codes)
        return _cast(grad_q, q), _cast(grad_codes, codes), None, None, None


def mean_code_probs(q: torch.Tensor, codes: torch.Tensor, tau: float, *, precision: str = "ieee",
                    budget: int = SCORE_CHUNK_ELEMENTS) -> torch.Tensor:
    """``softmax(q @ codes.T / tau, dim=1).mean(0)``: (K,) fp32, differentiable w.r.t. q and codes."""
    _check(q, codes, tau, precision)
    return _MeanCodeProbs.apply(q, codes, float(tau), precision, budget)


class _CodeKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, codes, q_target, tau, precision, budget):  # noqa: D102
        ops = _Operands(q, codes, tau, precision)
        target = _Operands(q_target, codes, tau, precision)
        n = q.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=q.device)
        lse_t = torch.empty(n, dtype=torch.float32, device=q.device)
        total = torch.zeros((), dtype=torch.float32, device=q.device)
        for rows in row_chunks(n, codes.shape[0], budget):
            scores, scores_t = ops.scores(rows), target.scores(rows)
            lse[rows], lse_t[rows] = torch.logsumexp(scores, dim=1), torch.logsumexp(scores_t, dim=1)
            log_t = scores_t - lse_t[rows, None]
            total += (log_t.exp() * (log_t - (scores - lse[rows, None]))).sum()
        ctx.save_for_backward(q, codes, q_target, lse, lse_t)
        ctx.tau, ctx.precision, ctx.budget = tau, precision, budget
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        q, codes, q_target, lse, lse_t = ctx.saved_tensors
        ops = _Operands(q, codes, ctx.tau, ctx.precision)
        target = _Operands(q_target, codes, ctx.tau, ctx.precision)
        grad_q, grad_codes = _grad_buffers(ctx, q, codes)
        scale = grad_loss.float() / max(q.shape[0], 1)
        for rows in row_chunks(q.shape[0], codes.shape[0], ctx.budget):
            probs = torch.exp(ops.scores(rows) - lse[rows, None])
            probs_t = torch.exp(target.scores(rows) - lse_t[rows, None])
            ops.backprop(rows, (probs - probs_t) * scale, grad_q, grad_codes)
        return _cast(grad_q, q), _cast(grad_codes, codes), None, None, None, None


def code_kl(q: torch.Tensor, codes: torch.Tensor, q_target: torch.Tensor, tau: float, *, precision: str = "ieee",
            budget: int = SCORE_CHUNK_ELEMENTS) -> torch.Tensor:
    """``mean_i KL(softmax(t_i) || softmax(s_i))`` with ``s = q @ codes.T / tau``, ``t = q_target @ codes.T / tau``.

    q and q_target (N, dc). 0-d fp32, differentiable w.r.t. q and codes; the target distribution is
    a constant (no gradient to q_target, and codes receive gradient through ``s`` only).
    """
    _check(q, codes, tau, precision)
    if q_target.shape != q.shape:
        raise ValueError(f"q_target must have q's shape {tuple(q.shape)}, got {tuple(q_target.shape)}")
    return _CodeKL.apply(q, codes, q_target.detach(), float(tau), precision, budget)
