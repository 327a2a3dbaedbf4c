"""fp32 squared row norms that do not depend on the memory layout, on the torch and triton backends.

The codebook ops rank codes by scores built from the codes' norms; identical codes must get
identical norms, or the tie rule (smallest index first) breaks. A reduction along a strided
dimension (a transposed codebook, ``.t()``) rounds differently from one along a contiguous
dimension, so both functions here fix the summation order whatever the strides: the torch one
sums a contiguous fp32 copy of a bounded chunk of rows, the triton one reduces register tiles in a
fixed order (:mod:`pacofr.kernels.norms`).
"""

from __future__ import annotations

import torch

from pacofr.ops._launch import cdiv, new_output, next_power_of_two

CHUNK_ELEMENTS = 1 << 22
"""Most values the torch version upcasts at once (16 MiB of fp32)."""


def squared_row_norms(matrix: torch.Tensor, buffer_elements: int = CHUNK_ELEMENTS,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``||row||^2`` ``(N,)`` in ``dtype`` (fp32; fp64 for the float64 reference) of ``matrix`` ``(N, D)``
    (any float dtype, any strides), in torch.

    Each chunk of at most ``buffer_elements`` values is copied to a contiguous ``dtype`` tensor
    before the sum, so every row is reduced the same way (layout-independent).
    """
    rows_per_chunk = max(1, buffer_elements // max(1, matrix.shape[1]))
    out = torch.empty(matrix.shape[0], dtype=dtype, device=matrix.device)
    for r0 in range(0, matrix.shape[0], rows_per_chunk):
        chunk = matrix[r0:r0 + rows_per_chunk].contiguous().to(dtype)
        out[r0:r0 + rows_per_chunk] = chunk.square().sum(dim=1)
    return out


NORM_TILE_ELEMENTS = 4096
"""Values per (rows x D chunk) register tile of the triton norms kernel."""


def squared_row_norms_triton(matrix: torch.Tensor) -> torch.Tensor:
    """As :func:`squared_row_norms`, by one Triton pass over ``matrix`` (read in place, no copy)."""
    from pacofr.kernels.norms import squared_row_norms_kernel

    n, dim = matrix.shape
    out = new_output((n,), torch.float32, matrix.device)
    if n == 0:
        return out
    block_d = min(128, next_power_of_two(dim))
    block_n = max(1, min(128, NORM_TILE_ELEMENTS // block_d))
    squared_row_norms_kernel[(cdiv(n, block_n),)](
        matrix, out, n, dim, matrix.stride(0), matrix.stride(1), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out
