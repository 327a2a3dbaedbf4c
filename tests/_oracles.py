"""Plainly correct oracles the op tests (and the CPU benchmark's "old" rows) compare against.

* :func:`nearest_token_sorted` and :func:`select_top_m_sorted`: the torch backends of
  ``nearest_token`` and ``soft_assign``'s ranking as they were before the sort-free selection
  (:mod:`pacofr.ops._selection`): per chunk of codes, a full stable ``torch.sort`` of (running best,
  new scores), so that equal scores keep index order and NaN sorts last. Slow, obviously right.
* float64 oracles of the scores themselves (direct differences, no expansion), and numpy's
  ``lexsort`` for an independent top-m with the tie rule.
* :func:`recorded_sort_widths`: what a call sorts, to check that a path is sort-free.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pacofr.ops.nearest_token import code_terms, finish_distances
from pacofr.ops.soft_assign import NORM_EPS


def nearest_token_sorted(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2",
                         index_dtype: torch.dtype = torch.int64, *, buffer_elements: int = 1 << 22,
                         codes_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_token of 2-D ``x`` ``(N, D)`` by stable sorts: ``(distances (N, k) fp32, indices (N, k))``.

    Scores as the op defines them (``0.5 ||e||^2 - x.e`` or ``-(x.e) / ||e||`` in fp32), rows
    ``buffer_elements // codes_per_chunk`` and codes ``codes_per_chunk`` at a time.
    """
    n, codes = x.shape[0], codebook.shape[0]
    codes_per_chunk = max(1, min(codes_per_chunk, codes))
    rows_per_chunk = max(1, buffer_elements // codes_per_chunk)
    codebook32 = codebook.float()
    terms = code_terms(codebook, metric)
    distances = torch.empty((n, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((n, k), dtype=index_dtype, device=x.device)
    for r0 in range(0, n, rows_per_chunk):
        rows = x[r0:r0 + rows_per_chunk].float()
        best_scores = rows.new_empty((rows.shape[0], 0))
        best_indices = torch.empty((rows.shape[0], 0), dtype=torch.int64, device=x.device)
        for c0 in range(0, codes, codes_per_chunk):
            chunk = codebook32[c0:c0 + codes_per_chunk]
            dots = rows @ chunk.T
            term = terms[c0:c0 + chunk.shape[0]]
            scores = term - dots if metric == "l2" else -dots * term
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


@torch.no_grad()
def select_top_m_sorted(q: torch.Tensor, codebook: torch.Tensor, m: int, metric: str,
                        chunk_elements: int = 1 << 26) -> torch.Tensor:
    """soft_assign's ranking by a stable descending sort: indices ``(N, m)`` int64.

    Scores ``qn . en`` (cosine) or ``2 q.e - ||e||^2`` (l2) in fp32 (fp64 for fp64 inputs), NaN
    as ``-inf``; ties to the smaller index.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    cb = codebook.to(compute)
    if metric == "cosine":
        cb = F.normalize(cb, dim=1, eps=NORM_EPS)
        code_bias = None
    else:
        code_bias = cb.pow(2).sum(dim=1)
    num_rows, num_codes = q.shape[0], cb.shape[0]
    out = torch.empty(num_rows, m, dtype=torch.int64, device=q.device)
    chunk = max(1, chunk_elements // num_codes)
    for start in range(0, num_rows, chunk):
        rows = q[start:start + chunk].to(compute)
        if metric == "cosine":
            scores = F.normalize(rows, dim=1, eps=NORM_EPS) @ cb.T
        else:
            scores = 2.0 * (rows @ cb.T) - code_bias
        scores = scores.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        out[start:start + chunk] = order[:, :m]
    return out


# ------------------------------------------------------------------------------------------
# float64 oracles of the scores
# ------------------------------------------------------------------------------------------

def nearest_token_distances64(x2d: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact fp64 distances ``(N, K)`` of the given values (direct differences, no expansion)."""
    x64, e64 = x2d.double().cpu(), codebook.double().cpu()
    if metric == "l2":
        return torch.cdist(x64, e64, compute_mode="donot_use_mm_for_euclid_dist").square()
    nx, ne = x64.norm(dim=1), e64.norm(dim=1)
    inv_x = torch.where(nx > 0, 1.0 / nx.clamp_min(1e-300), torch.zeros_like(nx))
    inv_e = torch.where(ne > 0, 1.0 / ne.clamp_min(1e-300), torch.zeros_like(ne))
    return 1.0 - (x64 @ e64.T) * inv_x[:, None] * inv_e[None, :]


def soft_assign_scores64(q: torch.Tensor, cb: torch.Tensor, metric: str) -> torch.Tensor:
    """Raw float64 soft_assign scores (N, K) before 1/tau: cosine, or -squared distance computed directly."""
    q, cb = q.double().cpu(), cb.double().cpu()
    if metric == "cosine":
        qn = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        en = cb / cb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return qn @ en.T
    return -((q[:, None, :] - cb[None, :, :]) ** 2).sum(-1)


def top_m_lexsort(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (N, m) of the m largest scores per row, NaN as -inf, ties to the smaller index (numpy)."""
    s = scores.double().cpu().numpy()
    out = np.empty((s.shape[0], m), dtype=np.int64)
    idx = np.arange(s.shape[1])
    for row in range(s.shape[0]):
        key = np.where(np.isnan(s[row]), -np.inf, s[row])
        out[row] = np.lexsort((idx, -key))[:m]
    return torch.from_numpy(out)


@contextlib.contextmanager
def recorded_sort_widths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Inside the block, every ``torch.sort`` / ``Tensor.sort`` appends the length of the sorted
    dimension to the yielded list (the sort still runs)."""
    widths: list[int] = []
    original = torch.sort

    def recording(input: torch.Tensor, *args, **kwargs):  # noqa: A002 - torch.sort's own name
        dim = kwargs.get("dim", args[0] if args and isinstance(args[0], int) else -1)
        widths.append(input.shape[dim] if input.dim() else 1)
        return original(input, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "sort", recording)
        patch.setattr(torch.Tensor, "sort", lambda self, *args, **kwargs: recording(self, *args, **kwargs))
        yield widths
