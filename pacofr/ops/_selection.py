"""The k smallest scores of every row, block by block and without sorting: the torch backends' core.

The torch backends of :func:`pacofr.ops.nearest_token` and :func:`pacofr.ops.soft_assign` score
queries against codes one block (rows x codes) at a time, never the whole N x K matrix, and keep
the k smallest scores per row in (score, index) order: among equal scores the smaller code index
ranks first. Per block, without sorting it:

* k = 1: the minimum of every run of :data:`ALIGN` consecutive codes (one vectorised reduction),
  then ``torch.min`` over those minima and over the winning run; ``torch.min`` returns the first
  minimal index, so the first run holding the row's minimum and its first code holding it give
  the smallest index.
* k > 1: the block's ``c`` codes are split into ``W = c / G`` interleaved groups
  ``{j, j + W, j + 2W, ...}`` of ``G`` codes (G from :func:`group_size`) and the minimum of every
  group is taken (a vectorised reduction over contiguous slabs of W codes). ``topk`` finds the k
  smallest group minima; when the k-th is strictly below the next one, the row's k smallest
  scores all lie in the k chosen groups (each holds a score no larger than the k-th minimum, and
  every score outside them is at least the next minimum). ``topk`` of those ``k * G`` candidates
  then gives the answer when it has no tie: no two equal values among the k best, none equal to
  the k-th outside them (seen as the (k+1)-th value of ``topk(k + 1)``, or as the minimum of the
  others where torch's heap-based ``topk(k)`` is the cheaper call). Narrow blocks (few codes, or the last ``< ALIGN``
  codes of the codebook) run that last step on the whole row.

A row with such a tie is repaired exactly by a stable sort, over its candidates (put in index
order) for a tie among them, over its whole block for a tie among the group minima or a NaN
anywhere in the row. Rows without ties or NaN never sort. (Deciding whether a block needs a repair
reads one flag per block on the host: on CUDA tensors that is a synchronisation per block.)

NaN policy (``nan_as_inf``): False ranks NaN after every number, ``+inf`` included (which NaN codes
fill the last slots is then arbitrary; callers report such slots as NaN); True ranks NaN as
``+inf`` (equal to it, so the smaller index wins) and returns ``+inf`` for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ALIGN = 64
"""Block widths are multiples of this (but a final block of the last ``< ALIGN`` codes); also the
run length of the k = 1 path and the largest group of the k > 1 path."""
CACHE_ELEMENTS = 1 << 20
"""Scores per block when the rows allow it (4 MiB of fp32: in the last-level cache, and few enough
blocks that the fixed cost of the dozen small torch ops per block stays small)."""
MAX_CODES_PER_BLOCK = 8192
"""Widest block; wider codebooks are scanned in several blocks whose winners are merged."""
TOPK_HEAP_RATIO = 64
"""torch's CPU ``topk`` of k out of n uses a heap when ``k * 64 <= n`` and ``nth_element``
otherwise, which costs about 3x more per value (torch 2.14, measured): :func:`group_size` models it."""

ScoreBlock = Callable[[torch.Tensor, int, int], torch.Tensor]
"""``(prepared rows (r, D), c0, c1) -> (r, c1 - c0)`` contiguous scores of codes ``c0:c1``;
smaller ranks first."""


@dataclass(frozen=True)
class BlockPlan:
    """How the N x K score matrix is cut: ``rows`` query rows by ``codes`` codes per block."""

    rows: int
    codes: int

    @staticmethod
    def choose(num_codes: int, buffer_elements: int, codes_per_block: int | None = None) -> BlockPlan:
        """Cache-sized blocks of at most ``buffer_elements`` scores.

        ``codes_per_block`` (tests: tiny blocks exercise the merging) defaults to the whole
        codebook up to :data:`MAX_CODES_PER_BLOCK`, rounded down to a multiple of :data:`ALIGN`.
        """
        if codes_per_block is None:
            codes_per_block = min(num_codes, MAX_CODES_PER_BLOCK)
            if codes_per_block >= ALIGN:
                codes_per_block -= codes_per_block % ALIGN
        codes_per_block = max(1, min(codes_per_block, num_codes, buffer_elements))
        rows = max(1, min(buffer_elements, CACHE_ELEMENTS) // codes_per_block)
        return BlockPlan(rows=rows, codes=codes_per_block)

    def code_ranges(self, num_codes: int) -> list[tuple[int, int]]:
        """``[(c0, c1), ...]`` covering ``0:num_codes``: blocks of ``codes``, each split into a
        multiple of :data:`ALIGN` codes and a remainder where it has both."""
        ranges = []
        for c0 in range(0, num_codes, self.codes):
            c1 = min(c0 + self.codes, num_codes)
            aligned = c0 + (c1 - c0) // ALIGN * ALIGN
            ranges += [(c0, aligned), (aligned, c1)] if c0 < aligned < c1 else [(c0, c1)]
        return ranges


def smallest_k(queries: torch.Tensor, num_codes: int, k: int, prepare_rows: Callable[[torch.Tensor], torch.Tensor],
               score_block: ScoreBlock, *, score_dtype: torch.dtype, nan_as_inf: bool, buffer_elements: int,
               codes_per_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, K)`` smallest scores of every query row and their code indices, best first.

    Args:
        queries: ``(N, D)`` rows, any dtype and strides; ``prepare_rows`` turns a slice of them
            into what ``score_block`` takes (e.g. an fp32 copy, normalised rows).
        num_codes: K.
        k: how many per row.
        prepare_rows, score_block: the scores (see :data:`ScoreBlock`); one call per block.
        score_dtype: the dtype ``score_block`` returns.
        nan_as_inf: the NaN policy (module docstring).
        buffer_elements: the most scores held in one block.
        codes_per_block: block width (default: see :meth:`BlockPlan.choose`).

    Returns:
        ``(scores, indices)``, ``(N, min(k, K))``: ``score_dtype`` scores and int64 indices,
        ordered by (score, index) under the NaN policy.
    """
    plan = BlockPlan.choose(num_codes, buffer_elements, codes_per_block)
    ranges = plan.code_ranges(num_codes)
    kept = min(k, num_codes)
    scores_out = torch.empty((queries.shape[0], kept), dtype=score_dtype, device=queries.device)
    indices_out = torch.empty((queries.shape[0], kept), dtype=torch.int64, device=queries.device)
    for r0 in range(0, queries.shape[0], plan.rows):
        rows = prepare_rows(queries[r0:r0 + plan.rows])
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for c0, c1 in ranges:
            values, local = block_smallest(score_block(rows, c0, c1), k, nan_as_inf)
            best = _merge(best, (values, local + c0), kept)
        scores_out[r0:r0 + plan.rows] = best[0]
        indices_out[r0:r0 + plan.rows] = best[1]
    return scores_out, indices_out


