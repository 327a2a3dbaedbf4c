"""Launch shapes of the Triton codebook kernels, in one place.

The ranking tile loop (:mod:`pacofr.kernels._ranking`) is shared by ``nearest_token`` and the
``soft_assign`` forward, so one table gives both their tiles. Every choice here is checked by
``python -m benchmarks.static`` (CI): it compiles every launch the ops can make for sm_80 and
sm_90 and fails on register spills, shared memory over the limit, or a 16-bit / TF32 dot without
tensor-core instructions. None has been timed on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pacofr.ops._launch import next_power_of_two

REGISTERS_PER_SM = 65536


def register_ceiling(num_warps: int) -> int:
    """``maxnreg`` for a kernel of ``num_warps`` warps: every register one block may use (at most 255).

    Without it ptxas may aim at two blocks per multiprocessor and spill registers to reach that
    (seen on sm_90 for the exact-fp32 ranking loop: 128 registers and local-memory spills, against
    152 registers and none with the ceiling raised).
    """
    return min(255, REGISTERS_PER_SM // (32 * num_warps))


@dataclass(frozen=True)
class RankingTiles:
    """Tiles and launch settings of the ranking loop: rows x codes per tile, D per chunk; ``resident``:
    the query tile holds all of D (``block_d >= D``) and stays on chip across the code tiles."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    resident: bool = False

    @property
    def max_registers(self) -> int:
        return register_ceiling(self.num_warps)


RESIDENT_MAX_D = 64
"""Largest D whose query tile stays resident, from the static compile (benchmarks.static, Triton 3.8):
at D = 64 every k = 1 / k = 8 variant compiles without spills (at most 216 registers, 82 KiB of
shared memory); at D = 256 (128 rows, 3 stages) the k = 1 kernel spilled 16-40 B on sm_80 and
fp32 cast to bf16 asked for 192 KiB of shared memory (sm_80 has 163), so D = 256 keeps the
chunked loop until a smaller resident tile is chosen with the cost budget."""


def ranking_tiles(dtype: torch.dtype, input_precision: str, cast_bf16: bool, kp: int, dim: int,
                  interpreting: bool) -> RankingTiles:
    """Tiles for one call (``kp``: candidates kept per row, a power of two; ``dim``: D).

    16-bit operands (bf16/fp16 inputs, or fp32 cast to bf16) take 64-wide D chunks for the MMA,
    TF32 ones 32, unless D is at most :data:`RESIDENT_MAX_D`: then the whole query tile is
    loaded once per program (the code tiles stream past it). The exact fp32 path multiplies on
    CUDA cores, where 64-row tiles and 16-wide D chunks keep its accumulator and candidate keys in
    registers (32-wide chunks spilled 8 B on sm_90 with the k = 1 running minimum). 3xTF32
    holds a high and a low part of both operand tiles, so it takes 64-row tiles and 16-wide D
    chunks (128 rows spilled on sm_80, and 32-wide chunks 8 B with the k = 1 running minimum),
    never resident. Under Triton's interpreter big tiles run fastest.
    """
    whole_d = max(16, next_power_of_two(dim))
    if interpreting:
        if dim <= RESIDENT_MAX_D:  # the CPU tests run both loops: small D resident, larger D chunked
            return RankingTiles(block_n=64, block_k=64, block_d=whole_d, num_warps=4, num_stages=1, resident=True)
        return RankingTiles(block_n=64, block_k=64, block_d=32, num_warps=4, num_stages=1)
    sixteen_bit = dtype != torch.float32 or cast_bf16
    if not sixteen_bit and input_precision == "ieee":
        return RankingTiles(block_n=64, block_k=64, block_d=16, num_warps=8, num_stages=3)
    if input_precision == "tf32x3" and not sixteen_bit:
        return RankingTiles(block_n=64, block_k=64, block_d=16, num_warps=8, num_stages=3)
    block_n = 128 if kp <= 4 else 64
    if dim <= RESIDENT_MAX_D:
        return RankingTiles(block_n=block_n, block_k=64, block_d=whole_d, num_warps=8, num_stages=3, resident=True)
    return RankingTiles(block_n=block_n, block_k=64, block_d=64 if sixteen_bit else 32, num_warps=8, num_stages=3)


def gather_block_d(elements: int, block_n: int, m_pad: int, dim: int, low: int = 8, high: int = 64) -> int:
    """D chunk of a (BLOCK_N, M_PAD, BLOCK_D) gather of candidate rows holding about ``elements`` values."""
    pow2_dim = next_power_of_two(dim)
    return max(min(low, pow2_dim), min(high, elements // (block_n * m_pad), pow2_dim))
