// Launcher of the code-ranking kernels: the mma.sync kernel (csrc/code_ranking_kernel.h) with the
// math for the input type and precision, the list length KP for k, the resident or streaming query
// tile for the shared memory the device has; or, where csrc/ranking_dispatch.h chooses it (only with
// PACOFR_CUDA_WGMMA=1 until the GPU tests ran it), the sm_90a wgmma kernel
// (csrc/code_ranking_sm90.h). Checks the launch limits and launches. No torch headers here.
#include "code_ranking.h"

#include <cstdlib>
#include <sstream>

#include "code_ranking_kernel.h"
#include "code_ranking_sm90.h"
#include "launch_limits.h"
#include "ranking_dispatch.h"

namespace pacofr {
namespace ranking {
namespace {

using KernelFunction = void (*)(KernelArgs);

template <class Math, bool kResident>
KernelFunction kernel_for_kp(int kp) {
  switch (kp) {
    case 1: return rank_codes_kernel<Math, 1, kResident>;
    case 2: return rank_codes_kernel<Math, 2, kResident>;
    case 4: return rank_codes_kernel<Math, 4, kResident>;
    case 8: return rank_codes_kernel<Math, 8, kResident>;
    default: return rank_codes_kernel<Math, 16, kResident>;
  }
}

template <class Math>
KernelFunction kernel_for(int kp, bool resident) {
  return resident ? kernel_for_kp<Math, true>(kp) : kernel_for_kp<Math, false>(kp);
}

KernelFunction select_kernel(InputType input, Precision precision, int kp, bool resident) {
  switch (input) {
    case InputType::kFloat16: return kernel_for<Mma16Bit<false>>(kp, resident);
    case InputType::kBFloat16: return kernel_for<Mma16Bit<true>>(kp, resident);
    case InputType::kFloat32: break;
  }
  switch (precision) {
    case Precision::kTf32: return kernel_for<MmaTf32<false>>(kp, resident);
    case Precision::kTf32x3: return kernel_for<MmaTf32<true>>(kp, resident);
    case Precision::kIeee: break;
  }
  return kernel_for<SimtFp32>(kp, resident);
}

std::string cuda_failure(const char* what, cudaError_t err) {
  cudaGetLastError();  // clear a non-sticky error so later calls are unaffected
  return std::string(what) + ": " + cudaGetErrorString(err);
}

template <bool kBFloat16>
KernelFunction wgmma_kernel_for(int kp) {
  switch (kp) {
    case 1: return rank_codes_wgmma_kernel<kBFloat16, 1>;
    case 2: return rank_codes_wgmma_kernel<kBFloat16, 2>;
    case 4: return rank_codes_wgmma_kernel<kBFloat16, 4>;
    case 8: return rank_codes_wgmma_kernel<kBFloat16, 8>;
    default: return rank_codes_wgmma_kernel<kBFloat16, 16>;
  }
}

// 1 in the sm_90a image, 0 in the others (where the wgmma kernel only traps).
__global__ void wgmma_image_probe(int* out) { *out = PACOFR_HAS_WGMMA; }

// Whether the image the runtime loaded on `device` is the sm_90a one: a one-thread probe, run once
// per device and remembered.
bool wgmma_image_loaded(int device, cudaStream_t stream, std::string& failure) {
  static int known[64] = {};  // 0 unknown, 1 no, 2 yes
  if (device >= 0 && device < 64 && known[device] != 0) return known[device] == 2;
  int* flag = nullptr;
  int host = 0;
  cudaError_t err = cudaMalloc(&flag, sizeof(int));
  if (err == cudaSuccess) {
    wgmma_image_probe<<<1, 1, 0, stream>>>(flag);
    err = cudaGetLastError();
    if (err == cudaSuccess) err = cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    cudaFree(flag);
  }
  if (err != cudaSuccess) {
    failure = cuda_failure("code ranking: probing the sm_90a image failed", err);
    return false;
  }
  if (device >= 0 && device < 64) known[device] = host == 1 ? 2 : 1;
  return host == 1;
}

struct Plan {
  KernelFunction kernel = nullptr;
  int64_t blocks = 0;
  size_t dynamic = 0;  // bytes of dynamic shared memory
};

int list_length_for(int k) {
  int kp = 1;
  while (kp < k) kp <<= 1;
  return kp;
}

}  // namespace

size_t element_bytes(InputType input) { return input == InputType::kFloat32 ? 4 : 2; }

std::string rank_codes(const Problem& problem, cudaStream_t stream) {
  int device = 0, major = 0, minor = 0, shared_limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return cuda_failure("code ranking: reading the device attributes failed", err);
  if (major < 8) {
    std::ostringstream msg;
    msg << "the cuda backend's code ranking needs compute capability 8.0 or newer (mma.sync, cp.async); device "
        << device << " has " << major << ".x";
    return msg.str();
  }
  const int64_t dim_bytes = problem.dim * static_cast<int64_t>(element_bytes(problem.input));
  if (dim_bytes % 16 != 0 || dim_bytes > 2147483647) return "code ranking: D * element size must be a multiple of 16 bytes below 2^31";
  if (reinterpret_cast<uintptr_t>(problem.code_term) % 16 != 0) return "code ranking: code_term must be 16-byte aligned";
  const int kp = list_length_for(problem.k_out);
  const size_t limit = static_cast<size_t>(shared_limit);
  const bool sixteen_bit = problem.input != InputType::kFloat32;

  Plan plan;
  const bool wgmma_allowed = wgmma_enabled(std::getenv("PACOFR_CUDA_WGMMA"));
  if (wgmma_allowed && major == 9 && minor == 0 && sixteen_bit) {
    std::string failure;
    DispatchFacts facts;
    facts.major = major;
    facts.minor = minor;
    facts.sixteen_bit = sixteen_bit;
    facts.wgmma_image = wgmma_image_loaded(device, stream, failure);
    if (!failure.empty()) return failure;
    const KernelFunction kernel = problem.input == InputType::kBFloat16 ? wgmma_kernel_for<true>(kp)
                                                                       : wgmma_kernel_for<false>(kp);
    cudaFuncAttributes attributes{};
    err = cudaFuncGetAttributes(&attributes, kernel);
    if (err != cudaSuccess) return cuda_failure("code ranking: no wgmma kernel image for this device", err);
    facts.static_shared = attributes.sharedSizeBytes;
    facts.wgmma_dynamic = static_cast<size_t>(wgmma_shared_bytes(dim_bytes));
    facts.shared_limit = limit;
    if (choose_kernel(facts, wgmma_allowed) == RankingKernel::kWgmma) {
      plan = {kernel, launch::ceil_div(problem.n_rows, kWgmmaRows), facts.wgmma_dynamic};
    }
  }
  if (plan.kernel == nullptr) {
    const int rows = block_rows_for(kp);
    cudaFuncAttributes attributes{};  // static shared memory: the same for both query-tile modes
    err = cudaFuncGetAttributes(&attributes, select_kernel(problem.input, problem.precision, kp, true));
    if (err != cudaSuccess) return cuda_failure("code ranking: no kernel image for this device", err);
    const size_t resident = static_cast<size_t>(resident_shared_bytes(rows, dim_bytes));
    const size_t streaming = static_cast<size_t>(streaming_shared_bytes(rows));
    const bool keep_queries = launch::shared_memory_fits(attributes.sharedSizeBytes, resident, limit);
    plan = {select_kernel(problem.input, problem.precision, kp, keep_queries), launch::ceil_div(problem.n_rows, rows),
            keep_queries ? resident : streaming};
    if (!launch::shared_memory_fits(attributes.sharedSizeBytes, plan.dynamic, limit)) {
      std::ostringstream msg;
      msg << "code ranking: needs " << attributes.sharedSizeBytes << " static + " << plan.dynamic
          << " dynamic bytes of shared memory per block; device " << device << " allows " << limit;
      return msg.str();
    }
  }
  if (!launch::grid_fits(plan.blocks)) {
    std::ostringstream msg;
    msg << "code ranking: " << problem.n_rows << " query rows need " << plan.blocks
        << " blocks; CUDA allows at most " << launch::kMaxGridX;
    return msg.str();
  }
  err = cudaFuncSetAttribute(plan.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.dynamic));
  if (err != cudaSuccess) return cuda_failure("code ranking: setting the dynamic shared memory size failed", err);

  KernelArgs args{};
  args.queries = static_cast<const uint8_t*>(problem.queries);
  args.codes = static_cast<const uint8_t*>(problem.codes);
  args.code_term = problem.code_term;
  args.row_squared_norm = problem.row_squared_norm;
  args.distances = problem.distances;
  args.indices = problem.indices;
  args.n_rows = problem.n_rows;
  args.n_codes = static_cast<int32_t>(problem.n_codes);
  args.dim_bytes = static_cast<int32_t>(dim_bytes);
  args.k_out = problem.k_out;
  args.int64_indices = problem.int64_indices;
  args.cosine = problem.cosine;
  args.nan_rank = problem.nan_rank;
  plan.kernel<<<static_cast<unsigned int>(plan.blocks), kThreads, plan.dynamic, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("code ranking: launch failed: ") + cudaGetErrorString(err);
  return std::string();
}

}  // namespace ranking
}  // namespace pacofr
