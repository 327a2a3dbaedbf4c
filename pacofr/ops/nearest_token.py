"""Nearest-token codebook lookup: the k nearest codebook rows of every query, without an N x K matrix.

Public op: :func:`nearest_token`. Backends: ``torch`` (the blocked, sort-free reference below, any device),
``triton`` (:mod:`pacofr.kernels.nearest_token`; tile sizes not tuned on a GPU yet) and ``cuda``
(``csrc/nearest_token.cu`` on the tensor-core ranking of ``csrc/code_ranking.h``: fp16/bf16 MMAs,
exact fp32 on FMAs; compile-checked only so far, not yet run on a GPU).

Every backend ranks codes by the same fp32 *score* and breaks ties the same way:

* ``metric="l2"``: ``score = 0.5 * ||e||^2 - x . e``; reported distance
  ``max(||x||^2 + 2 * score, 0)`` (= ``||x - e||^2``).
* ``metric="cosine"``: ``score = -(x . e) / ||e||``; reported distance ``1 + score / ||x||``
  (= ``1 - cos(x, e)``).

The row constant (``||x||^2`` or ``1/||x||``) is applied only to the reported distance, never
before the comparison, and the clamp at 0 only to the reported value, so near-ties keep the full
resolution of the score (design notes, section 6, pitfalls 4-5). Candidates are ordered by the
pair (score, index): equal scores go to the smaller index whatever the tiling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pacofr.ops.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pacofr.ops._dispatch import get_op, register
from pacofr.ops._launch import cdiv, interpreting, new_output, next_power_of_two
from pacofr.ops._norms import squared_row_norms, squared_row_norms_triton
from pacofr.ops._selection import smallest_k
from pacofr.ops._tiles import ranking_tiles
from pacofr.ops.precision import (
    check_precision,
    cuda_input_precision,
    full_precision,
    kernel_precision,
    round_operands,
)

logger = logging.getLogger(__name__)

OP_NAME = "nearest_token"
METRICS: tuple[str, ...] = ("l2", "cosine")
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)
MAX_K = 16
"""Largest ``k`` the fused kernels keep in registers (the reference has no limit but shares it)."""


def nearest_token(x: torch.Tensor, codebook: torch.Tensor, k: int = 1, metric: str = "l2", *,
                  index_dtype: torch.dtype = torch.int64, precision: str = "ieee",
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codebook rows of every query row, nearest first.

    Args:
        x: queries ``(..., D)``, float32 / float16 / bfloat16, any strides (views, expanded).
        codebook: codes ``(K, D)``, same dtype and device as ``x``, ``K >= 1``.
        k: how many neighbours per query, ``1 <= k <= min(K, 16)``.
        metric: ``"l2"`` (squared Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``).
        index_dtype: ``torch.int64`` (default) or ``torch.int32`` for the returned indices.
        precision: how the products ``x . e`` of fp32 inputs are formed (:mod:`pacofr.ops.precision`):
            ``"ieee"`` (default) exact fp32; ``"tf32x3"`` fp32-accurate on TF32 tensor cores;
            ``"tf32"`` / ``"bf16"`` the operands rounded to TF32 (10 mantissa bits) / bfloat16 (7)
            with exact products and fp32 accumulation, so each score may be off by up to about
            ``2^-10`` / ``2^-7`` of ``sum_i |x_i e_i|``: codes whose scores differ by less may swap,
            and reported distances carry the same absolute error. Every backend applies the same
            rounding (the torch backend rounds the operands itself); the cuda backend has no
            ``"bf16"`` path for fp32 inputs (``auto`` takes triton). Ignored for fp16/bf16 inputs
            (always exact products of the given values with fp32 accumulation).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`pacofr.ops._dispatch`).

    Returns:
        ``(distances, indices)``, both of shape ``(..., k)``: distances float32, indices
        ``index_dtype``, sorted by increasing distance.

    Semantics (identical on every backend):

    * All arithmetic is fp32 on the given values (fp16/bf16 inputs are upcast exactly).
    * L2 distances are ``||x||^2 - 2 x.e + ||e||^2`` clamped at 0. Their absolute error is about
      ``1e-7 * (||x||^2 + ||e||^2)``, so a distance much smaller than that (a query sitting on a
      code) is not accurate relative to itself; compute ``(x - codebook[idx]).square().sum(-1)``
      when small distances must be exact.
    * Cosine: norms are computed in fp32; a row (query or code) whose fp32 norm is 0 is treated as
      the zero vector (as :func:`torch.nn.functional.normalize` does): its cosine similarity with
      everything is 0 and its distance 1.
    * Ties: equal scores are ordered by increasing index (the smallest index wins), for every k.
    * NaN: a NaN score ranks after every number (``+inf`` included), so a codebook row containing
      NaN is returned only when fewer than k other codes exist. Every returned slot whose distance
      is NaN gets index ``-1``: a query row containing NaN returns ``k`` NaN distances and indices
      ``-1``.
    * Finite range: a row (query or code) is in range when its fp32 squared norm is at most
      ``MAX_SQUARED_NORM`` = 2^124 (about 2.1e37, so entries up to about 4.6e18 / sqrt(D)); then
      no score or distance can overflow. A query row out of range (an infinite entry, or values
      whose squares overflow) returns ``k`` NaN distances and indices ``-1``, as a NaN row does; a
      code out of range is treated as a NaN code (every score NaN: never returned while k other
      codes exist). The range is decided once, in fp32, for every backend alike.
    * Layout: results do not depend on the inputs' strides (transposed, sliced, expanded views):
      code norms are summed in a fixed order (:mod:`pacofr.ops._norms`), so identical codes keep
      equal scores and the tie rule holds for a column-major codebook too.
    * Memory: the O(N * k) outputs, K fp32 code norms and terms (triton: one kernel pass over the
      codebook; torch and cuda: through transient fp32 copies of bounded chunks) and, for the
      torch backend, bounded chunks of at most ``REFERENCE_BUFFER_ELEMENTS`` scores; the N x K
      distance matrix is never materialised. The triton kernel computes the query norms itself;
      the cuda backend copies non-contiguous inputs to contiguous ones; triton reads any strides.
    * ``N = 0`` (no queries) returns empty outputs of shape ``(..., k)`` without running a kernel.
    """
    problem = _validate(x, codebook, k, metric, index_dtype, precision)
    leading = tuple(x.shape[:-1])
    queries = x.reshape(-1, problem.dim)
    if queries.shape[0] == 0:
        return (torch.empty((*leading, k), dtype=torch.float32, device=x.device),
                torch.empty((*leading, k), dtype=index_dtype, device=x.device))
    name, impl = get_op(OP_NAME).implementation(backend, [queries, codebook])
    logger.debug("nearest_token: backend %s, N=%d K=%d D=%d k=%d metric=%s", name, queries.shape[0],
                 problem.codes, problem.dim, k, metric)
    distances, indices = impl(queries, codebook, k, metric, index_dtype, precision)
    return distances.reshape(*leading, k), indices.reshape(*leading, k)


