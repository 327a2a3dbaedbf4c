"""Triton kernel of ``pacofr.ops.nearest_token``: the shared ranking tile loop (:mod:`._ranking`) and
an epilogue that writes the k best codes of every row as distances.

One program owns ``BLOCK_N`` query rows; :func:`~._ranking.best_codes` walks the codebook in tiles
of ``BLOCK_K`` codes and keeps the ``KP`` best (score, index) keys per row (``KP`` = k rounded up
to a power of two). The epilogue takes them in increasing order and turns each score into the
reported distance with the row constant, which never enters the comparison:
``max(||x||^2 + 2 score, 0)`` (l2) or ``1 + score / ||x||`` (cosine). A query row whose fp32
squared norm is NaN or above ``max_squared_norm`` (the op's finite range) gets NaN distances and
index -1, like every slot whose distance is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pacofr.kernels._ranking import best_codes, key_index, key_score, pop_smallest
from pacofr.kernels.norms import squared_norms_of_rows


@triton.jit
def nearest_token_kernel(
    x_ptr, codebook_ptr, code_term_ptr, dist_ptr, index_ptr,
    n_rows, n_codes, dim,
    stride_xn, stride_xd, stride_en, stride_ed, max_squared_norm,
    K_OUT: tl.constexpr, KP: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, CAST_BF16: tl.constexpr, UPCAST: tl.constexpr, RESIDENT: tl.constexpr,
):
    """Write the ``K_OUT`` nearest codes of rows ``[pid * BLOCK_N, ...)`` to ``dist``/``index`` (row stride ``K_OUT``).

    ``code_term`` (fp32, ``(n_codes,)``): ``0.5 ||e||^2`` (l2) or ``1/||e||`` (cosine, 0 for zero rows).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    best = best_codes(x_ptr, codebook_ptr, code_term_ptr, rows, row_mask, n_codes, dim,
                      stride_xn, stride_xd, stride_en, stride_ed,
                      KP, COSINE, BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION, CAST_BF16, UPCAST, RESIDENT)

    # ||x||^2 in fp32 (the row constant of the reported distance, never part of the comparison)
    squared_norm = squared_norms_of_rows(x_ptr, rows, row_mask, dim, stride_xn, stride_xd, BLOCK_D)
    if COSINE:
        positive = squared_norm > 0.0
        inv_norm = tl.where(positive, tl.div_rn(1.0, tl.sqrt_rn(tl.where(positive, squared_norm, 1.0))), 0.0)
    outside = ~(squared_norm <= max_squared_norm)  # NaN and inf norms included

    out_offsets = rows.to(tl.int64) * K_OUT
    for slot in tl.static_range(K_OUT):
        smallest, best = pop_smallest(best)
        score = key_score(smallest)
        if COSINE:
            distance = 1.0 + score * inv_norm
        else:
            distance = squared_norm + 2.0 * score
            distance = tl.where(distance < 0.0, 0.0, distance)
        distance = tl.where(outside, float("nan"), distance)
        index = tl.where(distance != distance, -1, key_index(smallest))
        tl.store(dist_ptr + out_offsets + slot, distance, mask=row_mask)
        tl.store(index_ptr + out_offsets + slot, index, mask=row_mask)

