// Launch-limit arithmetic shared by every CUDA entry point, host-testable: grid dimensions must fit
// CUDA's limits before they are narrowed to unsigned int, and a kernel's static plus dynamic
// shared memory must fit the device's per-block opt-in limit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"

namespace pacofr {
namespace launch {

constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;  // above this a kernel must opt in

PACOFR_HD int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

PACOFR_HD bool grid_fits(int64_t x, int64_t y = 1, int64_t z = 1) {
  return x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridYZ && z >= 1 && z <= kMaxGridYZ;
}

// Whether `static_bytes` (from cudaFuncGetAttributes) plus `dynamic_bytes` fit `block_limit`
// (cudaDevAttrMaxSharedMemoryPerBlockOptin).
PACOFR_HD bool shared_memory_fits(size_t static_bytes, size_t dynamic_bytes, size_t block_limit) {
  return dynamic_bytes <= block_limit && static_bytes <= block_limit - dynamic_bytes;
}

}  // namespace launch
}  // namespace pacofr
