"""Unit roundoffs and the classic rounding-error bounds that the tests derive their tolerances from.

The bounds are those of Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed.), chapters 2-3:
storing a value rounds it by at most ``u`` relative; a sum or dot product of ``n`` terms, in any order, is
off by at most ``gamma(n) * sum |terms|``. A test names which of these its tolerance is, and with what
``n`` and magnitude; where a bound is instead measured, its docstring or comment says on what.
This module holds no tests.
"""

from __future__ import annotations

U32 = 2.0**-24
"""float32 unit roundoff (24-bit significand)."""

U16 = 2.0**-11
"""float16 unit roundoff (11-bit significand)."""

UBF16 = 2.0**-8
"""bfloat16 unit roundoff (8-bit significand)."""


def gamma(n: int, u: float = U32) -> float:
    """``n u / (1 - n u)``: the relative bound of ``n`` successive roundings (a sum or dot of ``n + 1`` terms
    is within ``gamma(n) * sum |terms|`` of the exact value)."""
    if n * u >= 1:
        raise ValueError(f"gamma({n}) is unbounded for u = {u}")
    return n * u / (1 - n * u)
