// The code ranking shared by nearest_token and soft_assign: the k best codes of every query row by
// an fp32 score of the dot product (csrc/ranking_epilogue.h), on tensor cores. Host API without
// torch types, so the kernel translation units compile without the torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "rank_keys.h"

namespace pacofr {
namespace ranking {

enum class InputType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// How fp32 inputs are multiplied (16-bit inputs always use the 16-bit MMA: exact products).
enum class Precision : int {
  kIeee = 0,    // SIMT fp32 FMAs: exact IEEE fp32 products and sums
  kTf32 = 1,    // one m16n8k8 TF32 MMA: inputs rounded to 10-bit mantissas (about 1e-3 relative)
  kTf32x3 = 2,  // 3xTF32 (big*big + big*small + small*big): about fp32 accuracy on tensor cores
};

struct Problem {
  const void* queries = nullptr;  // (n_rows, dim) row-major
  const void* codes = nullptr;    // (n_codes, dim) row-major
  // Both: 16-byte aligned, dim * element size a multiple of 16 bytes (the caller zero-pads D).
  const float* code_term = nullptr;         // (n_codes,) see ranking_epilogue.h
  const float* row_squared_norm = nullptr;  // (n_rows,) ||x||^2 in fp32; with `distances` only
  float* distances = nullptr;               // (n_rows, k_out) nearest_token distances, or nullptr
  void* indices = nullptr;                  // (n_rows, k_out) int64 or int32, best first
  bool int64_indices = true;
  int64_t n_rows = 0;
  int64_t n_codes = 0;  // 1 .. 2^31 - 1
  int64_t dim = 0;      // padded D
  int k_out = 1;        // 1 .. min(16, n_codes)
  bool cosine = false;
  rank::NanRank nan_rank = rank::NanRank::kLast;
  InputType input = InputType::kFloat32;
  Precision precision = Precision::kIeee;
};

// Bytes of one element of `input`.
size_t element_bytes(InputType input);

// Launch on `stream` on the current device. Returns an empty string, or why nothing was launched
// (device too old, grid or shared memory over the limits) or the launch error.
std::string rank_codes(const Problem& problem, cudaStream_t stream);

}  // namespace ranking
}  // namespace pacofr
