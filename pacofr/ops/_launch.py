"""What every fused launcher of :mod:`pacofr.ops` shares, written once.

The pattern every op follows: the public function validates its arguments and picks a backend
(:meth:`pacofr.ops._dispatch.Op.implementation`); each fused backend ("triton", "cuda") is a frozen
dataclass bundle of launch functions (one per kernel step: forward, backward, ...) that the op
module registers with one ``_register_backend(bundle)``; autograd Functions are shared by the
fused backends and take the bundle as an argument. The launchers allocate every output a kernel
fully overwrites through :func:`new_output`, so a test can poison all of them at one place.
"""

from __future__ import annotations

import torch

from pacofr import _triton


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer that a kernel writes in full (the tests replace it by a poisoned one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def next_power_of_two(value: int) -> int:
    """Smallest power of two >= ``value`` (1 for ``value <= 1``)."""
    return 1 << max(0, (value - 1).bit_length())


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-numerator // denominator)


def interpreting(device: torch.device) -> bool:
    """Whether Triton kernels on tensors of ``device`` run through Triton's interpreter (CPU tensors).

    Read through the module attribute, so ``benchmarks.static`` can switch it off while recording.
    """
    return device.type == "cpu" and _triton.interpreter_enabled()
