// Which code-ranking kernel a launch uses (host-testable; csrc/code_ranking.cu applies it).
//
// The Hopper kernel (csrc/code_ranking_sm90.h, wgmma) needs a compute capability 9.0 device, the
// sm_90a image of it loaded (a fatbin built without "9.0a" only has trapping stubs), 16-bit inputs,
// and its resident query tile within the block's shared-memory limit; anything else runs the
// mma.sync kernel (csrc/code_ranking_kernel.h). kWgmmaDispatch keeps the Hopper kernel switched
// off by default until the GPU tests (tests/test_cuda_ops_gpu.py) have passed on it: it has not run
// yet. The environment variable PACOFR_CUDA_WGMMA=1 switches it on for a process (those tests).
#pragma once

#include <cstddef>
#include <cstdint>

#include "host_device.h"
#include "launch_limits.h"

namespace pacofr {
namespace ranking {

constexpr bool kWgmmaDispatch = false;

enum class RankingKernel : int { kMmaSync = 0, kWgmma = 1 };

struct DispatchFacts {
  int major = 0;
  int minor = 0;
  bool sixteen_bit = false;     // fp16 / bf16 inputs
  bool wgmma_image = false;     // the loaded image of the Hopper kernel is the sm_90a one
  size_t static_shared = 0;     // of the Hopper kernel (cudaFuncGetAttributes)
  size_t wgmma_dynamic = 0;     // its dynamic shared memory for this D (wgmma_shared_bytes)
  size_t shared_limit = 0;      // cudaDevAttrMaxSharedMemoryPerBlockOptin
};

// Whether the Hopper kernel may be chosen: kWgmmaDispatch, or PACOFR_CUDA_WGMMA=1 (value given).
inline bool wgmma_enabled(const char* environment_value) {
  return kWgmmaDispatch || (environment_value != nullptr && environment_value[0] == '1' && environment_value[1] == '\0');
}

PACOFR_HD RankingKernel choose_kernel(const DispatchFacts& facts, bool wgmma_enabled) {
  const bool hopper = facts.major == 9 && facts.minor == 0;
  const bool fits = launch::shared_memory_fits(facts.static_shared, facts.wgmma_dynamic, facts.shared_limit);
  return wgmma_enabled && hopper && facts.sixteen_bit && facts.wgmma_image && fits ? RankingKernel::kWgmma
                                                                                   : RankingKernel::kMmaSync;
}

}  // namespace ranking
}  // namespace pacofr
