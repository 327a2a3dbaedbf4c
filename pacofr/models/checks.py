"""Argument checks of the models' public entry points: each error names the argument and what was expected.

(The ops validate their own arguments in the private ``pacofr.ops._checks``; the models keep these
few checks here rather than import a private module.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, value: object, *, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None) -> torch.Tensor:
    """``value`` if it is a tensor of ``ndim`` dimensions with a dtype among ``dtypes`` (None: any);
    TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    allowed = tuple(dtypes) if dtypes is not None else ()
    if allowed and value.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in ({', '.join(map(_dtype_name, allowed))}), "
                        f"got {_dtype_name(value.dtype)}")
    return value


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an int (a bool is not) in [``low``, ``high``]; TypeError / ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if low is not None and value < low else f"<= {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; ValueError listing them otherwise."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return str(value)
