"""Nearest-token codebook lookup: the k nearest codebook rows of every query, without an N x K matrix.

Public op: :func:`nearest_token`. Backends: ``torch`` (the chunked reference below, any device),
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
from dataclasses import dataclass

import torch

from pacofr.ops._checks import (
    FLOAT_DTYPES,
    check_choice,
    check_int,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from pacofr.ops._dispatch import get_op, register

logger = logging.getLogger(__name__)

OP_NAME = "nearest_token"
METRICS: tuple[str, ...] = ("l2", "cosine")
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.int32)
MAX_K = 16
"""Largest ``k`` the fused kernels keep in registers (the reference has no limit but shares it)."""
AUTO_ORDER: tuple[str, ...] = ("triton", "cuda", "torch")


def nearest_token(x: torch.Tensor, codebook: torch.Tensor, k: int = 1, metric: str = "l2", *,
                  index_dtype: torch.dtype = torch.int64, allow_tf32: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codebook rows of every query row, nearest first.

    Args:
        x: queries ``(..., D)``, float32 / float16 / bfloat16, any strides (views, expanded).
        codebook: codes ``(K, D)``, same dtype and device as ``x``, ``K >= 1``.
        k: how many neighbours per query, ``1 <= k <= min(K, 16)``.
        metric: ``"l2"`` (squared Euclidean distance) or ``"cosine"`` (``1 - cosine similarity``).
        index_dtype: ``torch.int64`` (default) or ``torch.int32`` for the returned indices.
        allow_tf32: fp32 inputs only. False (default): the products ``x . e`` are exact fp32
            (IEEE fp32 multiply-add, fp32 accumulation). True: the triton backend rounds the fp32
            inputs to TF32 (10-bit mantissa) inside ``tl.dot``, so each score may be off by up to
            about ``1e-3 * sum_i |x_i e_i|`` (tested as ``1e-3 * (||x||^2 + max ||e||^2)`` on the
            distance): codes whose scores differ by less than that may swap, and reported
            distances carry the same absolute error. Ignored for fp16/bf16 inputs (always exact
            products of the given values with fp32 accumulation), by the cuda backend (exact fp32
            FMAs) and by the torch backend (torch's fp32 matmul setting, exact by default).
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
      ``-1``. Infinite inputs follow IEEE arithmetic through the score and then these rules.
    * Memory: the O(N * k) outputs, K fp32 code norms (computed through a transient fp32 copy of
      the codebook) and, for the torch backend, bounded chunks of at most
      ``REFERENCE_BUFFER_ELEMENTS`` scores; the N x K distance matrix is never materialised. The
      cuda backend copies non-contiguous inputs to contiguous ones; triton reads any strides.
    * ``N = 0`` (no queries) returns empty outputs of shape ``(..., k)`` without running a kernel.
    """
    problem = _validate(x, codebook, k, metric, index_dtype, allow_tf32)
    leading = tuple(x.shape[:-1])
    queries = x.reshape(-1, problem.dim)
    if queries.shape[0] == 0:
        return (torch.empty((*leading, k), dtype=torch.float32, device=x.device),
                torch.empty((*leading, k), dtype=index_dtype, device=x.device))
    name, impl = get_op(OP_NAME).implementation(backend, [queries, codebook])
    logger.debug("nearest_token: backend %s, N=%d K=%d D=%d k=%d metric=%s", name, queries.shape[0],
                 problem.codes, problem.dim, k, metric)
    distances, indices = impl(queries, codebook, k, metric, index_dtype, allow_tf32)
    return distances.reshape(*leading, k), indices.reshape(*leading, k)


@dataclass(frozen=True)
class _Problem:
    """Sizes of a validated call."""

    codes: int
    dim: int


def _validate(x: object, codebook: object, k: object, metric: object, index_dtype: object,
              allow_tf32: object) -> _Problem:
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
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    return _Problem(codes=codes, dim=dim)


