"""Multi-candidate soft assignment of queries to a codebook, and codebook usage statistics.

Public ops (``backend="auto" | "torch" | "triton" | "cuda"``):

* :func:`soft_assign` -- top-``m`` codes per query by cosine (or negative squared L2) score over a
  temperature, softmax over those ``m`` scores, and the weighted sum of the chosen code rows.
  Differentiable w.r.t. ``q``, ``codebook`` and a tensor ``tau``; the chosen set is treated as a
  constant (the op is piecewise smooth), so gradients touch only the ``m`` chosen rows per query.
* :func:`codebook_stats` -- per-code sums of weights and of weighted vectors, by scatter (never a
  one-hot matrix), returned raw in fp32 so that data-parallel ranks can all-reduce them before an
  EMA (see :class:`pacofr.models.codebook.Codebook`).

Contracts shared by every backend:

* ties: among equal scores the smaller code index ranks first (in the set and in its order);
* NaN scores rank below every number (as ``-inf``); a query row containing NaN gets NaN weights and
  a NaN token (its indices are valid but unspecified);
* ``tau`` must be positive: a Python number is checked here, a tensor is not (that would need a
  host synchronisation);
* the scores that weight the softmax are recomputed directly from the chosen rows (``cos`` from
  normalised vectors, ``||q - e||^2`` as a sum of squared differences), never from the expanded
  ``||q||^2 - 2 q.e + ||e||^2`` used for ranking, so near-duplicate codes keep accurate weights.

The ``torch`` backend here is the reference: plain PyTorch, fp32 compute (fp64 for fp64 inputs, so
it doubles as the test oracle), autograd through ordinary ops. The fused backends share
:class:`_FusedSoftAssignFunction` and differ only in the kernels they launch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pacofr.ops.checks import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_same_dtype, check_tensor
from pacofr.ops._dispatch import get_op, register
from pacofr.ops._launch import cdiv, interpreting, new_output, next_power_of_two
from pacofr.ops._norms import squared_row_norms, squared_row_norms_triton
from pacofr.ops._selection import smallest_k
from pacofr.ops._tiles import gather_block_d, ranking_tiles, register_ceiling
from pacofr.ops.precision import (
    check_precision,
    cuda_input_precision,
    full_precision,
    kernel_precision,
    round_operands,
)

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("cosine", "l2")
#: Largest ``m`` the fused kernels keep in registers; ``auto`` uses the reference above it.
MAX_FUSED_M = 16
#: ``F.normalize``'s default: a vector is divided by ``max(||v||, NORM_EPS)``.
NORM_EPS = 1e-12
#: Most scores of the N x K matrix the reference ranking holds in one block (256 MiB of fp32); its
#: blocks are cache-sized below that (see :mod:`pacofr.ops._selection`).
_REFERENCE_SCORE_ELEMENTS = 1 << 26


class SoftAssignment(NamedTuple):
    """Result of :func:`soft_assign` (unpacks as ``token, indices, weights``)."""

    token: torch.Tensor  #: (..., D), q's dtype
    indices: torch.Tensor  #: (..., m) int64, best first
    weights: torch.Tensor  #: (..., m) float32, softmax over the m chosen scores


class CodebookStats(NamedTuple):
    """Result of :func:`codebook_stats` (unpacks as ``counts, sums``)."""

    counts: torch.Tensor  #: (K,) float32, or float64 (codebook_stats' counts_dtype)
    sums: torch.Tensor | None  #: (K, D) float32, or None when no ``x`` was given


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_tau(tau: object, device: torch.device) -> float | torch.Tensor:
    """A positive finite number, or a one-element floating tensor on ``device`` (not value-checked)."""
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1 or tau.dim() > 1:
            raise ValueError(f"tau must be a number or a 0-d tensor, got a tensor of shape {tuple(tau.shape)}")
        if not tau.dtype.is_floating_point:
            raise TypeError(f"tau must be a floating-point tensor, got dtype {tau.dtype}")
        if tau.device != device:
            raise ValueError(f"tau is on {tau.device} but q is on {device}; move tau to q's device")
        return tau.reshape(())
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a positive float or a 0-d tensor, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a positive finite number, got {tau}")
    return float(tau)


def _check_soft_assign_args(q: object, codebook: object, m: object, tau: object, metric: object,
                            straight_through: object, *, allow_float64: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, int, float | torch.Tensor]:
    dtypes = (*FLOAT_DTYPES, torch.float64) if allow_float64 else FLOAT_DTYPES
    q = check_tensor("q", q, dtypes=dtypes)
    codebook = check_tensor("codebook", codebook, ndim=2, dtypes=dtypes)
    if q.dim() < 1:
        raise ValueError("q must have at least 1 dimension (..., D), got a 0-d tensor")
    check_same_device(q=q, codebook=codebook)
    check_same_dtype(q=q, codebook=codebook)
    num_codes, dim = codebook.shape
    if num_codes == 0 or dim == 0:
        raise ValueError(f"codebook must be a non-empty (K, D) matrix, got shape {tuple(codebook.shape)}")
    if q.shape[-1] != dim:
        raise ValueError(f"q's last dimension ({q.shape[-1]}) must equal codebook's D ({dim}); "
                         f"q has shape {tuple(q.shape)}, codebook {tuple(codebook.shape)}")
    m = check_int("m", m, low=1, high=num_codes)
    check_choice("metric", metric, METRICS)
    if not isinstance(straight_through, bool):
        raise TypeError(f"straight_through must be a bool, got {type(straight_through).__name__}")
    return q, codebook, m, _check_tau(tau, q.device)


def _check_stats_args(indices: object, num_codes: object, weights: object, x: object
                      ) -> tuple[torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
    indices = check_tensor("indices", indices, ndim=(1, 2),
                           dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8))
    num_codes = check_int("K", num_codes, low=1)
    rows = indices.shape[0]
    if weights is not None:
        weights = check_tensor("weights", weights, dtypes=(*FLOAT_DTYPES, torch.float64))
        if weights.shape != indices.shape:
            raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, "
                             f"got {tuple(weights.shape)}")
    if x is not None:
        x = check_tensor("x", x, ndim=2, dtypes=(*FLOAT_DTYPES, torch.float64))
        if x.shape[0] != rows:
            raise ValueError(f"x must have one row per row of indices ({rows}), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x must have at least one column (D >= 1)")
    check_same_device(indices=indices, weights=weights, x=x)
    _check_index_range(indices, num_codes)
    return indices, num_codes, weights, x


def _check_index_range(indices: torch.Tensor, num_codes: int) -> None:
    """Reject indices outside [0, K): eagerly on CPU, by an asynchronous device assert on CUDA."""
    if indices.numel() == 0:
        return
    in_range = ((indices >= 0) & (indices < num_codes)).all()
    if indices.device.type == "cpu":
        if not bool(in_range):
            bad = indices[(indices < 0) | (indices >= num_codes)][0]
            raise ValueError(f"indices must lie in [0, K) = [0, {num_codes}), found {int(bad)}")
    else:
        # no host synchronisation: a failure surfaces as a device-side assert at a later sync
        torch._assert_async(in_range, f"codebook_stats: indices must lie in [0, K={num_codes})")


# --------------------------------------------------------------------------------------------
# Reference implementation (backend "torch")
# --------------------------------------------------------------------------------------------


class _ForwardHardBackwardSoft(torch.autograd.Function):
    """Returns ``hard`` in the forward pass and routes the whole gradient to ``soft``."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def hard_token(best_rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The straight-through forward token (N, D): each row's best code, but NaN for a row whose
    weights (N, m) are NaN (a query containing NaN), as the NaN rule promises; every backend."""
    return torch.where(torch.isnan(weights).any(dim=1, keepdim=True), math.nan, best_rows)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def select_top_m(q: torch.Tensor, codebook: torch.Tensor, m: int, metric: str, precision: str = "ieee") -> torch.Tensor:
    """Indices (N, m) int64 of the m best codes per row of ``q`` (N, D), ties to the smaller index.

    Ranks by ``(q . e) / max(||e||, eps)`` (cosine: the positive row factor ``1 / ||q||`` does not
    change the order) or ``2 q.e - ||e||^2`` (l2, ``||q||^2`` dropped: constant per row), as the
    fused kernels do, computed in fp32 (fp64 for fp64 inputs) one cache-sized block at a time (at
    most ``_REFERENCE_SCORE_ELEMENTS`` scores), the products' operands rounded as ``precision``
    says (:func:`pacofr.ops.precision.round_operands`); NaN ranks as ``-inf``. The negated scores
    go through :func:`pacofr.ops._selection.smallest_k`, which keeps the tie rule exact without sorting.
    """
    compute = _compute_dtype(q.dtype)
    cb = codebook.to(compute)
    codes_t = round_operands(cb, precision).t().contiguous()  # (D, K): a transposed view halves the GEMM rate

    def prepare_rows(rows: torch.Tensor) -> torch.Tensor:
        return round_operands(rows.to(compute), precision)

    squared_norms = squared_row_norms(cb, dtype=compute)  # layout-independent: identical codes tie
    if metric == "cosine":
        negated_inverse_norms = -1.0 / squared_norms.sqrt().clamp_min(NORM_EPS)

        def negated_scores(rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
            return torch.mm(rows, codes_t[:, c0:c1]).mul_(negated_inverse_norms[c0:c1])
    else:
        code_bias = squared_norms

        def negated_scores(rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
            return torch.addmm(code_bias[c0:c1], rows, codes_t[:, c0:c1], alpha=-2.0)

    _, indices = smallest_k(q, cb.shape[0], m, prepare_rows, negated_scores, score_dtype=compute,
                            nan_as_inf=True, buffer_elements=_REFERENCE_SCORE_ELEMENTS)
    return indices


def chosen_scores(q: torch.Tensor, rows: torch.Tensor, metric: str) -> torch.Tensor:
    """Raw scores (N, m) of queries (N, D) against their chosen code rows (N, m, D), before 1/tau.

    cosine: ``cos(q, e) = (q . e) / (max(||q||, 1e-12) max(||e||, 1e-12))``, the dot product of
    the vectors normalised as ``F.normalize`` does (the norms divide the m dot products, not the
    m * D values);
    l2: ``-||q - e||^2`` summed directly (no expansion, so no cancellation).
    """
    if metric == "cosine":
        dots = (rows * q.unsqueeze(1)).sum(dim=-1)
        norms = rows.norm(dim=-1).clamp_min(NORM_EPS) * q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return dots / norms
    return -(q.unsqueeze(1) - rows).pow(2).sum(dim=-1)


def soft_assign_reference(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float | torch.Tensor, *,
                          metric: str = "cosine", straight_through: bool = False,
                          precision: str = "ieee") -> SoftAssignment:
    """Plain-PyTorch soft assignment of ``q`` (N, D) to ``codebook`` (K, D); autograd through torch ops.

    Arguments as :func:`soft_assign` (already validated; fp64 inputs allowed, the test oracle). The
    math runs in fp32 (fp64 for fp64 inputs) on upcast copies, so codebook gradients accumulate in
    fp32 and are cast once. Returns token in q's dtype, indices int64, weights fp32 (fp64 for fp64).
    """
    compute = _compute_dtype(q.dtype)
    indices = select_top_m(q, codebook, m, metric, precision)
    q_c = q.to(compute)
    rows = codebook.to(compute)[indices]  # (N, m, D): gradient scatters into an fp32 buffer
    raw = chosen_scores(q_c, rows, metric)
    tau_c = tau.to(compute) if isinstance(tau, torch.Tensor) else tau
    # softmax((c - max c) / tau) == softmax(c / tau), robust when tau is tiny
    shifted = raw - raw.amax(dim=1, keepdim=True).detach()
    weights = torch.softmax(shifted / tau_c, dim=1)
    soft = (weights.unsqueeze(-1) * rows).sum(dim=1)
    if straight_through:
        token = _ForwardHardBackwardSoft.apply(soft, hard_token(rows[:, 0].detach(), weights.detach()))
    else:
        token = soft
    return SoftAssignment(token.to(q.dtype), indices, weights)


@torch.no_grad()
def codebook_stats_reference(indices: torch.Tensor, num_codes: int, weights: torch.Tensor | None = None,
                             x: torch.Tensor | None = None) -> CodebookStats:
    """``index_add_``: counts (K,) in fp64 (exact integer counts to 2^53); sums (K, D) in fp32 (fp64 for
    fp64 weights/x) or None."""
    compute = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (weights, x)) \
        else torch.float32
    flat_idx = indices.reshape(-1).long()
    per_row = 1 if indices.dim() == 1 else indices.shape[1]
    flat_w = (torch.ones(flat_idx.shape, dtype=compute, device=indices.device) if weights is None
              else weights.reshape(-1).to(compute))
    counts = torch.zeros(num_codes, dtype=torch.float64, device=indices.device).index_add_(
        0, flat_idx, flat_w.to(torch.float64))
    sums = None
    if x is not None:
        rows = x.to(compute).repeat_interleave(per_row, dim=0) * flat_w.unsqueeze(1)
        sums = torch.zeros(num_codes, x.shape[1], dtype=compute, device=x.device).index_add_(0, flat_idx, rows)
    return CodebookStats(counts, sums)


@register("soft_assign", "torch")
def _soft_assign_torch(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float | torch.Tensor,
                       metric: str, straight_through: bool, deterministic: bool, precision: str) -> SoftAssignment:
    with full_precision(q.device):  # under autocast torch.mm would round to bf16 behind precision's back
        return soft_assign_reference(q, codebook, m, tau, metric=metric, straight_through=straight_through,
                                     precision=precision)


@register("codebook_stats", "torch")
def _codebook_stats_torch(indices: torch.Tensor, num_codes: int, weights: torch.Tensor | None,
                          x: torch.Tensor | None, deterministic: bool) -> CodebookStats:
    return codebook_stats_reference(indices, num_codes, weights, x)


# --------------------------------------------------------------------------------------------
# Fused backends: one autograd Function, one bundle of launchers per backend
# --------------------------------------------------------------------------------------------


class _Saved(NamedTuple):
    """Forward by-products the fused backward needs (all fp32 except ``indices``)."""

    indices: torch.Tensor  #: (N, m) int64
    weights: torch.Tensor  #: (N, m)
    raw: torch.Tensor  #: (N, m) raw scores c before 1/tau
    q_norm: torch.Tensor  #: (N,) ||q|| (cosine; unused for l2)
    code_stat: torch.Tensor  #: (K,) ||e|| (cosine) or ||e||^2 (l2)


def _code_stat(squared_norms: torch.Tensor, metric: str) -> torch.Tensor:
    """``||e||`` (cosine) or ``||e||^2`` (l2) from the codes' fp32 squared norms (:mod:`pacofr.ops._norms`)."""
    return squared_norms.sqrt() if metric == "cosine" else squared_norms


