// Which shared-memory element each lane of a warp hands to ldmatrix, and which (row, column) each
// accumulator register of mma.sync holds: the layout math of the tensor-core score loop
// (csrc/code_ranking_kernel.h), host-testable (csrc/host_tests/host_logic_driver.cpp emulates one
// warp from the PTX ISA's fragment tables and checks the product).
//
// Both MMA shapes the loop uses read a 32-byte k-slab per row: m16n8k16 with 16-bit inputs (16
// values) and m16n8k8 with tf32 inputs (8 fp32 values). ldmatrix.x4 loads four 8x8 matrices of
// 16-bit elements (8 rows x 16 bytes each); lanes 8j..8j+7 give the row addresses of matrix j and
// register j of lane l receives bytes 4*(l%4)..4*(l%4)+3 of row l/4 of matrix j. Read as fp32, that
// is element l%4 of the row: the tf32 fragment layout, so one address map serves both shapes.
//
//   A (queries, 16 rows x 32 bytes): registers {a0a1, a2a3, a4a5, a6a7} (16-bit) or {a0, a1, a2, a3}
//     (tf32) = matrices (rows 0-7, bytes 0-15), (rows 8-15, bytes 0-15), (rows 0-7, bytes 16-31),
//     (rows 8-15, bytes 16-31).
//   B (codes, row-major along k = the "col" operand, two n8 tiles = 16 codes x 32 bytes): registers
//     {b0b1, b2b3} of codes 0-7, then of codes 8-15 = matrices (codes 0-7, bytes 0-15),
//     (codes 0-7, bytes 16-31), (codes 8-15, bytes 0-15), (codes 8-15, bytes 16-31).
//   C (16 x 8 fp32): register r of lane l holds row l/4 + 8*(r/2), column 2*(l%4) + r%2.
#pragma once

#include "host_device.h"

namespace pacofr {
namespace mma {

constexpr int kWarpSize = 32;
constexpr int kSlabBytes = 32;  // bytes of k per MMA step and row
constexpr int kTileRows = 16;   // m of one MMA
constexpr int kTileCodes = 8;   // n of one MMA

struct TileCoord {
  int row;   // row (query or code) inside the operand tile
  int byte;  // byte offset inside the row's 32-byte slab (A, B) or column (C)
};

// Row and byte offset of the address lane `lane` gives ldmatrix.x4 for the A operand (16 x 32 bytes).
PACOFR_HD TileCoord a_ldmatrix_source(int lane) {
  const int matrix = lane >> 3, row = lane & 7;
  return {row + 8 * (matrix & 1), 16 * (matrix >> 1)};
}

// Same for the B operand of two adjacent n8 tiles (16 codes x 32 bytes).
PACOFR_HD TileCoord b_ldmatrix_source(int lane) {
  const int matrix = lane >> 3, row = lane & 7;
  return {row + 8 * (matrix >> 1), 16 * (matrix & 1)};
}

// Row and column (`byte` holds the column) of accumulator register `reg` (0..3) of lane `lane`.
PACOFR_HD TileCoord accumulator_position(int lane, int reg) {
  return {(lane >> 2) + 8 * (reg >> 1), 2 * (lane & 3) + (reg & 1)};
}

}  // namespace mma
}  // namespace pacofr