@dataclass(frozen=True)
class _Problem:
    """Sizes of a validated call."""

    codes: int
    dim: int


def _validate(x: object, codebook: object, k: object, metric: object, index_dtype: object,
              precision: object) -> _Problem:
    queries = check_tensor("x", x, dtypes=FLOAT_DTYPES)
    codes_tensor = check_tensor("codebook", codebook, ndim=2, dtypes=FLOAT_DTYPES)
    if queries.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension (..., D), got shape {tuple(queries.shape)}")
    check_same_dtype(x=queries, codebook=codes_tensor)
    check_same_device(x=queries, codebook=codes_tensor)
    codes, dim = codes_tensor.shape
    if dim == 0:
        raise ValueError(f"codebook must have D >= 1 columns, got shape {tuple(codes_tensor.shape)}")
    if queries.shape[-1] != dim:
        raise ValueError(f"x has last dimension D={queries.shape[-1]} but codebook has D={dim} "
                         f"(shapes {tuple(queries.shape)} and {tuple(codes_tensor.shape)}); they must match")
    if codes == 0:
        raise ValueError(f"codebook must have at least one row (K >= 1), got shape {tuple(codes_tensor.shape)}")
    check_int("k", k, low=1, high=min(codes, MAX_K))
    check_choice("metric", metric, METRICS)
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int64 or torch.int32, got {index_dtype!r}")
    check_precision(precision)
    return _Problem(codes=codes, dim=dim)


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------

REFERENCE_BUFFER_ELEMENTS = 1 << 22
"""Most scores the torch backend holds at once in one (rows, codes) block (16 MiB of fp32); its
blocks are smaller where the codebook allows (cache-sized, see :mod:`pacofr.ops._selection`)."""