def _rank_term(code_stat: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-code term of the shared ranking loop: ``1 / max(||e||, eps)`` (cosine) or ``0.5 ||e||^2`` (l2)."""
    return 1.0 / code_stat.clamp_min(NORM_EPS) if metric == "cosine" else 0.5 * code_stat


def _sorted_segments(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry ids sorted by code (stable) and the (K+1,) segment starts; no host synchronisation."""
    flat = indices.reshape(-1)
    sorted_codes, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_codes + 1, device=flat.device, dtype=sorted_codes.dtype)
    starts = torch.searchsorted(sorted_codes, bounds)
    return order, starts


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, str, bool, str], tuple[torch.Tensor, _Saved]]
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Stats = Callable[[torch.Tensor, int, "torch.Tensor | None", "torch.Tensor | None", bool], CodebookStats]


@dataclass(frozen=True)
class SoftAssignKernels:
    """Launchers of one fused backend (the launcher pattern of :mod:`pacofr.ops._launch`).

    ``forward(q (N, D), codebook (K, D), tau 0-d fp32, m, metric, straight_through, precision)
    -> (token (N, D) q's dtype, saved)``; ``backward(g_token, g_weights | None, q, codebook, tau,
    saved, metric, deterministic) -> (grad q, grad codebook, grad tau)``; ``stats(indices (N, m),
    K, weights | None, x | None, deterministic) -> CodebookStats`` with float64 counts.
    """

    name: str
    forward: Forward
    backward: Backward
    stats: Stats


