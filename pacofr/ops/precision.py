"""The precision of the score products in the codebook ops (``nearest_token``, ``soft_assign``) and losses.

Every codebook score is a dot product ``x . e`` accumulated in fp32. For fp32 inputs the
``precision`` setting says how the products are formed; 16-bit inputs always give exact products
of their values (16-bit x 16-bit fits fp32), so the setting does not apply to them.

=========  =====================================================================  ==================
setting    products of fp32 inputs                                                 GPU instruction
=========  =====================================================================  ==================
``ieee``   exact fp32 multiply-add (the default of every op)                        FMA (CUDA cores)
``tf32x3`` 3xTF32 split (``big * big + big * small + small * big``), error ~2^-21   3 TF32 MMAs
``tf32``   operands rounded to TF32 (10 mantissa bits), exact products              TF32 MMA
``bf16``   operands rounded to bfloat16 (7 mantissa bits), exact products           bf16 MMA
=========  =====================================================================  ==================

What a reduced precision changes: only the *scores*, hence which codes rank first when scores
are closer than the rounding error. Values computed from the chosen rows (``soft_assign``'s
weights and token, which are recomputed from the rows in fp32) are exact at every setting; the
distances ``nearest_token`` reports carry the score's error.

The torch reference implements each setting by rounding the fp32 operands exactly as the GPU does
(:func:`round_operands`) and multiplying in exact fp32, so the CPU reproduces the GPU's
semantics (``tf32x3`` is treated as exact fp32 there: its error is below fp32 accumulation noise).
Autocast does not reach the ops: their torch backends run under :func:`full_precision`, as the
fused kernels ignore it, so ``precision`` alone decides the rounding on every backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS: tuple[str, ...] = ("ieee", "tf32x3", "tf32", "bf16")

_TF32_DROPPED_BITS = 13  # fp32 has 23 mantissa bits, TF32 keeps 10


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; ValueError naming the choices otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return str(precision)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to TF32 (10 mantissa bits, ties away from zero, as ``cvt.rna.tf32.f32``).

    Non-finite values pass unchanged; the result is an fp32 tensor whose low 13 mantissa bits are 0.
    """
    bits = x.float().contiguous().view(torch.int32)
    half = 1 << (_TF32_DROPPED_BITS - 1)
    rounded = ((bits + half) >> _TF32_DROPPED_BITS) << _TF32_DROPPED_BITS  # magnitude rounding on sign-magnitude bits
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x.float()).view_as(x)


def round_operands(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The fp32 values the products use at ``precision`` (16-bit and ``ieee``/``tf32x3`` inputs unchanged)."""
    if x.dtype != torch.float32 or precision in ("ieee", "tf32x3"):
        return x
    if precision == "bf16":
        return x.to(torch.bfloat16).to(torch.float32)
    return round_to_tf32(x)


def is_reduced(precision: str, dtype: torch.dtype) -> bool:
    """Whether ``precision`` changes the products of inputs of ``dtype`` (only fp32 inputs, only tf32/bf16)."""
    return dtype == torch.float32 and precision in ("tf32", "bf16")


def kernel_precision(precision: str, dtype: torch.dtype) -> tuple[str, bool]:
    """How a fused kernel realises ``precision`` for inputs of ``dtype``: ``(input_precision, cast_bf16)``.

    ``input_precision`` is Triton's / the CUDA kernels' ``"ieee" | "tf32" | "tf32x3"`` for fp32
    operands; ``cast_bf16``: round fp32 tiles to bf16 before the MMA. 16-bit inputs: ``("ieee", False)``.
    """
    if dtype != torch.float32:
        return "ieee", False
    if precision == "bf16":
        return "ieee", True
    return precision, False


def cuda_input_precision(op: str, precision: str, dtype: torch.dtype) -> str:
    """The ``input_precision`` the CUDA kernels take for ``precision``; ValueError for fp32 + ``"bf16"``,
    which they do not implement (the triton backend does, and ``auto`` tries it first)."""
    input_precision, cast_bf16 = kernel_precision(precision, dtype)
    if cast_bf16:
        raise ValueError(f"{op}: the cuda backend has no precision='bf16' path for float32 inputs; use "
                         "backend='triton', a TF32 precision, or bfloat16 inputs")
    return input_precision


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device``'s type for the block; inputs must be cast to fp32 by the caller."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