MAX_SQUARED_NORM = 2.0**124
"""Largest fp32 squared norm of an in-range query or code row (:func:`nearest_token`, "Finite
range"): with both below it, ``|score| <= 2^125`` and distances ``<= 2^126`` stay finite."""


def in_range(squared_norm: torch.Tensor) -> torch.Tensor:
    """Whether rows of these fp32 squared norms are in the finite range (False for NaN and inf)."""
    return squared_norm <= MAX_SQUARED_NORM


def code_terms(codebook: torch.Tensor, metric: str, squared: torch.Tensor | None = None) -> torch.Tensor:
    """Per-code fp32 term of the score, ``(K,)``: ``0.5 * ||e||^2`` (l2) or ``1 / ||e||`` (cosine,
    0 for a zero row); NaN for a code out of the finite range, which makes its every score NaN on
    every backend (they all take their code terms from here).

    ``squared``: the codes' fp32 squared norms when the caller has them (the triton backend computes
    them in one kernel pass); by default :func:`pacofr.ops._norms.squared_row_norms`. Either way
    they do not depend on the codebook's memory layout, so identical codes keep equal scores.
    """
    if squared is None:
        squared = squared_row_norms(codebook)
    term = 0.5 * squared if metric == "l2" else _inverse_norm(squared)
    return torch.where(in_range(squared), term, math.nan)


