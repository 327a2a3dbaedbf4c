// Warp-wide sums in one fixed butterfly order (the same result on every run and in every lane).
#pragma once

namespace pacofr {

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

}  // namespace pacofr
