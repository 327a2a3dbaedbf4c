// Division of 32-bit unsigned values by a divisor fixed at launch, by multiply-high and shift
// (Granlund & Montgomery's round-up method): the patch kernels split flat indices into
// (channel, pixel row, pixel column) and (image, position) without 64-bit software division.
// Exact for every numerator and divisor in [1, 2^31) (host-tested).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace pacofr {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;

  // divisor in [1, 2^31); the callers check their sizes first.
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t{1} << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }

  PACOFR_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return static_cast<uint32_t>((static_cast<uint64_t>(high) + n) >> shift);
  }

  PACOFR_HD uint32_t mod(uint32_t n, uint32_t quotient) const { return n - quotient * divisor; }
};

}  // namespace pacofr
