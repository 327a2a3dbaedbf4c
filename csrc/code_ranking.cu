// Launcher of the code-ranking kernel (csrc/code_ranking_kernel.h): picks the math for the input
// type and precision, the list length KP for k, the resident or streaming query tile for the
// shared memory the device has, checks the launch limits, and launches. No torch headers here.
#include "code_ranking.h"

#include <sstream>

#include "code_ranking_kernel.h"
#include "launch_limits.h"

namespace pacofr {
namespace ranking {
namespace {

using KernelFunction = void (*)(KernelArgs);

template <class Math>
KernelFunction kernel_for_kp(int kp) {
  switch (kp) {
    case 1: return rank_codes_kernel<Math, 1>;
    case 2: return rank_codes_kernel<Math, 2>;
    case 4: return rank_codes_kernel<Math, 4>;
    case 8: return rank_codes_kernel<Math, 8>;
    default: return rank_codes_kernel<Math, 16>;
  }
}

KernelFunction select_kernel(InputType input, Precision precision, int kp) {
  switch (input) {
    case InputType::kFloat16: return kernel_for_kp<Mma16Bit<false>>(kp);
    case InputType::kBFloat16: return kernel_for_kp<Mma16Bit<true>>(kp);
    case InputType::kFloat32: break;
  }
  switch (precision) {
    case Precision::kTf32: return kernel_for_kp<MmaTf32<false>>(kp);
    case Precision::kTf32x3: return kernel_for_kp<MmaTf32<true>>(kp);
    case Precision::kIeee: break;
  }
  return kernel_for_kp<SimtFp32>(kp);
}

int list_length_for(int k) {
  int kp = 1;
  while (kp < k) kp <<= 1;
  return kp;
}

std::string cuda_failure(const char* what, cudaError_t err) {
  cudaGetLastError();  // clear a non-sticky error so later calls are unaffected
  return std::string(what) + ": " + cudaGetErrorString(err);
}

}  // namespace

size_t element_bytes(InputType input) { return input == InputType::kFloat32 ? 4 : 2; }

std::string rank_codes(const Problem& problem, cudaStream_t stream) {
  int device = 0, major = 0, shared_limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
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

  const int kp = list_length_for(problem.k_out);
  const int rows = block_rows_for(kp);
  const int64_t blocks = launch::ceil_div(problem.n_rows, rows);
  if (!launch::grid_fits(blocks)) {
    std::ostringstream msg;
    msg << "code ranking: " << problem.n_rows << " query rows need " << blocks << " blocks of " << rows
        << " rows; CUDA allows at most " << launch::kMaxGridX;
    return msg.str();
  }
  const KernelFunction kernel = select_kernel(problem.input, problem.precision, kp);
  cudaFuncAttributes attributes{};
  err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return cuda_failure("code ranking: no kernel image for this device", err);

  const size_t limit = static_cast<size_t>(shared_limit);
  const size_t resident = static_cast<size_t>(resident_shared_bytes(rows, dim_bytes));
  const size_t streaming = static_cast<size_t>(streaming_shared_bytes(rows));
  const bool keep_queries = launch::shared_memory_fits(attributes.sharedSizeBytes, resident, limit);
  const size_t dynamic = keep_queries ? resident : streaming;
  if (!launch::shared_memory_fits(attributes.sharedSizeBytes, dynamic, limit)) {
    std::ostringstream msg;
    msg << "code ranking: needs " << attributes.sharedSizeBytes << " static + " << dynamic
        << " dynamic bytes of shared memory per block; device " << device << " allows " << limit;
    return msg.str();
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic));
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
  args.resident = keep_queries;
  args.nan_rank = problem.nan_rank;
  kernel<<<static_cast<unsigned int>(blocks), kThreads, dynamic, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess) return std::string("code ranking: launch failed: ") + cudaGetErrorString(err);
  return std::string();
}

}  // namespace ranking
}  // namespace pacofr
