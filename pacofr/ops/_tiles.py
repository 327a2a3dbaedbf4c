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
    the query tile holds all of D (``block_d >= D``) and stays on chip across the code tiles;
    ``ctas_per_sm``: blocks per multiprocessor the register ceiling leaves room for (two let one
    block's per-tile epilogue overlap the other's MMAs)."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    resident: bool = False
    ctas_per_sm: int = 1

    @property
    def max_registers(self) -> int:
        return register_ceiling(self.num_warps * self.ctas_per_sm)


RESIDENT_MAX_D = 64
"""Largest D whose query tile stays resident for every operand type, from the static compile
(benchmarks.static, Triton 3.8): fp32 cast to bf16 at D = 256 asked for 192 KiB of shared memory
(its fp32 tile is converted on chip; sm_80 has 163)."""

RESIDENT_16BIT_MAX_D = 256
"""Largest D whose 16-bit query tile stays resident (128 rows: 64 KiB) beside two stages of 32-code
tiles, chosen with the cost budget (docs/kernels/cost-budget.md; estimates, Triton 3.8): with 4
warps, nearest_token k = 1 at N = 50176, K = 8192, D = 256 compiles without spills (about 240
registers, 80-97 KiB of shared memory) to two blocks per SM on sm_80 and sm_90, so one block's
per-tile epilogue overlaps the other's MMAs, and the query tile is read once per block instead of
once per 64 codes (the chunked loop: 0.92 ms estimated on sm_90, this one 0.34, floor 0.27). 8 warps
request each code term from twice as many warps; 64-code tiles need one block per SM or spill;
128-code tiles spill. Lists of 8 or more keys take 64 rows (128 spilled 8 B on sm_90 for
nearest_token k = 8 cosine)."""


def ranking_tiles(dtype: torch.dtype, input_precision: str, cast_bf16: bool, kp: int, dim: int,
                  interpreting: bool) -> RankingTiles:
    """Tiles for one call (``kp``: candidates kept per row, a power of two; ``dim``: D).

    16-bit inputs (bf16/fp16) up to :data:`RESIDENT_16BIT_MAX_D` keep the whole query tile on chip
    (128 rows, 64 for lists of 8 or more, 32-code tiles, 4 warps, two blocks per SM). Past it,
    16-bit operands (also fp32 cast to bf16) take 64-wide D chunks for the MMA, TF32 ones 32,
    unless D is at most :data:`RESIDENT_MAX_D`: then the query tile is resident too. The exact
    fp32 path multiplies on CUDA cores, where 64-row tiles and 16-wide D chunks keep its
    accumulator and candidate keys in registers (32-wide chunks spilled 8 B on sm_90 with the
    k = 1 running minimum). 3xTF32 holds a high and a low part of
    both operand tiles, so it takes 64-row tiles and 16-wide D chunks (128 rows spilled on sm_80,
    and 32-wide chunks 8 B with the k = 1 running minimum), never resident. Under Triton's
    interpreter big tiles run fastest.
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
    if dtype != torch.float32 and dim <= RESIDENT_16BIT_MAX_D:
        return RankingTiles(block_n=128 if kp <= 4 else 64, block_k=32, block_d=whole_d, num_warps=4, num_stages=2,
                            resident=True, ctas_per_sm=2)
    block_n = 128 if kp <= 4 else 64
    if dim <= RESIDENT_MAX_D:
        return RankingTiles(block_n=block_n, block_k=64, block_d=whole_d, num_warps=8, num_stages=3, resident=True)
    return RankingTiles(block_n=block_n, block_k=64, block_d=64 if sixteen_bit else 32, num_warps=8, num_stages=3)


def gather_block_d(elements: int, block_n: int, m_pad: int, dim: int, low: int = 8, high: int = 64) -> int:
    """D chunk of a (BLOCK_N, M_PAD, BLOCK_D) gather of candidate rows holding about ``elements`` values."""
    pow2_dim = next_power_of_two(dim)
    return max(min(low, pow2_dim), min(high, elements // (block_n * m_pad), pow2_dim))
