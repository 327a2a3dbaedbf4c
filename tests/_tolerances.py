"""Unit roundoffs and the classic rounding-error bounds that the tests derive their tolerances from.

The bounds are those of Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed.), chapters 2-3:
storing a value rounds it by at most ``u`` relative; a sum or dot product of ``n`` terms, in any order, is
off by at most ``gamma(n) * sum |terms|``. A test names which of these its tolerance is, and with what
``n`` and magnitude; where a bound is instead measured, its docstring or comment says on what.
This module holds no tests.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24
"""float32 unit roundoff (24-bit significand)."""

U16 = 2.0**-11
"""float16 unit roundoff (11-bit significand)."""

UBF16 = 2.0**-8
"""bfloat16 unit roundoff (8-bit significand)."""

U64 = 2.0**-53
"""float64 unit roundoff (53-bit significand)."""


def gamma(n: int, u: float = U32) -> float:
    """``n u / (1 - n u)``: the relative bound of ``n`` successive roundings (a sum of ``n + 1`` terms, or a dot
    product of ``n`` terms, is within ``gamma(n) * sum |terms|`` of the exact value)."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded for u = {u}")
    return n * u / (1 - n * u)


def unit_norm_error(dim: int) -> float:
    """Bound on | ||v|| - 1 | for an fp32 ``F.normalize`` output of ``dim`` elements whose norm is recomputed
    in fp32: normalising sums dim squares (gamma(dim) relative, halved by the square root) and rounds the
    root and each quotient (2 u); recomputing the norm costs gamma(dim) / 2 + u again: gamma(dim + 3)."""
    return gamma(dim + 3)


def cosine_error(dim: int) -> float:
    """Bound on the fp32 error of a cosine of two fp32 vectors of ``dim`` elements: each normalised in fp32
    ((dim / 2 + 2) u relative per element, as in :func:`unit_norm_error`) and their dot (dim u):
    (2 dim + 4) u."""
    return (2 * dim + 4) * U32


def whole_cell_warp_error(width: int, x: torch.Tensor) -> float:
    """Bound on an fp32 ``warp`` of ``x`` (..., H, W = width) by a transform that maps pixel centres onto pixel
    centres (a shift by whole cells): each sample lands on a centre up to the rounding of its coordinate
    (affine_grid's base coordinate and shift, grid_sample's unnormalisation ((c + 1) W - 1) / 2: about 5
    roundings of magnitude <= W pixels), which moves a bilinear weight by 5 W u onto a neighbour that differs
    by at most 2 max|x|; the blend rounds twice more: (10 W + 2) u max|x| (measured: exact on the CPU)."""
    return (10 * width + 2) * U32 * x.abs().max().item()


def lerp_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on an fp32 ``a.lerp_(b, w)`` (0 <= w <= 1) against float64: torch rounds the
    difference b - a and the final update once each, both at most |a| + |b|: 2 u (|a| + |b|)."""
    return 2 * U32 * (a.double().abs() + b.double().abs())
