"""Full-precision regions inside bf16 autocast (lookups, norms and softmax run in fp32).

:func:`full_precision` lives in :mod:`pacofr.ops.precision` (the ops' torch backends use it too);
the model code imports it from here.
"""

from __future__ import annotations

from pacofr.ops.precision import full_precision

__all__ = ["full_precision"]