class _FusedSoftAssignFunction(torch.autograd.Function):
    """Autograd around a fused forward/backward pair; the top-m set is a constant of the backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, codebook: torch.Tensor, tau: torch.Tensor, m: int, metric: str,  # noqa: D102
                straight_through: bool, deterministic: bool, precision: str,
                kernels: SoftAssignKernels) -> tuple[torch.Tensor, ...]:
        token, saved = kernels.forward(q, codebook, tau, m, metric, straight_through, precision)
        if straight_through:
            token = hard_token(token, saved.weights)
        ctx.save_for_backward(q, codebook, tau, *saved)
        ctx.metric, ctx.deterministic, ctx.kernels = metric, deterministic, kernels
        ctx.mark_non_differentiable(saved.indices)
        return token, saved.indices, saved.weights

    @staticmethod
    def backward(ctx, g_token: torch.Tensor | None, g_indices: None,  # noqa: D102
                 g_weights: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, codebook, tau, *rest = ctx.saved_tensors
        saved = _Saved(*rest)
        if g_token is None:
            g_token = torch.zeros_like(q)
        grad_q, grad_cb, grad_tau = ctx.kernels.backward(g_token, g_weights, q, codebook, tau, saved,
                                                         ctx.metric, ctx.deterministic)
        return grad_q, grad_cb, grad_tau.to(tau.dtype), None, None, None, None, None, None


def _register_backend(kernels: SoftAssignKernels) -> None:
    """Register ``soft_assign`` and ``codebook_stats`` of one fused backend."""

    def fused_soft_assign(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float | torch.Tensor, metric: str,
                          straight_through: bool, deterministic: bool, precision: str) -> SoftAssignment:
        tau_t = tau.float() if isinstance(tau, torch.Tensor) else torch.full((), tau, dtype=torch.float32,
                                                                             device=q.device)
        token, indices, weights = _FusedSoftAssignFunction.apply(q, codebook, tau_t, m, metric, straight_through,
                                                                deterministic, precision, kernels)
        return SoftAssignment(token, indices, weights)

    register("soft_assign", kernels.name)(fused_soft_assign)
    register("codebook_stats", kernels.name)(kernels.stats)


# ---- triton ---------------------------------------------------------------------------------
# Tiles: the forward's ranking loop takes pacofr.ops._tiles.ranking_tiles; its epilogue and the
# backward gather (BLOCK_N, M_PAD, BLOCK_D) tiles of about *_GATHER_ELEMENTS values, the size
# that keeps them in registers with 8 warps on sm_80 and sm_90 (benchmarks.static).

FWD_GATHER_ELEMENTS = 4096
BWD_GATHER_ELEMENTS = 2048
FUSED_NUM_WARPS = 8
STATS_ELEMENTS_PER_PROGRAM = 4096
"""Bound on BLOCK_N * M_PAD * BLOCK_D in the atomic statistics kernel (8192 spilled on sm_90 at M = 4)."""


def _triton_forward(q: torch.Tensor, codebook: torch.Tensor, tau: torch.Tensor, m: int, metric: str,
                    straight_through: bool, precision: str) -> tuple[torch.Tensor, _Saved]:
    from pacofr.kernels import soft_assign as kernels

    n, dim = q.shape
    device = q.device
    token = new_output((n, dim), q.dtype, device)
    indices = new_output((n, m), torch.int64, device)
    weights = new_output((n, m), torch.float32, device)
    raw = new_output((n, m), torch.float32, device)
    q_norm = new_output((n,), torch.float32, device)
    code_stat = _code_stat(squared_row_norms_triton(codebook), metric)
    saved = _Saved(indices, weights, raw, q_norm, code_stat)
    if n == 0:
        return token, saved
    m_pad = next_power_of_two(m)
    on_interpreter = interpreting(device)
    input_precision, cast_bf16 = kernel_precision(precision, q.dtype)
    tiles = ranking_tiles(q.dtype, input_precision, cast_bf16, m_pad, dim, on_interpreter)
    kernels.soft_assign_fwd_kernel[(cdiv(n, tiles.block_n),)](
        q, codebook, code_stat, _rank_term(code_stat, metric), tau, token, indices, weights, raw, q_norm,
        n, codebook.shape[0], dim, q.stride(0), q.stride(1), codebook.stride(0), codebook.stride(1), NORM_EPS,
        M=m, M_PAD=m_pad, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_D=tiles.block_d,
        BLOCK_DE=gather_block_d(FWD_GATHER_ELEMENTS, tiles.block_n, m_pad, dim, high=32),
        COSINE=metric == "cosine",
        HARD=straight_through, INPUT_PRECISION=input_precision, CAST_BF16=cast_bf16, RESIDENT=tiles.resident,
        # the interpreter's tl.dot is wrong on bf16 tiles: give it exact fp32 copies of the values
        UPCAST=on_interpreter and (q.dtype == torch.bfloat16 or cast_bf16),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=tiles.max_registers)
    return token, saved


def _triton_backward(g_token: torch.Tensor, g_weights: torch.Tensor | None, q: torch.Tensor,
                     codebook: torch.Tensor, tau: torch.Tensor, saved: _Saved, metric: str,
                     deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pacofr.kernels import soft_assign as kernels

    n, dim = q.shape
    num_codes = codebook.shape[0]
    m = saved.indices.shape[1]
    device = q.device
    grad_q = new_output((n, dim), q.dtype, device)
    tau_parts = new_output((n,), torch.float32, device)
    if deterministic:
        grad_cb = new_output((num_codes, dim), codebook.dtype, device)
        grad_acc = grad_cb  # unused by the kernel when not ATOMIC
        coef = new_output((n, m), torch.float32, device)
    else:
        grad_acc = torch.zeros(num_codes, dim, dtype=torch.float32, device=device)
        coef = tau_parts  # unused by the kernel when ATOMIC
    m_pad = next_power_of_two(m)
    block_n = 32 if m_pad <= 8 else 16
    if n > 0:
        g_w = None if g_weights is None else g_weights.float().contiguous()
        kernels.soft_assign_bwd_kernel[(cdiv(n, block_n),)](
            g_token, g_w if g_w is not None else saved.weights, q, codebook, saved.code_stat, tau,
            saved.indices, saved.weights, saved.raw, saved.q_norm,
            grad_q, grad_acc, coef, tau_parts, n, dim,
            g_token.stride(0), g_token.stride(1), q.stride(0), q.stride(1),
            codebook.stride(0), codebook.stride(1), NORM_EPS,
            M=m, M_PAD=m_pad, BLOCK_N=block_n, BLOCK_D=gather_block_d(BWD_GATHER_ELEMENTS, block_n, m_pad, dim),
            COSINE=metric == "cosine", HAS_GW=g_w is not None, ATOMIC=not deterministic,
            num_warps=FUSED_NUM_WARPS, maxnreg=register_ceiling(FUSED_NUM_WARPS))
    if deterministic:
        order, starts = _sorted_segments(saved.indices, num_codes)
        block_d = max(16, min(64, next_power_of_two(dim)))
        kernels.codebook_grad_segment_kernel[(num_codes, cdiv(dim, block_d))](
            order, starts, g_token, q, codebook, saved.code_stat, saved.q_norm,
            saved.weights, saved.raw, coef, grad_cb, dim,
            g_token.stride(0), g_token.stride(1), q.stride(0), q.stride(1),
            codebook.stride(0), codebook.stride(1), NORM_EPS,
            M=m, BLOCK_P=32, BLOCK_D=block_d, COSINE=metric == "cosine", maxnreg=register_ceiling(4))
    else:
        grad_cb = grad_acc.to(codebook.dtype)
    grad_tau = -(tau_parts.sum() / tau) / tau
    return grad_q, grad_cb, grad_tau


def _triton_stats(indices: torch.Tensor, num_codes: int, weights: torch.Tensor | None, x: torch.Tensor | None,
                  deterministic: bool) -> CodebookStats:
    from pacofr.kernels import soft_assign as kernels

    idx2 = indices if indices.dim() == 2 else indices.unsqueeze(1)
    w2 = None if weights is None else (weights if weights.dim() == 2 else weights.unsqueeze(1))
    n, m = idx2.shape
    device = indices.device
    dim = 0 if x is None else x.shape[1]
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    if deterministic:
        counts = new_output((num_codes,), torch.float64, device)
        sums = None if x is None else new_output((num_codes, dim), torch.float32, device)
        order, starts = _sorted_segments(idx2, num_codes)
        # entry e = row * m + j of the segments: the weights must be row-major contiguous
        flat_w = None if w2 is None else w2.reshape(-1).contiguous()
        block_d = max(16, min(64, next_power_of_two(max(dim, 1))))
        kernels.codebook_stats_segment_kernel[(num_codes, max(1, cdiv(dim, block_d)))](
            order, starts, dummy if flat_w is None else flat_w, dummy if x is None else x,
            counts, dummy if sums is None else sums, dim,
            0 if x is None else x.stride(0), 0 if x is None else x.stride(1),
            M=m, BLOCK_P=32, BLOCK_D=block_d, HAS_W=flat_w is not None, HAS_X=x is not None)
        return CodebookStats(counts, sums)
    counts = torch.zeros(num_codes, dtype=torch.float64, device=device)
    sums = None if x is None else torch.zeros(num_codes, dim, dtype=torch.float32, device=device)
    if n == 0:
        return CodebookStats(counts, sums)
    m_pad = next_power_of_two(m)
    block_d = max(4, min(64, next_power_of_two(max(dim, 1))))
    block_n = max(1, min(128, STATS_ELEMENTS_PER_PROGRAM // (m_pad * block_d)))
    kernels.codebook_stats_atomic_kernel[(cdiv(n, block_n),)](
        idx2, dummy if w2 is None else w2, dummy if x is None else x, counts, dummy if sums is None else sums,
        n, dim, idx2.stride(0), idx2.stride(1),
        0 if w2 is None else w2.stride(0), 0 if w2 is None else w2.stride(1),
        0 if x is None else x.stride(0), 0 if x is None else x.stride(1),
        M=m, M_PAD=m_pad, BLOCK_N=block_n, BLOCK_D=block_d, HAS_W=w2 is not None, HAS_X=x is not None)
    return CodebookStats(counts, sums)


# ---- cuda (csrc/soft_assign.cu, torch.ops.pacofr_cuda; inputs made contiguous) -------------------

def _cuda_forward(q: torch.Tensor, codebook: torch.Tensor, tau: torch.Tensor, m: int, metric: str,
                  straight_through: bool, precision: str) -> tuple[torch.Tensor, _Saved]:
    input_precision = cuda_input_precision("soft_assign", precision, q.dtype)
    code_stat = _code_stat(squared_row_norms(codebook), metric)
    token, indices, weights, raw, q_norm = torch.ops.pacofr_cuda.soft_assign(
        q, codebook, code_stat, tau, m, metric == "cosine", straight_through, NORM_EPS, input_precision)
    return token, _Saved(indices, weights, raw, q_norm, code_stat)


def _cuda_backward(g_token: torch.Tensor, g_weights: torch.Tensor | None, q: torch.Tensor, codebook: torch.Tensor,
                   tau: torch.Tensor, saved: _Saved, metric: str,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_q, grad_cb, tau_parts = torch.ops.pacofr_cuda.soft_assign_backward(
        g_token.contiguous(), None if g_weights is None else g_weights.float().contiguous(), q.contiguous(),
        codebook.contiguous(), saved.code_stat, tau, saved.indices, saved.weights, saved.raw, saved.q_norm,
        metric == "cosine", deterministic, NORM_EPS)
    return grad_q, grad_cb, -(tau_parts.sum() / tau) / tau


def _cuda_stats(indices: torch.Tensor, num_codes: int, weights: torch.Tensor | None, x: torch.Tensor | None,
                deterministic: bool) -> CodebookStats:
    """The cuda op accumulates counts in fp32 (exact to 2^24 only; notes/ops-cuda-interface.md)."""
    idx2 = indices if indices.dim() == 2 else indices.unsqueeze(1)
    if idx2.dtype not in (torch.int32, torch.int64):
        idx2 = idx2.long()
    w2 = None if weights is None else weights.reshape(idx2.shape).float().contiguous()
    x2 = None if x is None else (x.float() if x.dtype == torch.float64 else x).contiguous()
    counts, sums = torch.ops.pacofr_cuda.codebook_stats(idx2.contiguous(), num_codes, w2, x2, deterministic)
    return CodebookStats(counts.double(), None if x is None else sums)


_register_backend(SoftAssignKernels("triton", _triton_forward, _triton_backward, _triton_stats))
_register_backend(SoftAssignKernels("cuda", _cuda_forward, _cuda_backward, _cuda_stats))


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def _fused_refusal(m: int) -> str | None:
    """Why the fused backends cannot take a call with ``m`` candidates per row (None: they can)."""
    if m > MAX_FUSED_M:
        return f"keeps at most {MAX_FUSED_M} candidates per row: m must be <= {MAX_FUSED_M}, got m={m}"
    return None


def soft_assign(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float | torch.Tensor, *,
                metric: str = "cosine", straight_through: bool = False, deterministic: bool | None = None,
                precision: str = "ieee", backend: str = "auto") -> SoftAssignment:
    """Soft-assign each query to its ``m`` best codes.

    Args:
        q: (..., D) queries, float32/float16/bfloat16; leading dimensions are flattened to N rows
            and restored on the outputs.
        codebook: (K, D) code table, same dtype and device as ``q``.
        m: number of candidates, 1 <= m <= K.
        tau: temperature: a positive number, or a 0-d floating tensor on q's device (learnable:
            it receives a gradient; its value is not checked, which would need a host sync).
        metric: ``"cosine"``: score = cos(q, e_k) / tau (q and the codebook rows are normalised
            internally in fp32, gradients flow through the normalisation); ``"l2"``: score =
            -||q - e_k||^2 / tau.
        straight_through: forward token = codebook[indices[..., 0]] (hard top-1; NaN for a query
            row containing NaN, as without it); its gradient is that of the soft token (the hard
            rows are treated as constants).
        deterministic: reduce codebook gradients by sorted segments instead of atomics (fused
            backends); None follows ``torch.are_deterministic_algorithms_enabled()``.
        precision: how the products of fp32 inputs are formed for the *ranking* (which m codes are
            chosen), as in :func:`pacofr.ops.nearest_token` (``"ieee"`` default, ``"tf32x3"``,
            ``"tf32"``, ``"bf16"``; :mod:`pacofr.ops.precision`). The weights, the token and the
            gradients are recomputed from the chosen rows in fp32 at every setting, so a reduced
            precision can only swap candidates whose scores are closer than its rounding error.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``SoftAssignment(token, indices, weights)``: token (..., D) in q's dtype = sum_j
        weights_j * codebook[indices_j] (raw rows); indices (..., m) int64, best first, ties to the
        smaller index; weights (..., m) float32 = softmax over the m chosen scores.

    Semantics (identical on every backend):

    * Arithmetic: ranking scores in fp32 as ``precision`` says; the chosen scores, weights, token
      and gradients recomputed from the chosen rows in fp32 (cosine: ``q . e / (max(||q||, eps)
      max(||e||, eps))``, eps = ``NORM_EPS``; l2: ``-sum (q - e)^2``, no expansion).
    * Ties: equal ranking scores go to the smaller code index, in the set and in its order; code
      norms are summed in a fixed order (:mod:`pacofr.ops._norms`), so identical codes tie in
      every memory layout of the codebook (a ``.t()`` view included).
    * NaN: a NaN score ranks below every number (as ``-inf``); a query row containing NaN gets
      NaN weights and a NaN token (its indices are valid but unspecified).
    * Gradients: only the m chosen rows per query receive a codebook gradient; with
      ``deterministic`` the fused backends reduce it in a fixed order (bit-identical reruns),
      otherwise by fp32 atomics (order-dependent rounding).
    * Memory: the outputs, O(N * m) saved values for the backward, K code norms and, for the
      torch backend, blocks of at most ``_REFERENCE_SCORE_ELEMENTS`` scores; never the N x K
      score matrix nor a one-hot. Any strides are read in place (cuda: contiguous copies).
    * ``m > 16``: the fused kernels keep at most ``MAX_FUSED_M`` candidates; ``auto`` runs the
      torch backend, an explicit fused backend raises ``BackendUnavailableError``.
    * Empty input (no query rows): empty outputs of the shapes above, no kernel runs; K = 0 or
      D = 0 raise a ValueError naming the codebook.
    """
    q, codebook, m, tau = _check_soft_assign_args(q, codebook, m, tau, metric, straight_through)
    check_precision(precision)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    lead_shape = q.shape[:-1]
    flat = q.reshape(-1, q.shape[-1])
    _, fn = get_op("soft_assign").implementation(backend, [flat, codebook], fused_refusal=_fused_refusal(m))
    token, indices, weights = fn(flat, codebook, m, tau, metric, straight_through, bool(deterministic), precision)
    return SoftAssignment(token.reshape(*lead_shape, token.shape[-1]), indices.reshape(*lead_shape, m),
                          weights.reshape(*lead_shape, m))


def codebook_stats(indices: torch.Tensor, K: int, *, weights: torch.Tensor | None = None,  # noqa: N803
                   x: torch.Tensor | None = None, deterministic: bool | None = None,
                   counts_dtype: torch.dtype = torch.float32, backend: str = "auto") -> CodebookStats:
    """Per-code usage statistics of an assignment, by scatter (no one-hot matrix, no host sync on CUDA).

    Args:
        indices: (N, m) or (N,) integer code indices in [0, K) (checked: eagerly on CPU, by an
            asynchronous device assert on CUDA).
        K: number of codes.
        weights: float tensor shaped like ``indices``, or None (each entry counts 1). Zero weights
            exclude entries (e.g. masked tokens).
        x: (N, D) vectors, or None; row n is added to every code it is assigned to.
        deterministic: sorted-segment reduction instead of atomics (fused backends); None follows
            ``torch.are_deterministic_algorithms_enabled()``.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

        counts_dtype: dtype of the returned counts: ``torch.float32`` (default; the exact count
            correctly rounded to fp32) or ``torch.float64`` (exact: integer counts up to 2^53).

    Returns:
        ``CodebookStats(counts, sums)``: counts (K,) ``counts_dtype`` = sum of weights per code,
        accumulated in float64 on every backend (the cuda kernel still in fp32, exact to 2^24);
        sums (K, D) float32 = sum of weights * x per code, or None without ``x``. Raw (no EMA),
        not differentiable.

    Semantics: weights and x are read in their dtype and summed in fp64 (counts) / fp32 (sums); a
    NaN weight or x value makes its code's count / sum NaN; ``deterministic`` gives bit-identical
    results run to run, atomics an order-dependent rounding of the sums. Memory: the outputs and,
    with ``deterministic``, one sort of the N * m indices. Empty input (N = 0): zero counts and
    sums, no kernel runs.
    """
    indices, K, weights, x = _check_stats_args(indices, K, weights, x)  # noqa: N806
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if counts_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"counts_dtype must be torch.float32 or torch.float64, got {counts_dtype!r}")
    _, fn = get_op("codebook_stats").implementation(backend, [indices])
    counts, sums = fn(indices, K, weights, x, bool(deterministic))
    return CodebookStats(counts.to(counts_dtype), None if sums is None else sums.float())