# --------------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------------

REFERENCE_BUFFER_ELEMENTS = 1 << 22
"""Scores the reference holds at once per (row chunk, code chunk) block (16 MiB of fp32)."""


def new_outputs(n: int, k: int, index_dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ``(n, k)`` distance (float32) and index outputs; every backend fills all of them.

    One function so the tests can substitute poisoned outputs and catch unwritten elements.
    """
    return (torch.empty((n, k), dtype=torch.float32, device=device),
            torch.empty((n, k), dtype=index_dtype, device=device))


def code_terms(codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-code fp32 term of the score, ``(K,)``: ``0.5 * ||e||^2`` (l2) or ``1 / ||e||`` (cosine, 0 for a zero row)."""
    squared = codebook.float().square().sum(dim=1)
    if metric == "l2":
        return 0.5 * squared
    return _inverse_norm(squared)


def _inverse_norm(squared_norm: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(s)`` where ``s > 0``, else 0 (zero rows stay zero; NaN maps to 0 too)."""
    safe = torch.where(squared_norm > 0, squared_norm, torch.ones_like(squared_norm))
    return torch.where(squared_norm > 0, 1.0 / torch.sqrt(safe), torch.zeros_like(squared_norm))


def finish_distances(best_scores: torch.Tensor, best_indices: torch.Tensor, squared_x_norm: torch.Tensor,
                     metric: str, index_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the k best fp32 scores ``(n, k)`` into reported distances and apply the NaN rule."""
    if metric == "l2":
        distances = squared_x_norm[:, None] + 2.0 * best_scores
        distances = torch.where(distances < 0, torch.zeros_like(distances), distances)
    else:
        distances = 1.0 + best_scores * _inverse_norm(squared_x_norm)[:, None]
    indices = torch.where(torch.isnan(distances), torch.full_like(best_indices, -1), best_indices)
    return distances, indices.to(index_dtype)


def nearest_token_reference(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2",
                            index_dtype: torch.dtype = torch.int64, *,
                            buffer_elements: int = REFERENCE_BUFFER_ELEMENTS,
                            codes_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch nearest_token on 2-D ``x`` ``(N, D)``: fp32 scores in bounded chunks.

    Rows are processed ``buffer_elements // codes_per_chunk`` at a time and codes
    ``codes_per_chunk`` at a time; a stable sort of (running best, new chunk) keeps equal scores
    in index order, so the smallest index wins and NaN (sorted last) loses. No argument checks:
    call :func:`nearest_token` for those.
    """
    n, codes = x.shape[0], codebook.shape[0]
    codes_per_chunk = max(1, min(codes_per_chunk, codes))
    rows_per_chunk = max(1, buffer_elements // codes_per_chunk)
    codebook32 = codebook.float()
    terms = code_terms(codebook, metric)
    distances, indices = new_outputs(n, k, index_dtype, x.device)
    for r0 in range(0, n, rows_per_chunk):
        rows = x[r0:r0 + rows_per_chunk].float()
        best_scores = rows.new_empty((rows.shape[0], 0))
        best_indices = torch.empty((rows.shape[0], 0), dtype=torch.int64, device=x.device)
        for c0 in range(0, codes, codes_per_chunk):
            chunk = codebook32[c0:c0 + codes_per_chunk]
            dots = rows @ chunk.T
            scores = terms[c0:c0 + chunk.shape[0]] - dots if metric == "l2" else -dots * terms[c0:c0 + chunk.shape[0]]
            chunk_indices = torch.arange(c0, c0 + chunk.shape[0], device=x.device).expand(rows.shape[0], -1)
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_indices = torch.cat([best_indices, chunk_indices], dim=1)
            order = torch.sort(merged_scores, dim=1, stable=True).indices[:, :k]
            best_scores = merged_scores.gather(1, order)
            best_indices = merged_indices.gather(1, order)
        d, i = finish_distances(best_scores, best_indices, rows.square().sum(dim=1), metric, index_dtype)
        distances[r0:r0 + rows.shape[0]] = d
        indices[r0:r0 + rows.shape[0]] = i
    return distances, indices


@register(OP_NAME, "torch", auto_order=AUTO_ORDER)
def _nearest_token_torch(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                         index_dtype: torch.dtype, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    del allow_tf32  # the reference follows torch's fp32 matmul setting (exact unless enabled globally)
    return nearest_token_reference(x, codebook, k, metric, index_dtype)


# --------------------------------------------------------------------------------------------
# triton backend
# --------------------------------------------------------------------------------------------

MAX_CODES = 2**31 - 1
"""The fused kernels pack the code index into 32 bits."""


@dataclass(frozen=True)
class TritonTiles:
    """Tile sizes and launch settings of the Triton kernel (untuned first choice; see benchmarks/)."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


def triton_tiles(dtype: torch.dtype, kp: int, interpreting: bool) -> TritonTiles:
    """Tiles for one call: big numpy-friendly tiles under the interpreter, GPU-shaped ones otherwise."""
    if interpreting:
        return TritonTiles(block_n=64, block_k=64, block_d=32, num_warps=4, num_stages=1)
    block_d = 32 if dtype == torch.float32 else 64
    block_n = 128 if kp <= 4 else 64
    return TritonTiles(block_n=block_n, block_k=64, block_d=block_d, num_warps=8, num_stages=3)


def _check_code_count(codes: int) -> None:
    if codes > MAX_CODES:
        raise ValueError(f"codebook has {codes} rows; the fused kernels support at most {MAX_CODES}")


@register(OP_NAME, "triton", auto_order=AUTO_ORDER)
def _nearest_token_triton(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                          index_dtype: torch.dtype, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from pacofr import _triton
    from pacofr.kernels import nearest_token as kernels

    n, dim = x.shape
    codes = codebook.shape[0]
    _check_code_count(codes)
    kp = kernels.next_power_of_two(k)
    interpreting = x.device.type == "cpu" and _triton.interpreter_enabled()
    tiles = triton_tiles(x.dtype, kp, interpreting)
    terms = code_terms(codebook, metric)
    distances, indices = new_outputs(n, k, index_dtype, x.device)
    grid = ((n + tiles.block_n - 1) // tiles.block_n,)
    kernels.nearest_token_kernel[grid](
        x, codebook, terms, distances, indices,
        n, codes, dim,
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1),
        K_OUT=k, KP=kp, COSINE=metric == "cosine",
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, BLOCK_D=tiles.block_d,
        INPUT_PRECISION="tf32" if allow_tf32 and x.dtype == torch.float32 else "ieee",
        # the interpreter's tl.dot is wrong on bf16 tiles: give it exact fp32 copies of the values
        UPCAST_FOR_DOT=interpreting and x.dtype == torch.bfloat16,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return distances, indices


# --------------------------------------------------------------------------------------------
# cuda backend
# --------------------------------------------------------------------------------------------

@register(OP_NAME, "cuda", auto_order=AUTO_ORDER)
def _nearest_token_cuda(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                        index_dtype: torch.dtype, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``csrc/nearest_token.cu``: fp16/bf16 on 16-bit tensor-core MMAs, fp32 by the precision given.

    The kernel takes ``input_precision`` ``"ieee"`` (exact fp32 FMAs), ``"tf32"`` or ``"tf32x3"``;
    until the public op passes one, fp32 stays exact (``allow_tf32`` is documented as ignored here).
    """
    del allow_tf32
    _check_code_count(codebook.shape[0])
    terms = code_terms(codebook, metric)
    distances, indices = new_outputs(x.shape[0], k, index_dtype, x.device)
    torch.ops.pacofr_cuda.nearest_token(x, codebook, terms, metric == "cosine", "ieee", distances, indices)
    return distances, indices