def _inverse_norm(squared_norm: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(s)`` where ``s > 0``, else 0 (zero rows stay zero; NaN maps to 0 too)."""
    safe = torch.where(squared_norm > 0, squared_norm, torch.ones_like(squared_norm))
    return torch.where(squared_norm > 0, 1.0 / torch.sqrt(safe), torch.zeros_like(squared_norm))


def finish_distances(best_scores: torch.Tensor, best_indices: torch.Tensor, squared_x_norm: torch.Tensor,
                     metric: str, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the k best fp32 scores ``(n, k)`` into reported distances and apply the NaN and range rules:
    a NaN distance, or a query out of the finite range (``squared_x_norm``), gives NaN and index -1."""
    if metric == "l2":
        distances = squared_x_norm[:, None] + 2.0 * best_scores
        distances = torch.where(distances < 0, torch.zeros_like(distances), distances)
    else:
        distances = 1.0 + best_scores * _inverse_norm(squared_x_norm)[:, None]
    distances = torch.where(in_range(squared_x_norm)[:, None], distances, math.nan)
    indices = torch.where(torch.isnan(distances), torch.full_like(best_indices, -1), best_indices)
    return distances, indices.to(index_dtype)


def nearest_token_reference(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2",
                            index_dtype: torch.dtype = torch.int64, precision: str = "ieee", *,
                            buffer_elements: int = REFERENCE_BUFFER_ELEMENTS,
                            codes_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch nearest_token on 2-D ``x`` ``(N, D)``: fp32 scores in bounded blocks, no sorting.

    Scores come one cache-sized block (rows x codes, at most ``buffer_elements``) at a time from
    one GEMM each (``addmm`` folds in the l2 code term); :func:`pacofr.ops._selection.smallest_k`
    keeps the k smallest by (score, index) without sorting the block, so the smallest index wins
    and NaN (ranked after ``+inf``) loses. The GEMM's operands are rounded as ``precision`` says
    (:func:`pacofr.ops.precision.round_operands`); code terms and ``||x||^2`` come from the given
    values. ``codes_per_chunk`` overrides the block width (tests). No argument checks: call
    :func:`nearest_token` for those.
    """
    codes_t = round_operands(codebook.float(), precision).t().contiguous()  # (D, K): a transposed view halves the GEMM rate
    terms = code_terms(codebook, metric)
    if metric == "l2":
        def score_block(rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
            return torch.addmm(terms[c0:c1], rows, codes_t[:, c0:c1], alpha=-1.0)
    else:
        negative_terms = -terms

        def score_block(rows: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
            return torch.mm(rows, codes_t[:, c0:c1]).mul_(negative_terms[c0:c1])

    def as_operands(rows: torch.Tensor) -> torch.Tensor:
        return round_operands(rows.float(), precision)

    best_scores, best_indices = smallest_k(x, codebook.shape[0], k, as_operands, score_block,
                                           score_dtype=torch.float32, nan_as_inf=False,
                                           buffer_elements=buffer_elements, codes_per_block=codes_per_chunk)
    distances, indices = _outputs(x.shape[0], k, index_dtype, x.device)
    distances[:], indices[:] = finish_distances(best_scores, best_indices, squared_row_norms(x, buffer_elements),
                                                metric, index_dtype)
    return distances, indices


def _outputs(n: int, k: int, index_dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, k)`` distance (float32) and index outputs, every element of which a backend writes."""
    return new_output((n, k), torch.float32, device), new_output((n, k), index_dtype, device)


@register(OP_NAME, "torch")
def _nearest_token_torch(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                         index_dtype: torch.dtype, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    with full_precision(x.device):  # under autocast torch.mm would round to bf16 behind precision's back
        return nearest_token_reference(x, codebook, k, metric, index_dtype, precision)


# --------------------------------------------------------------------------------------------
# fused backends
# --------------------------------------------------------------------------------------------

MAX_CODES = 2**31 - 1
"""The fused kernels pack the code index into 32 bits."""

Search = Callable[[torch.Tensor, torch.Tensor, int, str, torch.dtype, str], tuple[torch.Tensor, torch.Tensor]]
"""``(x (N, D), codebook (K, D), k, metric, index_dtype, precision) -> (distances, indices)`` ``(N, k)``."""


@dataclass(frozen=True)
class NearestTokenKernels:
    """Launchers of one fused backend of :func:`nearest_token` (the launcher pattern of :mod:`pacofr.ops._launch`)."""

    name: str
    search: Search  #: the whole op on 2-D queries, the NaN and range rules applied


def _register_backend(kernels: NearestTokenKernels) -> None:
    def search(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, index_dtype: torch.dtype,
               precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        if codebook.shape[0] > MAX_CODES:
            raise ValueError(f"codebook has {codebook.shape[0]} rows; the fused kernels support at most {MAX_CODES}")
        return kernels.search(x, codebook, k, metric, index_dtype, precision)

    register(OP_NAME, kernels.name)(search)


def _triton_search(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, index_dtype: torch.dtype,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:mod:`pacofr.kernels.nearest_token`: code norms in one kernel pass, then the ranking kernel, which
    also computes the query norms and applies the NaN and range rules (no pass over ``x`` in torch)."""
    from pacofr.kernels import nearest_token as kernels

    n, dim = x.shape
    kp = next_power_of_two(k)
    on_interpreter = interpreting(x.device)
    input_precision, cast_bf16 = kernel_precision(precision, x.dtype)
    tiles = ranking_tiles(x.dtype, input_precision, cast_bf16, kp, dim, on_interpreter)
    terms = code_terms(codebook, metric, squared_row_norms_triton(codebook))
    distances, indices = _outputs(n, k, index_dtype, x.device)
    kernels.nearest_token_kernel[(cdiv(n, tiles.block_n),)](
        x, codebook, terms, distances, indices,
        n, codebook.shape[0], dim,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), MAX_SQUARED_NORM,
        K_OUT=k, KP=kp, COSINE=metric == "cosine",
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_D=tiles.block_d,
        INPUT_PRECISION=input_precision, CAST_BF16=cast_bf16, RESIDENT=tiles.resident,
        # the interpreter's tl.dot is wrong on bf16 tiles: give it exact fp32 copies of the values
        UPCAST=on_interpreter and (x.dtype == torch.bfloat16 or cast_bf16),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, maxnreg=tiles.max_registers,
    )
    return distances, indices


def _cuda_search(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str, index_dtype: torch.dtype,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``csrc/nearest_token.cu``: fp16/bf16 on 16-bit tensor-core MMAs, fp32 by the precision given
    (``"ieee"`` exact fp32 FMAs, ``"tf32"``, ``"tf32x3"``; no ``"bf16"`` path for fp32 inputs).

    The op takes the code terms (layout-independent, :func:`code_terms`) and applies the query range
    rule itself, from the row norms it computes (NaN distances and index -1 past it).
    """
    input_precision = cuda_input_precision(OP_NAME, precision, x.dtype)
    distances, indices = _outputs(x.shape[0], k, index_dtype, x.device)
    torch.ops.pacofr_cuda.nearest_token(x, codebook, code_terms(codebook, metric), metric == "cosine",
                                        input_precision, distances, indices)
    return distances, indices


_register_backend(NearestTokenKernels("triton", _triton_search))
_register_backend(NearestTokenKernels("cuda", _cuda_search))
