"""Triton kernel of ``pacofr.ops.nearest_token``: fused distance tile loop with a running top-k.

One program owns ``BLOCK_N`` query rows. It walks the codebook in tiles of ``BLOCK_K`` codes; for
each tile it accumulates ``x . e`` over ``D`` in chunks of ``BLOCK_D`` (fp32 accumulator, so any D
works without padding it to a power of two), turns the dot products into fp32 scores
(``0.5 ||e||^2 - x.e`` for l2, ``-(x.e) / ||e||`` for cosine) and merges them into a per-row set of
the best ``KP`` candidates (``KP`` = k rounded up to a power of two).

Candidates are packed into int64 keys: the high 32 bits hold the score's bits mapped to an
order-preserving signed integer, the low 32 bits the code index. Comparing keys compares
(score, index) lexicographically, so the smallest index wins every tie in any merge order; NaN
scores are mapped to the largest score key (after +inf), masked columns to ``INT64_MAX``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# (Triton kernels may read only constexpr globals)
KEY_PAD = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # masked code columns / removed candidates: after every real key
KEY_NAN = tl.constexpr(0x7FFFFFFF)  # high word of a NaN score: after +inf (0x7F800000)
SIGN_FLIP = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _score_keys(scores, cols, col_mask):
    """int64 keys ``(ordered score bits << 32) | index`` of a fp32 score tile; masked columns ``KEY_PAD``."""
    scores = tl.where(scores == 0.0, 0.0, scores)  # -0.0 -> +0.0: equal scores must give equal keys
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & SIGN_FLIP)
    ordered = tl.where(scores != scores, KEY_NAN, ordered)
    keys = (ordered.to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
    return tl.where(col_mask[None, :], keys, KEY_PAD)


@triton.jit
def _key_score(keys):
    """The fp32 score stored in the high word of int64 keys."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & SIGN_FLIP)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_tile(best, keys, KP: tl.constexpr):
    """Insert the ``KP`` smallest keys of each row of ``keys`` into the running sets ``best``.

    ``best`` ``(BLOCK_N, KP)`` holds distinct keys (unordered). Each step moves the tile's smallest
    remaining key into the set if it beats the set's largest; keys are unique per row (they carry
    the index), so exactly one slot changes and one tile entry is consumed per step.
    """
    if KP == 1:
        best = tl.minimum(best, tl.min(keys, axis=1)[:, None])
    else:
        worst = tl.max(best, axis=1)
        candidates = tl.sum((keys < worst[:, None]).to(tl.int32), axis=1)
        steps = tl.minimum(tl.max(candidates, axis=0), KP)
        for _ in range(steps):
            smallest = tl.min(keys, axis=1)
            take = smallest < worst
            best = tl.where((best == worst[:, None]) & take[:, None], smallest[:, None], best)
            keys = tl.where(keys == smallest[:, None], KEY_PAD, keys)
            worst = tl.max(best, axis=1)
    return best


@triton.jit
def nearest_token_kernel(
    x_ptr, codebook_ptr, code_term_ptr, dist_ptr, index_ptr,
    n_rows, n_codes, dim,
    stride_xn, stride_xd, stride_en, stride_ed,
    K_OUT: tl.constexpr, KP: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_FOR_DOT: tl.constexpr,
):
    """Write the ``K_OUT`` nearest codes of rows ``[pid * BLOCK_N, ...)`` to ``dist``/``index`` (row stride ``K_OUT``).

    ``code_term`` (fp32, ``(n_codes,)``): ``0.5 ||e||^2`` (l2) or ``1/||e||`` (cosine, 0 for zero rows).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    slots = tl.arange(0, KP)
    # empty slots: distinct keys above every real key, so each is replaced exactly once
    best = tl.full((BLOCK_N, KP), KEY_PAD, tl.int64) - slots.to(tl.int64)[None, :]

    for code_start in range(0, n_codes, BLOCK_K):
        cols = code_start + tl.arange(0, BLOCK_K)
        col_mask = cols < n_codes
        e_cols = codebook_ptr + cols.to(tl.int64)[None, :] * stride_en
        dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d_start in range(0, dim, BLOCK_D):
            ds = d_start + tl.arange(0, BLOCK_D)
            d_mask = ds < dim
            x_tile = tl.load(x_rows + ds.to(tl.int64)[None, :] * stride_xd,
                             mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            e_tile = tl.load(e_cols + ds.to(tl.int64)[:, None] * stride_ed,
                             mask=d_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST_FOR_DOT:
                x_tile = x_tile.to(tl.float32)
                e_tile = e_tile.to(tl.float32)
            dots = tl.dot(x_tile, e_tile, dots, input_precision=INPUT_PRECISION)
        term = tl.load(code_term_ptr + cols, mask=col_mask, other=0.0)
        if COSINE:
            scores = -dots * term[None, :]
        else:
            scores = term[None, :] - dots
        best = _merge_tile(best, _score_keys(scores, cols, col_mask), KP)

    # ||x||^2 in fp32 (the row constant of the reported distance, never part of the comparison)
    squared_norm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        x_tile = tl.load(x_rows + ds.to(tl.int64)[None, :] * stride_xd,
                         mask=row_mask[:, None] & (ds < dim)[None, :], other=0.0).to(tl.float32)
        squared_norm += tl.sum(x_tile * x_tile, axis=1)
    if COSINE:
        positive = squared_norm > 0.0
        inv_norm = tl.where(positive, tl.div_rn(1.0, tl.sqrt_rn(tl.where(positive, squared_norm, 1.0))), 0.0)

    out_offsets = rows.to(tl.int64) * K_OUT
    for slot in tl.static_range(K_OUT):
        smallest = tl.min(best, axis=1)
        best = tl.where(best == smallest[:, None], KEY_PAD, best)
        score = _key_score(smallest)
        index = smallest.to(tl.int32)  # the low word (indices are < 2^31)
        if COSINE:
            distance = 1.0 + score * inv_norm
        else:
            distance = squared_norm + 2.0 * score
            distance = tl.where(distance < 0.0, 0.0, distance)
        index = tl.where(distance != distance, -1, index)
        tl.store(dist_ptr + out_offsets + slot, distance, mask=row_mask)
        tl.store(index_ptr + out_offsets + slot, index, mask=row_mask)


def next_power_of_two(value: int) -> int:
    """Smallest power of two >= ``value`` (``value >= 1``)."""
    return 1 << (value - 1).bit_length()
