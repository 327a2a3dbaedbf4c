"""pacofr.ops._selection: the sort-free k smallest against numpy's lexsort, on ties, NaN and inf.

The selection sees the scores themselves here, so the answer is exact: the returned (score,
index) pairs must be those of an independent stable ranking (numpy ``lexsort`` on (index, score)),
for every group size the k > 1 path can take, ragged widths, tiny blocks that force merging, and
both NaN policies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _oracles import recorded_sorts
from pacofr.ops import _selection
from pacofr.ops._selection import ALIGN, block_smallest, group_size, smallest_k

pytestmark = pytest.mark.usefixtures("one_thread")


def lexsort_smallest(scores: torch.Tensor, k: int, nan_as_inf: bool) -> tuple[np.ndarray, np.ndarray]:
    """numpy oracle: (values, indices) of the k smallest by (score, index); NaN last or as +inf."""
    s = scores.double().numpy()
    if nan_as_inf:
        s = np.where(np.isnan(s), np.inf, s)
    rank = np.where(np.isnan(s), 2.0, np.where(np.isposinf(s), 1.0, 0.0))  # NaN after +inf
    values = np.empty((s.shape[0], k))
    indices = np.empty((s.shape[0], k), dtype=np.int64)
    columns = np.arange(s.shape[1])
    for row in range(s.shape[0]):
        finite_key = np.where(rank[row] == 0, s[row], 0.0)
        order = np.lexsort((columns, finite_key, rank[row]))[:k]
        values[row], indices[row] = s[row, order], order
    return values, indices


def assert_same_selection(got: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor, k: int,
                          nan_as_inf: bool) -> None:
    want_values, want_indices = lexsort_smallest(scores, k, nan_as_inf)
    values, indices = got[0].double().numpy(), got[1].numpy()
    assert values.shape == want_values.shape and indices.dtype == np.int64
    np.testing.assert_array_equal(values, want_values)  # NaN == NaN for assert_array_equal
    real = ~np.isnan(want_values)  # which NaN code fills a NaN slot is not specified
    np.testing.assert_array_equal(indices[real], want_indices[real])


def tied_scores(rows: int, width: int, generator: torch.Generator, *, levels: int, nan: float = 0.0,
                inf: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scores drawn from ``levels`` values (many exact ties), with NaN and +-inf sprinkled in."""
    scores = torch.randint(-levels, levels, (rows, width), generator=generator).to(dtype)
    draw = torch.rand(rows, width, generator=generator)
    scores[draw < nan] = math.nan
    scores[(draw >= nan) & (draw < nan + inf / 2)] = math.inf
    scores[(draw >= nan + inf / 2) & (draw < nan + inf)] = -math.inf
    return scores


def run_blocks(scores: torch.Tensor, k: int, nan_as_inf: bool, codes_per_block: int | None = None,
               buffer_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """smallest_k on a precomputed score matrix (prepare_rows picks rows, score_block slices codes)."""
    return smallest_k(scores, scores.shape[1], k, lambda rows: rows, lambda rows, c0, c1: rows[:, c0:c1].contiguous(),
                      score_dtype=scores.dtype, nan_as_inf=nan_as_inf, buffer_elements=buffer_elements,
                      codes_per_block=codes_per_block)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("width", [1, 5, 63, 64, 130, 256, 1000, 4096 + 33])
@pytest.mark.parametrize("nan_as_inf", [False, True])
def test_matches_lexsort_on_ties_nan_and_inf(k: int, width: int, nan_as_inf: bool, generator: torch.Generator) -> None:
    for levels, nan, inf in [(1000000, 0.0, 0.0), (3, 0.0, 0.0), (50, 0.002, 0.002), (2, 0.3, 0.3)]:
        scores = tied_scores(37, width, generator, levels=levels, nan=nan, inf=inf)
        assert_same_selection(run_blocks(scores, k, nan_as_inf), scores, min(k, width), nan_as_inf)


@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_every_group_size_is_exact(k: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force each group size the k > 1 path may choose (and the whole-row topk) on tied data."""
    width = 4096
    for size in (1, 2, 4, 8, 16, 32, 64):
        monkeypatch.setattr(_selection, "group_size", lambda width, kept, size=size: size)
        for levels in (100000, 40, 4):
            scores = tied_scores(33, width, generator, levels=levels, nan=0.0005, inf=0.0005)
            for nan_as_inf in (False, True):
                assert_same_selection(block_smallest(scores, k, nan_as_inf), scores, k, nan_as_inf)


def test_group_size_is_a_valid_split() -> None:
    for width in (64, 256, 1024, 4096, 8192, 192, 96):
        for kept in range(2, 17):
            size = group_size(width, kept)
            assert size == 1 or (width % size == 0 and size <= ALIGN and width // size >= 2 * (kept + 1))


@pytest.mark.parametrize("codes_per_block", [1, 7, 64, 100, 256])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_merging_across_blocks_and_rows(codes_per_block: int, k: int, generator: torch.Generator) -> None:
    scores = tied_scores(45, 700, generator, levels=6, nan=0.01, inf=0.01, dtype=torch.float64)
    for nan_as_inf in (False, True):
        got = run_blocks(scores, k, nan_as_inf, codes_per_block=codes_per_block, buffer_elements=5 * codes_per_block)
        assert_same_selection(got, scores, k, nan_as_inf)


def test_all_nan_rows_and_no_rows(generator: torch.Generator) -> None:
    scores = tied_scores(6, 300, generator, levels=5)
    scores[2] = math.nan
    scores[4, ::2] = math.nan
    for k in (1, 4):
        for nan_as_inf in (False, True):
            assert_same_selection(run_blocks(scores, k, nan_as_inf), scores, k, nan_as_inf)
    values, indices = run_blocks(torch.empty(0, 300), 3, False)
    assert values.shape == (0, 3) and indices.shape == (0, 3) and indices.dtype == torch.int64


@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_tie_free_rows_never_sort_a_block(k: int, generator: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct scores: only the merge of two k-lists may sort (at most 2k values per row)."""
    scores = torch.randperm(300 * 5000, generator=generator).float().view(300, 5000)  # exact in fp32
    with recorded_sorts(monkeypatch) as sorts:
        got = run_blocks(scores, k, False, codes_per_block=2048)
    assert_same_selection(got, scores, k, False)
    assert max((width for _, width in sorts), default=0) <= 2 * k, f"sorted {sorts}"
