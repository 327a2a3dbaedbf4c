"""Plainly correct oracles the op tests (and the CPU benchmark's "old" rows) compare against.

* :func:`nearest_token_sorted`, :func:`select_top_m_sorted` and :func:`soft_assign_sorted`: the
  torch backends of ``nearest_token`` and ``soft_assign`` as they were before the sort-free selection
  (:mod:`pacofr.ops._selection`): per chunk of codes, a full stable ``torch.sort`` of (running best,
  new scores), so that equal scores keep index order and NaN sorts last. Slow, obviously right.
* float64 oracles of the scores themselves (direct differences, no expansion), numpy's
  ``lexsort`` for an independent top-m with the tie rule, and the tie-aware checks built on them
  (:func:`assert_matches_oracle` for nearest_token, :func:`check_selection` and friends for
  soft_assign, :func:`stats_oracle` for codebook_stats), shared by the op tests and the fuzz suite.
* the masked patch ops transcribed from MAE's ``models_mae.py`` in float64 (:func:`oracle_patches`,
  :func:`oracle_targets`, :func:`oracle_loss`, :func:`oracle_scatter`).
* :func:`recorded_sorts`: what a call sorts, to check that a path is sort-free.
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


def soft_assign_sorted(q: torch.Tensor, codebook: torch.Tensor, m: int, tau: float, metric: str = "cosine"
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """soft_assign's torch backend as it was before (soft path): :func:`select_top_m_sorted`, then
    cosine scores of ``F.normalize``-d rows (or ``-||q - e||^2``), softmax, weighted sum; autograd
    through torch ops. Returns ``(token, indices, weights)``."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    indices = select_top_m_sorted(q, codebook, m, metric)
    q_c = q.to(compute)
    rows = codebook.to(compute)[indices]
    if metric == "cosine":
        raw = (F.normalize(q_c, dim=-1, eps=NORM_EPS).unsqueeze(1) * F.normalize(rows, dim=-1, eps=NORM_EPS)).sum(-1)
    else:
        raw = -(q_c.unsqueeze(1) - rows).pow(2).sum(dim=-1)
    weights = torch.softmax((raw - raw.amax(dim=1, keepdim=True).detach()) / tau, dim=1)
    token = (weights.unsqueeze(-1) * rows).sum(dim=1)
    return token.to(q.dtype), indices, weights


# ------------------------------------------------------------------------------------------
# float64 oracles and the checks built on them
# ------------------------------------------------------------------------------------------

REL_TOL = 1e-5
"""fp32 arithmetic on the exact input values: score error relative to ||x||^2 + max ||e||^2."""
COSINE_TOL = 1e-5


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



def row_tolerance(x2d: torch.Tensor, codebook: torch.Tensor, metric: str, rel: float = REL_TOL) -> torch.Tensor:
    """Per-row fp64 tolerance of nearest_token scores: ``rel * (||x||^2 + max ||e||^2)`` (l2), absolute (cosine)."""
    if metric == "cosine":
        return torch.full((x2d.shape[0],), COSINE_TOL * rel / REL_TOL, dtype=torch.float64)
    scale = x2d.double().cpu().square().sum(1) + codebook.double().cpu().square().sum(1).max()
    return rel * scale