def block_smallest(scores: torch.Tensor, k: int, nan_as_inf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, c)`` smallest of a contiguous ``(r, c)`` block by (score, position), and their positions."""
    rows, width = scores.shape
    kept = min(k, width)
    if kept == width or rows == 0:
        return exact_smallest(scores, kept, nan_as_inf)
    if kept == 1:
        values, found = _smallest_one(scores)
        exact_rows = torch.isnan(values[:, 0])
    else:
        values, found, exact_rows = _smallest_several(scores, kept, nan_as_inf)
    if bool(exact_rows.any()):
        at = exact_rows.nonzero().squeeze(1)
        values[at], found[at] = exact_smallest(scores[at], kept, nan_as_inf)
    return values, found


def exact_smallest(scores: torch.Tensor, k: int, nan_as_inf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The repair path (and the plain definition): a stable sort of whole rows, first ``k`` kept."""
    if nan_as_inf:
        scores = torch.where(torch.isnan(scores), math.inf, scores)
    order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def group_size(width: int, kept: int) -> int:
    """Group size G (a power of two dividing ``width``, at most :data:`ALIGN`) of the k > 1 path;
    1 means ``topk`` of the whole row. Minimises a cost model of the path, in nanoseconds per row
    (torch 2.14's CPU ``topk``, measured on this project's 2-core machine): ~100 per call plus ~4 per
    value on its heap path (:data:`TOPK_HEAP_RATIO`, with the masking passes of :func:`_top_of`) or
    ~12 on its ``nth_element`` path; the group path adds ~200 plus ~4 per candidate gathered."""
    def topk_cost(n: int) -> int:
        return 100 + (4 if kept * TOPK_HEAP_RATIO <= n else 12) * n

    best, best_cost = 1, topk_cost(width)
    size = 2
    while size <= ALIGN and width % size == 0 and width // size >= 2 * (kept + 1):
        cost = topk_cost(width // size) + topk_cost(size * kept) + 200 + 4 * size * kept
        if cost < best_cost:
            best, best_cost = size, cost
        size *= 2
    return best


def _merge(best: tuple[torch.Tensor, torch.Tensor] | None, new: tuple[torch.Tensor, torch.Tensor],
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two (score, index)-ordered lists whose indices are all smaller in ``best``.

    A stable sort by score of their concatenation keeps index order among equal scores (and puts
    NaN last); it sorts at most 2k values per row.
    """
    if best is None:
        return new
    values = torch.cat([best[0], new[0]], dim=1)
    indices = torch.cat([best[1], new[1]], dim=1)
    order = torch.sort(values, dim=1, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _smallest_one(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k = 1: ``(r, 1)`` minimum and its first position; NaN (position arbitrary) for a row holding NaN."""
    rows, width = scores.shape
    if width % ALIGN or width < 2 * ALIGN:
        values, found = scores.min(dim=1, keepdim=True)
        return values, found
    runs = scores.view(rows, width // ALIGN, ALIGN)
    _, run = runs.amin(dim=2).min(dim=1)  # first run holding the row minimum (NaN propagates)
    values, offset = runs.gather(1, run[:, None, None].expand(rows, 1, ALIGN)).min(dim=2)
    return values, run[:, None] * ALIGN + offset


def _smallest_several(scores: torch.Tensor, kept: int, nan_as_inf: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k > 1: ``(values, positions, rows still needing the exact path)``; tied rows already repaired."""
    size = group_size(scores.shape[1], kept)
    if size > 1:
        candidates, positions, exact_rows = _group_candidates(scores, kept, size)
    else:
        candidates, positions = scores, None
        exact_rows = torch.isnan(scores.amin(dim=1))
    values, top_at, tie_rows = _top_of(candidates, kept)
    tie_rows &= ~exact_rows
    found = top_at if positions is None else positions.gather(1, top_at)
    if bool(tie_rows.any()):
        at = tie_rows.nonzero().squeeze(1)
        values[at], found[at] = _exact_candidates(candidates[at], None if positions is None else positions[at],
                                                  kept, nan_as_inf)
    return values, found, exact_rows


def _top_of(values: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk`` of the ``kept`` smallest of rows ``(r, n)``, their positions, and the rows with a
    tie among them or at the boundary (``topk`` orders equal values arbitrarily). Rows holding NaN
    get meaningless answers: the callers send them to the exact path.

    On torch's heap path (``kept * 64 <= n``) the next value is the minimum of the others (the
    kept best masked by ``+inf``: two vectorised passes); otherwise ``topk(kept + 1)`` shows it.
    """
    if kept * TOPK_HEAP_RATIO <= values.shape[1]:
        best, at = values.topk(kept, dim=1, largest=False)
        following = values.scatter(1, at, math.inf).amin(dim=1)
        return best, at, (following == best[:, -1]) | (best[:, 1:] == best[:, :-1]).any(dim=1)
    best, at = values.topk(kept + 1, dim=1, largest=False)
    return best[:, :kept], at[:, :kept], (best[:, 1:] == best[:, :-1]).any(dim=1)


def _exact_candidates(candidates: torch.Tensor, positions: torch.Tensor | None, k: int,
                      nan_as_inf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The repair of tied rows: candidates put in position order, then :func:`exact_smallest`."""
    if positions is None:
        return exact_smallest(candidates, k, nan_as_inf)
    positions, order = positions.sort(dim=1)
    values, at = exact_smallest(candidates.gather(1, order), k, nan_as_inf)
    return values, positions.gather(1, at)


def _group_candidates(scores: torch.Tensor, kept: int, size: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores of the ``kept`` groups of ``size`` codes with the smallest minima.

    Returns ``(candidates (r, size * kept), their positions in the block, rows needing the exact
    path)``: a row needs it when it holds a NaN (a group minimum is NaN) or when two of its kept + 1
    smallest group minima are equal (only a tie at the kept-th place matters; any is sent).
    """
    rows, width = scores.shape
    groups = width // size
    slabs = scores.view(rows, size, groups)  # slab t holds codes t*W .. t*W + W - 1
    minima = slabs.amin(dim=1)  # (r, W): group j = {j, j + W, ...}; NaN when the group holds one
    nan_rows = torch.isnan(minima.amin(dim=1))
    _, top_groups, tied = _top_of(minima, kept)
    exact_rows = nan_rows | tied
    chosen = top_groups[:, None, :]
    candidates = slabs.gather(2, chosen.expand(rows, size, kept)).reshape(rows, size * kept)
    slab_starts = groups * torch.arange(size, device=scores.device)[:, None]
    positions = (chosen + slab_starts).reshape(rows, size * kept)
    return candidates, positions, exact_rows
