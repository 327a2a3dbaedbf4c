// torch.ops.pacofr_cuda.nearest_token: the k nearest codes of every query row (CUDA backend of
// pacofr.ops.nearest_token; semantics in pacofr/ops/nearest_token.py). The ranking runs on the
// shared tensor-core score loop (csrc/code_ranking.h); this file validates the arguments, pads D
// for 16-byte loads, computes the rows' ||x||^2 and launches.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "code_ranking.h"
#include "dtype_dispatch.h"
#include "op_checks.h"
#include "warp_reduce.h"

namespace pacofr {
namespace {

constexpr const char* kOp = "nearest_token";
constexpr int kMaxK = 16;
constexpr int kNormWarps = 8;

// ||x_r||^2 in fp32, one warp per row.
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kNormWarps) row_squared_norms_kernel(const scalar_t* __restrict__ x,
                                                                             float* __restrict__ out, int64_t rows,
                                                                             int64_t dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const scalar_t* values = x + row * dim;
  float sum = 0.0f;
  for (int64_t d = threadIdx.x & 31; d < dim; d += 32) {
    const float v = static_cast<float>(values[d]);
    sum = fmaf(v, v, sum);
  }
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) out[row] = sum;
}

void validate(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& code_term,
              const std::string& input_precision, const at::Tensor& distances, const at::Tensor& indices) {
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, kOp, ": codebook must be 2-D (K, D), got shape ", codebook.sizes());
  checks::float_dtype(kOp, "x", x);
  TORCH_CHECK_TYPE(codebook.scalar_type() == x.scalar_type(), kOp, ": codebook has dtype ", codebook.scalar_type(),
                   " but x has ", x.scalar_type());
  const int64_t n_rows = x.size(0), dim = x.size(1), n_codes = codebook.size(0);
  TORCH_CHECK_VALUE(dim >= 1 && codebook.size(1) == dim, kOp, ": x has D=", dim, " but codebook has D=",
                    codebook.size(1), " (D >= 1)");
  TORCH_CHECK_VALUE(n_codes >= 1, kOp, ": codebook must have at least one row (K >= 1)");
  checks::fits_int32(kOp, "K (codebook rows)", n_codes);
  checks::fits_int32(kOp, "D", dim);
  checks::dtype_is(kOp, "code_term", code_term, at::kFloat);
  checks::shape_is(kOp, "code_term", code_term, {n_codes});
  checks::precision(kOp, input_precision);
  checks::dtype_is(kOp, "distances", distances, at::kFloat);
  TORCH_CHECK_VALUE(distances.dim() == 2 && distances.size(0) == n_rows, kOp,
                    ": distances must be (N, k) with N = ", n_rows, ", got shape ", distances.sizes());
  const int64_t k = distances.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxK && k <= n_codes, kOp, ": k (distances.size(1)) must lie in [1, min(K, ",
                    kMaxK, ")] = [1, ", std::min<int64_t>(n_codes, kMaxK), "], got ", k);
  checks::contiguous(kOp, "distances", distances);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, kOp,
                   ": indices must be int64 or int32, got ", indices.scalar_type());
  checks::shape_is(kOp, "indices", indices, distances.sizes());
  checks::contiguous(kOp, "indices", indices);
  checks::same_device(kOp, {{"x", &x}, {"codebook", &codebook}, {"code_term", &code_term},
                            {"distances", &distances}, {"indices", &indices}});
  checks::needs_cuda(kOp, "x", x);
}

// Fills the preallocated (N, k) outputs. input_precision: "ieee" | "tf32" | "tf32x3" for fp32
// inputs (ignored for fp16/bf16, which always use the 16-bit MMA).
void nearest_token_op(const at::Tensor& x_in, const at::Tensor& codebook_in, const at::Tensor& code_term_in,
                      bool cosine, c10::string_view input_precision, at::Tensor distances, at::Tensor indices) {
  const std::string precision_name(input_precision);
  validate(x_in, codebook_in, code_term_in, precision_name, distances, indices);
  if (x_in.size(0) == 0) return;  // a zero-sized grid is an invalid launch configuration

  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = checks::padded_rows(x_in);
  const at::Tensor codebook = checks::padded_rows(codebook_in);
  const at::Tensor code_term = checks::aligned_contiguous(code_term_in);
  const int64_t n_rows = x.size(0);
  at::Tensor squared_norms = at::empty({n_rows}, x.options().dtype(at::kFloat));
  dispatch_floats(x.scalar_type(), "x", [&](auto tag) {
    using scalar_t = decltype(tag);
    row_squared_norms_kernel<scalar_t>
        <<<checks::grid(kOp, launch::ceil_div(n_rows, kNormWarps)), 32 * kNormWarps, 0, stream>>>(
            x.data_ptr<scalar_t>(), squared_norms.data_ptr<float>(), n_rows, x.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  ranking::Problem problem;
  problem.queries = x.data_ptr();
  problem.codes = codebook.data_ptr();
  problem.code_term = code_term.data_ptr<float>();
  problem.row_squared_norm = squared_norms.data_ptr<float>();
  problem.distances = distances.data_ptr<float>();
  problem.indices = indices.data_ptr();
  problem.int64_indices = indices.scalar_type() == at::kLong;
  problem.n_rows = n_rows;
  problem.n_codes = codebook.size(0);
  problem.dim = x.size(1);
  problem.k_out = static_cast<int>(distances.size(1));
  problem.cosine = cosine;
  problem.nan_rank = rank::NanRank::kLast;
  problem.input = checks::input_type(x.scalar_type());
  problem.precision = checks::precision(kOp, precision_name);
  const std::string failure = ranking::rank_codes(problem, stream);
  TORCH_CHECK(failure.empty(), kOp, ": ", failure);
}

}  // namespace
}  // namespace pacofr

TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) {
  m.def("nearest_token(Tensor x, Tensor codebook, Tensor code_term, bool cosine, str input_precision, "
        "Tensor(a!) distances, Tensor(b!) indices) -> ()");
}

TORCH_LIBRARY_IMPL(pacofr_cuda, CUDA, m) { m.impl("nearest_token", &pacofr::nearest_token_op); }
// CPU tensors get the same validation and then "needs CUDA tensors" (testable without a GPU).
TORCH_LIBRARY_IMPL(pacofr_cuda, CPU, m) { m.impl("nearest_token", &pacofr::nearest_token_op); }