def assert_matches_oracle(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                          distances: torch.Tensor, indices: torch.Tensor, *,
                          index_dtype: torch.dtype = torch.int64, rel: float = REL_TOL) -> int:
    """Check a nearest_token result on finite inputs against :func:`nearest_token_distances64`,
    tie-aware: each returned code within tolerance of the optimum at its rank, the reported
    distance within tolerance of the exact one, the exact index wherever the rank's distance is
    separated from its neighbours by more than the tolerance. Returns how many slots were checked
    for exact index equality."""
    dim = codebook.shape[1]
    assert distances.shape == (*x.shape[:-1], k) and indices.shape == distances.shape
    assert distances.dtype == torch.float32 and indices.dtype == index_dtype
    assert distances.device == x.device and indices.device == x.device
    x2d = x.reshape(-1, dim)
    dist = distances.reshape(-1, k).double().cpu()
    idx = indices.reshape(-1, k).long().cpu()
    assert torch.isfinite(dist).all(), "non-finite distance for finite inputs"
    assert ((idx >= 0) & (idx < codebook.shape[0])).all(), "index out of range"
    if k > 1:
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "repeated index within a row"
        assert (dist.diff(dim=1) >= 0).all(), "distances not sorted nearest first"
    exact = nearest_token_distances64(x2d, codebook, metric)
    tol = row_tolerance(x2d, codebook, metric, rel)[:, None]
    best, best_idx = torch.sort(exact, dim=1, stable=True)
    picked = exact.gather(1, idx)
    assert ((picked - best[:, :k]).abs() <= tol).all(), (
        f"a returned code is farther than the tolerance from the optimum: "
        f"max excess {((picked - best[:, :k]).abs() - tol).max().item():.3g}")
    assert ((dist - picked).abs() <= tol).all(), (
        f"reported distance off by {((dist - picked).abs() - tol).max().item():.3g} beyond tolerance")
    inf = torch.full((best.shape[0], 1), float("inf"), dtype=torch.float64)
    padded = torch.cat([-inf, best[:, :k + 1], inf], dim=1)
    gap_below = padded[:, 1:k + 1] - padded[:, 0:k]
    gap_above = padded[:, 2:k + 2] - padded[:, 1:k + 1]
    separated = torch.minimum(gap_below, gap_above) > tol
    mismatch = separated & (idx != best_idx[:, :k])
    assert not mismatch.any(), f"{int(mismatch.sum())} well-separated slots returned the wrong index"
    return int(separated.sum())


def oracle_given(q, cb, idx, tau, metric, straight_through=False):
    """float64 (token, weights) for the given indices, differentiable w.r.t. q, cb and tau."""
    rows = cb[idx]  # (N, m, D)
    if metric == "cosine":
        qn = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        en = rows / rows.norm(dim=2, keepdim=True).clamp_min(1e-12)
        raw = (qn[:, None, :] * en).sum(-1)
    else:
        raw = -((q[:, None, :] - rows) ** 2).sum(-1)
    weights = torch.softmax(raw / tau, dim=1)
    soft = (weights[..., None] * rows).sum(1)
    token = soft + (rows[:, 0] - soft).detach() if straight_through else soft
    return token, weights


def check_selection(idx, q, cb, m, metric, atol):
    """Returned indices select the oracle's top-m (up to near-ties of size atol), best first."""
    scores = soft_assign_scores64(q, cb, metric)
    want = top_m_lexsort(scores, m)
    assert idx.dtype == torch.int64 and idx.shape == (q.shape[0], m)
    assert int(idx.min()) >= 0 and int(idx.max()) < cb.shape[0]
    for row in idx:
        assert len(set(row.tolist())) == m, f"repeated code in a row: {row.tolist()}"
    got_s, want_s = scores.gather(1, idx), scores.gather(1, want)
    torch.testing.assert_close(got_s, want_s, atol=atol, rtol=0)
    ranked = torch.sort(scores, dim=1, descending=True).values[:, : m + 1]
    gaps = ranked[:, :-1] - ranked[:, 1:]
    clear = gaps.min(dim=1).values > 4 * atol if gaps.shape[1] else torch.ones(len(idx), dtype=torch.bool)
    assert torch.equal(idx[clear], want[clear])


def assert_weights_close(w, q, cb, idx, tau, metric):
    """Weights computed in fp32 differ from float64 by about eps32 * |score| / tau per logit."""
    want_token, want_w = oracle_given(q.double(), cb.double(), idx, tau, metric)
    scale = soft_assign_scores64(q, cb, metric).abs().amax().item()
    atol = 1e-6 + 4 * 2.0**-23 * math.sqrt(q.shape[1]) * max(scale, 1.0) / tau
    torch.testing.assert_close(w.double(), want_w, atol=atol, rtol=0)
    return want_token, atol * idx.shape[1] * cb.double().abs().max().item()


def assert_close_rel(got, want, rel, name, atol=0.0):
    """|got - want| <= atol + rel * max(max|want|, 1e-3) elementwise, reporting the worst element
    (the floor keeps vanishing gradients of saturated softmaxes from demanding subnormal accuracy)."""
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1e-3) if want.numel() else 1.0
    err = (got - want).abs()
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= atol + rel * scale, f"{name}: max error {worst:.3e} > {atol:.1e} + {rel:.1e} * {scale:.3e}"


