"""Full-precision regions inside bf16 autocast (lookups, norms and softmax run in fp32)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device``'s type for the block; inputs must be cast to fp32 by the caller."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
