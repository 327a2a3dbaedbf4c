"""Triton kernel of :func:`pacofr.ops._norms.squared_row_norms`: fp32 ``||row||^2`` of a matrix in one pass.

The sum runs over ``D`` in ``BLOCK_D`` chunks in increasing order, each chunk reduced by one
``tl.sum`` over a register tile: the order depends on ``D`` and the tile only, never on the
matrix's strides, so identical rows get identical norms in every memory layout (a transposed
codebook included).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def squared_norms_of_rows(x_ptr, rows, row_mask, dim, stride_n, stride_d, BLOCK_D: tl.constexpr):
    """fp32 ``||x[r]||^2`` ``(BLOCK_N,)`` of the ``rows`` ``(BLOCK_N,)`` of ``x``, in the fixed order above."""
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        tile = tl.load(row_ptrs + ds.to(tl.int64)[None, :] * stride_d,
                       mask=row_mask[:, None] & (ds < dim)[None, :], other=0.0).to(tl.float32)
        total += tl.sum(tile * tile, axis=1)
    return total


@triton.jit
def squared_row_norms_kernel(x_ptr, out_ptr, n_rows, dim, stride_n, stride_d,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = sum_d float32(x[r, d])^2 for rows ``[pid * BLOCK_N, ...)``; out (n_rows,) fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tl.store(out_ptr + rows, squared_norms_of_rows(x_ptr, rows, row_ok, dim, stride_n, stride_d, BLOCK_D),
             mask=row_ok)