def stats_oracle(indices, k, weights, x):
    """float64 codebook_stats by bincount and a plain loop over codes (independent of index_add)."""
    idx = indices.reshape(-1).long()
    w = torch.ones(idx.shape, dtype=torch.float64) if weights is None else weights.reshape(-1).double()
    counts = torch.bincount(idx, weights=w, minlength=k).double()
    sums = None
    if x is not None:
        per_row = 1 if indices.dim() == 1 else indices.shape[1]
        rows = torch.arange(indices.shape[0]).repeat_interleave(per_row)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
        for j in range(k):  # plain loop: independent of index_add
            sel = idx == j
            sums[j] = (w[sel, None] * x.double()[rows[sel]]).sum(0)
    return counts, sums


# ------------------------------------------------------------------------------------------
# masked patch ops: a literal float64 transcription of MAE (models_mae.py)
# ------------------------------------------------------------------------------------------

def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """MAE patchify (generalised to H != W): (B, C, H, W) -> (B, L, p*p*C)."""
    n, c, height, width = imgs.shape
    h, w = height // p, width // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def oracle_patches(images: torch.Tensor, ids: torch.Tensor, p: int, mean=None, std=None) -> torch.Tensor:
    x = images.double()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if mean is not None or std is not None:
        c = images.shape[1]
        m = torch.as_tensor(mean if mean is not None else [0.0] * c, dtype=torch.float64, device=x.device)
        s = torch.as_tensor(std if std is not None else [1.0] * c, dtype=torch.float64, device=x.device)
        x = (x - m.view(1, c, 1, 1)) / s.view(1, c, 1, 1)
    target = mae_patchify(x, p)
    index = ids.long().unsqueeze(-1).repeat(1, 1, target.shape[-1])
    return torch.gather(target, dim=1, index=index)


def oracle_targets(images, ids, p, norm_pix=True, eps=1e-6, mean=None, std=None) -> torch.Tensor:
    target = oracle_patches(images, ids, p, mean, std)
    if norm_pix and target.numel():  # (var of an empty tensor warns)
        m = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - m) / (var + eps) ** 0.5
    return target


def oracle_loss(pred, images, ids, p, **kwargs) -> torch.Tensor:
    target = oracle_targets(images, ids, p, **kwargs)
    loss = (pred.double() - target) ** 2
    return loss.mean(dim=-1).mean()


def oracle_scatter(x, ids_restore, mask_token, pos_embed=None) -> torch.Tensor:
    """MAE forward_decoder without the cls token, float64."""
    x = x.double()
    mask_tokens = mask_token.double().reshape(1, 1, -1).repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)
    x_ = torch.cat([x, mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.long().unsqueeze(-1).repeat(1, 1, x.shape[2]))
    if pos_embed is not None:
        x_ = x_ + pos_embed.double().reshape(1, ids_restore.shape[1], -1)
    return x_

@contextlib.contextmanager
def recorded_sorts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Inside the block, every ``torch.sort`` / ``Tensor.sort`` appends ``(rows, width)`` to the
    yielded list: the length of the sorted dimension and how many such rows were sorted (the sort
    still runs)."""
    sorts: list[tuple[int, int]] = []
    original = torch.sort

    def recording(input: torch.Tensor, *args, **kwargs):  # noqa: A002 - torch.sort's own name
        dim = kwargs.get("dim", args[0] if args and isinstance(args[0], int) else -1)
        width = input.shape[dim] if input.dim() else 1
        sorts.append((input.numel() // max(width, 1), width))
        return original(input, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "sort", recording)
        patch.setattr(torch.Tensor, "sort", lambda self, *args, **kwargs: recording(self, *args, **kwargs))
        yield sorts


def sorted_share(sorts: list[tuple[int, int]], wider_than: int, scores: int) -> float:
    """The fraction of ``scores`` that went through sorts of more than ``wider_than`` values per row."""
    return sum(rows * width for rows, width in sorts if width > wider_than) / scores
