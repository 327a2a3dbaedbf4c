// Multi-candidate soft assignment and codebook statistics: CUDA backend of pacofr.ops.soft_assign
// (conventions and semantics in pacofr/ops/soft_assign.py).
//
//   soft_assign           ranking of the codes by 2 q.e - ||e||^2 (l2) or q.e / max(||e||, eps)
//                         (cosine) on the shared tensor-core score loop (csrc/code_ranking.h; NaN
//                         ranks as the lowest value, ties to the smaller index), then one warp per
//                         row recomputes the m chosen scores exactly from the rows, applies the
//                         softmax of (c - max c) / tau and writes the weighted sum (or the top-1 row).
//   soft_assign_backward  one warp per row: g_w = <dtoken, e_j> (+ dweights), softmax backward,
//                         the gradient of q (written once) and of the m chosen rows: fp32 atomicAdd
//                         into a K x D buffer, or (deterministic) per-pair coefficients reduced per
//                         code by the fixed-order segment reduction (csrc/segment_reduce.h).
//   codebook_stats        counts (fp64, exact to 2^53) and sums (fp32) by atomics (fp64 for the
//                         counts) or by the segment reduction (fp64 sums); an index outside [0, K) is
//                         skipped on both paths.
//
// Conventions: q (N, D), codebook (K, D) of one float dtype; code_stat (K,) fp32 = ||e|| (cosine)
// or ||e||^2 (l2); tau a one-element fp32 tensor; 1 <= m <= min(16, K). Per-row kernels keep the m
// candidates in registers (templated on MP, the power of two >= m).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "code_ranking.h"
#include "dtype_dispatch.h"
#include "op_checks.h"
#include "segment_reduce.h"
#include "warp_reduce.h"

namespace pacofr {
namespace soft_assign {
namespace {

constexpr int kMaxM = 16;
constexpr int kRowWarps = 4;  // rows (one per warp) per block of the per-row kernels
constexpr int kAtomicThreads = 128;
constexpr int kSegmentColumns = 32;  // blockDim.x of the segment kernels
constexpr int kSegmentChunks = 4;    // blockDim.y: chunks per block

// ------------------------------------------------------------------------------------------
// per-row kernels (one warp per row)
// ------------------------------------------------------------------------------------------

template <typename scalar_t, int MP>
__global__ void __launch_bounds__(32 * kRowWarps) soft_assign_finish_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ codebook, const float* __restrict__ code_stat,
    const float* __restrict__ tau_ptr, const int64_t* __restrict__ indices, scalar_t* __restrict__ token,
    float* __restrict__ weights, float* __restrict__ raw_out, float* __restrict__ q_norm, int64_t n_rows, int64_t dim,
    int m, bool cosine, bool hard, float norm_eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const int lane = threadIdx.x & 31;
  const scalar_t* q_row = q + row * dim;
  int32_t code[MP];  // K < 2^31 (checked): half the registers of row pointers
  float part[MP];
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    code[j] = j < m ? static_cast<int32_t>(indices[row * m + j]) : 0;
    part[j] = 0.0f;
  }
  float squares = 0.0f;
  for (int64_t d = lane; d < dim; d += 32) {
    const float qv = static_cast<float>(q_row[d]);
    squares += qv * qv;
#pragma unroll
    for (int j = 0; j < MP; ++j) {
      if (j < m) {
        const float ev = static_cast<float>(codebook[code[j] * dim + d]);
        part[j] += cosine ? qv * ev : (qv - ev) * (qv - ev);
      }
    }
  }
  const float q_len = sqrtf(warp_sum(squares));
  const float tau = *tau_ptr;
  float raw[MP], top = -INFINITY;
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    const float total = warp_sum(part[j]);
    if (j < m) {
      raw[j] = cosine ? total / fmaxf(q_len, norm_eps) / fmaxf(code_stat[code[j]], norm_eps) : -total;
      top = fmaxf(top, raw[j]);
    }
  }
  float w[MP], denominator = 0.0f;
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    w[j] = j < m ? expf((raw[j] - top) / tau) : 0.0f;
    denominator += w[j];
  }
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    w[j] /= denominator;
    if (lane == 0 && j < m) {
      weights[row * m + j] = w[j];
      raw_out[row * m + j] = raw[j];
    }
  }
  if (lane == 0) q_norm[row] = q_len;
  for (int64_t d = lane; d < dim; d += 32) {
    float acc = 0.0f;
    if (hard) {
      acc = static_cast<float>(codebook[code[0] * dim + d]);
    } else {
#pragma unroll
      for (int j = 0; j < MP; ++j) {
        if (j < m) acc += w[j] * static_cast<float>(codebook[code[j] * dim + d]);
      }
    }
    token[row * dim + d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, int MP>
__global__ void __launch_bounds__(32 * kRowWarps) soft_assign_backward_kernel(
    const scalar_t* __restrict__ g_token, const float* __restrict__ g_weights, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ codebook, const float* __restrict__ code_stat, const float* __restrict__ tau_ptr,
    const int64_t* __restrict__ indices, const float* __restrict__ weights, const float* __restrict__ raw,
    const float* __restrict__ q_norm, scalar_t* __restrict__ grad_q, float* __restrict__ grad_acc,
    float* __restrict__ coef, float* __restrict__ tau_parts, int64_t n_rows, int64_t dim, int m, bool cosine,
    float norm_eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const int lane = threadIdx.x & 31;
  const scalar_t* gt = g_token + row * dim;
  const scalar_t* qr = q + row * dim;
  int64_t code[MP];
  float gw[MP];
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    code[j] = j < m ? indices[row * m + j] : 0;
    gw[j] = 0.0f;
  }
  for (int64_t d = lane; d < dim; d += 32) {
    const float g = static_cast<float>(gt[d]);
#pragma unroll
    for (int j = 0; j < MP; ++j) {
      if (j < m) gw[j] += g * static_cast<float>(codebook[code[j] * dim + d]);
    }
  }
  const float tau = *tau_ptr;
  float w[MP], c[MP], dot = 0.0f, top = -INFINITY;
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    gw[j] = warp_sum(gw[j]);
    if (j < m) {
      if (g_weights != nullptr) gw[j] += g_weights[row * m + j];
      w[j] = weights[row * m + j];
      c[j] = raw[row * m + j];
      dot += w[j] * gw[j];
      top = fmaxf(top, c[j]);
    }
  }
  float gc[MP], tau_part = 0.0f, gc_raw = 0.0f, gc_sum = 0.0f;
#pragma unroll
  for (int j = 0; j < MP; ++j) {
    gc[j] = 0.0f;
    if (j < m) {
      const float g_s = w[j] * (gw[j] - dot);
      tau_part += g_s * (c[j] - top);
      gc[j] = g_s / tau;
      gc_raw += gc[j] * c[j];
      gc_sum += gc[j];
      if (coef != nullptr && lane == 0) coef[row * m + j] = gc[j];
    }
  }
  if (lane == 0) tau_parts[row] = tau_part;
  const float qn_len = cosine ? q_norm[row] : 1.0f;
  const float inv_q = 1.0f / fmaxf(qn_len, norm_eps);
  const bool q_free = qn_len >= norm_eps;
  for (int64_t d = lane; d < dim; d += 32) {
    const float qv = static_cast<float>(qr[d]);
    const float gtv = static_cast<float>(gt[d]);
    float gq = 0.0f;
#pragma unroll
    for (int j = 0; j < MP; ++j) {
      if (j >= m) continue;
      const float ev = static_cast<float>(codebook[code[j] * dim + d]);
      float ge = w[j] * gtv;
      if (cosine) {
        const float e_len = code_stat[code[j]];
        const float inv_e = 1.0f / fmaxf(e_len, norm_eps);
        gq += gc[j] * ev * inv_e;
        const float qn = qv * inv_q;
        ge += gc[j] * inv_e * (e_len >= norm_eps ? qn - c[j] * ev * inv_e : qn);
      } else {
        gq += 2.0f * gc[j] * ev;
        ge += 2.0f * gc[j] * (qv - ev);
      }
      if (grad_acc != nullptr) atomicAdd(grad_acc + code[j] * dim + d, ge);
    }
    if (cosine) {
      if (q_free) gq -= gc_raw * qv * inv_q;
      gq *= inv_q;
    } else {
      gq -= 2.0f * gc_sum * qv;
    }
    grad_q[row * dim + d] = static_cast<scalar_t>(gq);
  }
}

// fn(std::integral_constant<int, MP>{}) with MP the power of two >= m (m <= 16).
template <typename Fn>
void with_list_length(int64_t m, Fn&& fn) {
  if (m <= 1) {
    fn(std::integral_constant<int, 1>{});
  } else if (m <= 2) {
    fn(std::integral_constant<int, 2>{});
  } else if (m <= 4) {
    fn(std::integral_constant<int, 4>{});
  } else if (m <= 8) {
    fn(std::integral_constant<int, 8>{});
  } else {
    fn(std::integral_constant<int, 16>{});
  }
}

// ------------------------------------------------------------------------------------------
// segment reductions (csrc/segment_reduce.h)
// ------------------------------------------------------------------------------------------

// Where pass 1 and pass 2 put their sums: whole segments and finished tails into the output
// (out(code, column)), partials into (chunk, head|tail, column) of a scratch buffer.
// Sums (and partials) are of type Sum: float, or double for sums that must stay exact past 2^24.
template <typename Output, typename Sum>
struct SegmentStore {
  Output output;
  Sum* partial;
  int32_t columns;

  __device__ Sum& slot(segments::Part part, int32_t chunk, int32_t column) const {
    return partial[(static_cast<int64_t>(chunk) * 2 + (part == segments::Part::kTail ? 1 : 0)) * columns + column];
  }
  __device__ void operator()(segments::Part part, int32_t chunk, int64_t code, int32_t column, Sum sum) const {
    if (part == segments::Part::kWhole) {
      output(code, column, sum);
    } else {
      slot(part, chunk, column) = sum;
    }
  }
  __device__ void operator()(int64_t code, int32_t column, Sum total) const { output(code, column, total); }
  __device__ Sum operator()(segments::Part part, int32_t chunk, int32_t column) const {
    return slot(part, chunk, column);
  }
};

template <typename Value, typename Output, typename Sum>
__global__ void __launch_bounds__(kSegmentColumns * kSegmentChunks) segment_reduce_kernel(
    segments::SortedEntries entries, int32_t n_chunks, int32_t columns, Value value, SegmentStore<Output, Sum> store) {
  const int32_t chunk = blockIdx.x * kSegmentChunks + threadIdx.y;
  const int32_t column = blockIdx.y * kSegmentColumns + threadIdx.x;
  if (chunk >= n_chunks || column >= columns) return;
  segments::reduce_chunk_column(entries, chunk, column, value, store);
}

template <typename Output, typename Sum>
__global__ void __launch_bounds__(kSegmentColumns * kSegmentChunks) segment_finish_kernel(
    segments::SortedEntries entries, int32_t n_chunks, int32_t columns, SegmentStore<Output, Sum> store) {
  const int32_t chunk = blockIdx.x * kSegmentChunks + threadIdx.y;
  const int32_t column = blockIdx.y * kSegmentColumns + threadIdx.x;
  if (chunk >= n_chunks || column >= columns) return;
  segments::finish_tail_column(entries, chunk, column, store, store);
}

// The (K+1,) segment starts and the stably sorted codes/entry order of flat (N, M) indices.
struct Sorted {
  at::Tensor codes, order, starts;
};

Sorted sort_by_code(const at::Tensor& indices, int64_t num_codes) {
  const at::Tensor flat = indices.reshape({-1}).to(at::kLong);
  auto [codes, order] = flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(num_codes + 1, flat.options());
  return {codes, order, at::searchsorted(codes, bounds)};
}

// Both passes over `sorted` for `columns` columns; value(position, code, column) per entry.
template <typename Value, typename Output>
void run_segment_reduction(const char* op, const Sorted& sorted, int64_t num_codes, int32_t columns,
                           const Value& value, const Output& output, cudaStream_t stream) {
  const int64_t n_entries = sorted.codes.numel();
  if (n_entries == 0) return;
  checks::fits_int32(op, "N * m (assignment entries)", n_entries);
  const int64_t n_chunks = launch::ceil_div(n_entries, segments::kChunkEntries);
  using Sum = decltype(value(int32_t{0}, int64_t{0}, int32_t{0}));
  at::Tensor partial = at::empty({n_chunks, 2, columns}, sorted.codes.options().dtype(c10::CppTypeToScalarType<Sum>::value));
  const segments::SortedEntries entries{sorted.codes.data_ptr<int64_t>(), sorted.starts.data_ptr<int64_t>(),
                                        static_cast<int32_t>(n_entries), num_codes};
  const SegmentStore<Output, Sum> store{output, partial.data_ptr<Sum>(), columns};
  const dim3 grid = checks::grid(op, launch::ceil_div(n_chunks, kSegmentChunks), launch::ceil_div(columns, kSegmentColumns));
  const dim3 block(kSegmentColumns, kSegmentChunks);
  segment_reduce_kernel<<<grid, block, 0, stream>>>(entries, static_cast<int32_t>(n_chunks), columns, value, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  segment_finish_kernel<<<grid, block, 0, stream>>>(entries, static_cast<int32_t>(n_chunks), columns, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Contribution of sorted entry p (pair = (row, slot)) to column d of its code's gradient.
template <typename scalar_t>
struct CodebookGradValue {
  const int64_t* order;
  const scalar_t* g_token;
  const scalar_t* q;
  const scalar_t* codebook;
  const float* code_stat;
  const float* q_norm;
  const float* weights;
  const float* raw;
  const float* coef;
  int64_t dim;
  int32_t m;
  bool cosine;
  float norm_eps;

  __device__ float operator()(int32_t p, int64_t code, int32_t d) const {
    const int32_t pair = static_cast<int32_t>(order[p]);
    const int64_t row = pair / m;
    const float gtv = static_cast<float>(g_token[row * dim + d]);
    const float qv = static_cast<float>(q[row * dim + d]);
    const float ev = static_cast<float>(codebook[code * dim + d]);
    float contrib = weights[pair] * gtv;
    if (cosine) {
      const float e_len = code_stat[code];
      const float inv_e = 1.0f / fmaxf(e_len, norm_eps);
      const float qn = qv / fmaxf(q_norm[row], norm_eps);
      contrib += coef[pair] * inv_e * (e_len >= norm_eps ? qn - raw[pair] * ev * inv_e : qn);
    } else {
      contrib += 2.0f * coef[pair] * (qv - ev);
    }
    return contrib;
  }
};

template <typename scalar_t>
struct RowsOutput {
  scalar_t* out;
  int64_t dim;
  __device__ void operator()(int64_t code, int32_t column, float value) const {
    out[code * dim + column] = static_cast<scalar_t>(value);
  }
};

// codebook_stats columns: 0..D-1 weighted sums of x, then the weight (count) itself. Summed in fp64
// (counts stay exact to 2^53; the fp32 products w * x are exact in fp64 too), sums written as fp32.
template <typename x_t>
struct StatsValue {
  const int64_t* order;
  const float* weights;  // or nullptr: every entry weighs 1
  const x_t* x;          // or nullptr: counts only
  int64_t dim;
  int32_t m;

  __device__ double operator()(int32_t p, int64_t, int32_t column) const {
    const int32_t entry = static_cast<int32_t>(order[p]);
    const float w = weights != nullptr ? weights[entry] : 1.0f;
    return column < dim ? static_cast<double>(w) * static_cast<double>(static_cast<float>(x[(entry / m) * dim + column]))
                        : static_cast<double>(w);
  }
};

struct StatsOutput {
  double* counts;
  float* sums;
  int64_t dim;
  __device__ void operator()(int64_t code, int32_t column, double value) const {
    if (column < dim) {
      sums[code * dim + column] = static_cast<float>(value);
    } else {
      counts[code] = value;
    }
  }
};

template <typename index_t, typename x_t>
__global__ void __launch_bounds__(kAtomicThreads) stats_atomic_kernel(
    const index_t* __restrict__ indices, const float* __restrict__ weights, const x_t* __restrict__ x,
    double* __restrict__ counts, float* __restrict__ sums, int64_t num_codes, int64_t dim, int m) {
  const int64_t row = blockIdx.x;
  for (int j = 0; j < m; ++j) {
    const int64_t code = static_cast<int64_t>(indices[row * m + j]);
    if (!segments::code_in_range(code, num_codes)) continue;  // the deterministic path's rule too
    const float w = weights != nullptr ? weights[row * m + j] : 1.0f;
    if (threadIdx.x == 0) atomicAdd(counts + code, static_cast<double>(w));  // fp64: exact to 2^53
    if (x == nullptr) continue;
    for (int64_t d = threadIdx.x; d < dim; d += kAtomicThreads) {
      atomicAdd(sums + code * dim + d, w * static_cast<float>(x[row * dim + d]));
    }
  }
}

// ------------------------------------------------------------------------------------------
// validation (device-independent first; see op_checks.h)
// ------------------------------------------------------------------------------------------

void check_codebook_inputs(const char* op, const at::Tensor& q, const at::Tensor& codebook,
                           const at::Tensor& code_stat, const at::Tensor& tau, double norm_eps) {
  TORCH_CHECK_VALUE(q.dim() == 2, op, ": q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must be 2-D (K, D), got shape ", codebook.sizes());
  checks::float_dtype(op, "q", q);
  TORCH_CHECK_TYPE(codebook.scalar_type() == q.scalar_type(), op, ": codebook has dtype ", codebook.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(q.size(1) >= 1 && codebook.size(1) == q.size(1), op, ": q has D=", q.size(1),
                    " but codebook has D=", codebook.size(1), " (D >= 1)");
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, op, ": codebook must have at least one row (K >= 1)");
  checks::fits_int32(op, "K (codebook rows)", codebook.size(0));
  checks::fits_int32(op, "D", q.size(1));
  checks::dtype_is(op, "code_stat", code_stat, at::kFloat);
  checks::shape_is(op, "code_stat", code_stat, {codebook.size(0)});
  checks::dtype_is(op, "tau", tau, at::kFloat);
  TORCH_CHECK_VALUE(tau.numel() == 1 && tau.dim() <= 1, op, ": tau must be a one-element tensor, got shape ",
                    tau.sizes());
  TORCH_CHECK_VALUE(std::isfinite(norm_eps) && norm_eps > 0.0, op, ": norm_eps must be a positive finite number, got ",
                    norm_eps);
}

void check_pair_tensor(const char* op, const char* name, const at::Tensor& t, int64_t n, int64_t m,
                       at::ScalarType type) {
  checks::dtype_is(op, name, t, type);
  checks::shape_is(op, name, t, {n, m});
}

// ------------------------------------------------------------------------------------------
// entry points
// ------------------------------------------------------------------------------------------

constexpr const char* kForward = "soft_assign";
constexpr const char* kBackward = "soft_assign_backward";
constexpr const char* kStats = "codebook_stats";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_assign_forward(
    const at::Tensor& q_in, const at::Tensor& codebook_in, const at::Tensor& code_stat_in, const at::Tensor& tau_in,
    int64_t m, bool cosine, bool hard, double norm_eps, c10::string_view input_precision) {
  check_codebook_inputs(kForward, q_in, codebook_in, code_stat_in, tau_in, norm_eps);
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxM && m <= codebook_in.size(0), kForward, ": m must lie in [1, min(16, K)] = [1, ",
                    std::min<int64_t>(kMaxM, codebook_in.size(0)), "], got ", m);
  const std::string precision_name(input_precision);
  const ranking::Precision precision = checks::precision(kForward, precision_name);
  checks::same_device(kForward, {{"q", &q_in}, {"codebook", &codebook_in}, {"code_stat", &code_stat_in}, {"tau", &tau_in}});
  checks::needs_cuda(kForward, "q", q_in);

  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor q = q_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const at::Tensor code_stat = code_stat_in.contiguous();
  const at::Tensor tau = tau_in.reshape({1}).contiguous();
  const int64_t n = q.size(0), dim = q.size(1);
  at::Tensor token = at::empty_like(q);
  at::Tensor indices = at::empty({n, m}, q.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, m}, q.options().dtype(at::kFloat));
  at::Tensor raw = at::empty({n, m}, q.options().dtype(at::kFloat));
  at::Tensor q_norm = at::empty({n}, q.options().dtype(at::kFloat));
  if (n == 0) return {token, indices, weights, raw, q_norm};

  // rank by score = -(value): cosine -q.e / max(||e||, eps), l2 0.5 ||e||^2 - q.e
  const at::Tensor code_term = cosine ? code_stat.clamp_min(norm_eps).reciprocal() : code_stat * 0.5;
  const at::Tensor q_padded = checks::padded_rows(q);
  const at::Tensor codebook_padded = checks::padded_rows(codebook);
  ranking::Problem problem;
  problem.queries = q_padded.data_ptr();
  problem.codes = codebook_padded.data_ptr();
  problem.code_term = code_term.data_ptr<float>();
  problem.indices = indices.data_ptr<int64_t>();
  problem.int64_indices = true;
  problem.n_rows = n;
  problem.n_codes = codebook.size(0);
  problem.dim = q_padded.size(1);
  problem.k_out = static_cast<int>(m);
  problem.cosine = cosine;
  problem.nan_rank = rank::NanRank::kAsInfinity;
  problem.input = checks::input_type(q.scalar_type());
  problem.precision = precision;
  const std::string failure = ranking::rank_codes(problem, stream);
  TORCH_CHECK(failure.empty(), kForward, ": ", failure);

  const dim3 grid = checks::grid(kForward, launch::ceil_div(n, kRowWarps));
  dispatch_floats(q.scalar_type(), "q", [&](auto tag) {
    using scalar_t = decltype(tag);
    with_list_length(m, [&](auto list_length) {
      soft_assign_finish_kernel<scalar_t, decltype(list_length)::value><<<grid, 32 * kRowWarps, 0, stream>>>(
          q.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), code_stat.data_ptr<float>(), tau.data_ptr<float>(),
          indices.data_ptr<int64_t>(), token.data_ptr<scalar_t>(), weights.data_ptr<float>(), raw.data_ptr<float>(),
          q_norm.data_ptr<float>(), n, dim, static_cast<int>(m), cosine, hard, static_cast<float>(norm_eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {token, indices, weights, raw, q_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_assign_backward(
    const at::Tensor& g_token_in, const std::optional<at::Tensor>& g_weights_in, const at::Tensor& q_in,
    const at::Tensor& codebook_in, const at::Tensor& code_stat_in, const at::Tensor& tau_in,
    const at::Tensor& indices_in, const at::Tensor& weights_in, const at::Tensor& raw_in, const at::Tensor& q_norm_in,
    bool cosine, bool deterministic, double norm_eps) {
  check_codebook_inputs(kBackward, q_in, codebook_in, code_stat_in, tau_in, norm_eps);
  const int64_t n = q_in.size(0), dim = q_in.size(1), num_codes = codebook_in.size(0);
  TORCH_CHECK_TYPE(g_token_in.scalar_type() == q_in.scalar_type(), kBackward, ": g_token has dtype ",
                   g_token_in.scalar_type(), " but q has ", q_in.scalar_type());
  checks::shape_is(kBackward, "g_token", g_token_in, q_in.sizes());
  TORCH_CHECK_VALUE(indices_in.dim() == 2 && indices_in.size(0) == n, kBackward,
                    ": indices must be (N, m) with N = ", n, ", got shape ", indices_in.sizes());
  const int64_t m = indices_in.size(1);
  TORCH_CHECK_VALUE(m >= 1 && m <= kMaxM && m <= num_codes, kBackward, ": m (indices.size(1)) must lie in [1, min(16, K)], got ", m);
  checks::dtype_is(kBackward, "indices", indices_in, at::kLong);
  check_pair_tensor(kBackward, "weights", weights_in, n, m, at::kFloat);
  check_pair_tensor(kBackward, "raw", raw_in, n, m, at::kFloat);
  if (g_weights_in.has_value()) check_pair_tensor(kBackward, "g_weights", *g_weights_in, n, m, at::kFloat);
  checks::dtype_is(kBackward, "q_norm", q_norm_in, at::kFloat);
  checks::shape_is(kBackward, "q_norm", q_norm_in, {n});
  const at::Tensor no_tensor;
  checks::same_device(kBackward, {{"q", &q_in}, {"g_token", &g_token_in},
                                  {"g_weights", g_weights_in.has_value() ? &*g_weights_in : &no_tensor},
                                  {"codebook", &codebook_in}, {"code_stat", &code_stat_in}, {"tau", &tau_in},
                                  {"indices", &indices_in}, {"weights", &weights_in}, {"raw", &raw_in},
                                  {"q_norm", &q_norm_in}});
  checks::needs_cuda(kBackward, "q", q_in);

  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor g_token = g_token_in.contiguous(), q = q_in.contiguous(), codebook = codebook_in.contiguous();
  const at::Tensor code_stat = code_stat_in.contiguous(), tau = tau_in.reshape({1}).contiguous();
  const at::Tensor indices = indices_in.contiguous(), weights = weights_in.contiguous(), raw = raw_in.contiguous();
  const at::Tensor q_norm = q_norm_in.contiguous();
  const at::Tensor g_weights = g_weights_in.has_value() ? g_weights_in->contiguous() : at::Tensor();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor tau_parts = at::empty({n}, f32);
  at::Tensor grad_acc = deterministic ? at::Tensor() : at::zeros({num_codes, dim}, f32);
  at::Tensor coef = deterministic ? at::empty({n, m}, f32) : at::Tensor();
  at::Tensor grad_cb = deterministic ? at::zeros_like(codebook) : at::Tensor();
  dispatch_floats(q.scalar_type(), "q", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (n > 0) {
      const dim3 grid = checks::grid(kBackward, launch::ceil_div(n, kRowWarps));
      with_list_length(m, [&](auto list_length) {
        soft_assign_backward_kernel<scalar_t, decltype(list_length)::value><<<grid, 32 * kRowWarps, 0, stream>>>(
            g_token.data_ptr<scalar_t>(), g_weights.defined() ? g_weights.data_ptr<float>() : nullptr,
            q.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), code_stat.data_ptr<float>(), tau.data_ptr<float>(),
            indices.data_ptr<int64_t>(), weights.data_ptr<float>(), raw.data_ptr<float>(), q_norm.data_ptr<float>(),
            grad_q.data_ptr<scalar_t>(), deterministic ? nullptr : grad_acc.data_ptr<float>(),
            deterministic ? coef.data_ptr<float>() : nullptr, tau_parts.data_ptr<float>(), n, dim,
            static_cast<int>(m), cosine, static_cast<float>(norm_eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (deterministic) {
      const Sorted sorted = sort_by_code(indices, num_codes);
      const CodebookGradValue<scalar_t> value{sorted.order.data_ptr<int64_t>(), g_token.data_ptr<scalar_t>(),
                                              q.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(),
                                              code_stat.data_ptr<float>(), q_norm.data_ptr<float>(),
                                              weights.data_ptr<float>(), raw.data_ptr<float>(), coef.data_ptr<float>(),
                                              dim, static_cast<int32_t>(m), cosine, static_cast<float>(norm_eps)};
      run_segment_reduction(kBackward, sorted, num_codes, static_cast<int32_t>(dim), value,
                            RowsOutput<scalar_t>{grad_cb.data_ptr<scalar_t>(), dim}, stream);
    }
  });
  if (!deterministic) grad_cb = grad_acc.to(codebook.scalar_type());
  return {grad_q, grad_cb, tau_parts};
}

std::tuple<at::Tensor, at::Tensor> codebook_stats(const at::Tensor& indices_in, int64_t num_codes,
                                                  const std::optional<at::Tensor>& weights_in,
                                                  const std::optional<at::Tensor>& x_in, bool deterministic) {
  TORCH_CHECK_VALUE(indices_in.dim() == 2, kStats, ": indices must be 2-D (N, m), got shape ", indices_in.sizes());
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong || indices_in.scalar_type() == at::kInt, kStats,
                   ": indices must be int64 or int32, got ", indices_in.scalar_type());
  TORCH_CHECK_VALUE(num_codes >= 1, kStats, ": K must be >= 1, got ", num_codes);
  checks::fits_int32(kStats, "K", num_codes);
  const int64_t n = indices_in.size(0), m = indices_in.size(1);
  if (weights_in.has_value()) check_pair_tensor(kStats, "weights", *weights_in, n, m, at::kFloat);
  if (x_in.has_value()) {
    checks::float_dtype(kStats, "x", *x_in);
    TORCH_CHECK_VALUE(x_in->dim() == 2 && x_in->size(0) == n && x_in->size(1) >= 1, kStats,
                      ": x must be (N, D) with N = ", n, " and D >= 1, got shape ", x_in->sizes());
    checks::fits_int32(kStats, "D", x_in->size(1));
  }
  const at::Tensor no_tensor;
  checks::same_device(kStats, {{"indices", &indices_in},
                               {"weights", weights_in.has_value() ? &*weights_in : &no_tensor},
                               {"x", x_in.has_value() ? &*x_in : &no_tensor}});
  checks::needs_cuda(kStats, "indices", indices_in);

  const c10::cuda::CUDAGuard guard(indices_in.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor w = weights_in.has_value() ? weights_in->contiguous() : at::Tensor();
  const at::Tensor x = x_in.has_value() ? x_in->contiguous() : at::Tensor();
  const int64_t dim = x.defined() ? x.size(1) : 0;
  const auto f32 = indices.options().dtype(at::kFloat);
  at::Tensor counts = at::zeros({num_codes}, indices.options().dtype(at::kDouble));  // exact past 2^24
  at::Tensor sums = at::zeros({num_codes, dim}, f32);
  if (indices.numel() == 0) return {counts, sums};
  const float* w_ptr = w.defined() ? w.data_ptr<float>() : nullptr;
  dispatch_floats(x.defined() ? x.scalar_type() : at::kFloat, "x", [&](auto tag) {
    using x_t = decltype(tag);
    const x_t* x_ptr = x.defined() ? x.data_ptr<x_t>() : nullptr;
    if (deterministic) {
      const Sorted sorted = sort_by_code(indices, num_codes);
      checks::fits_int32(kStats, "D + 1 (columns)", dim + 1);
      run_segment_reduction(kStats, sorted, num_codes, static_cast<int32_t>(dim + 1),
                            StatsValue<x_t>{sorted.order.data_ptr<int64_t>(), w_ptr, x_ptr, dim, static_cast<int32_t>(m)},
                            StatsOutput{counts.data_ptr<double>(), sums.data_ptr<float>(), dim}, stream);
      return;
    }
    const dim3 grid = checks::grid(kStats, n);
    const auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      stats_atomic_kernel<index_t, x_t><<<grid, kAtomicThreads, 0, stream>>>(
          indices.data_ptr<index_t>(), w_ptr, x_ptr, counts.data_ptr<double>(),
          x.defined() ? sums.data_ptr<float>() : nullptr, num_codes, dim, static_cast<int>(m));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (indices.scalar_type() == at::kLong) {
      launch(int64_t{});
    } else {
      launch(int32_t{});
    }
  });
  return {counts, sums};
}

}  // namespace
}  // namespace soft_assign
}  // namespace pacofr

TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) {
  m.def("soft_assign(Tensor q, Tensor codebook, Tensor code_stat, Tensor tau, int m, bool cosine, bool hard, "
        "float norm_eps, str input_precision) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("soft_assign_backward(Tensor g_token, Tensor? g_weights, Tensor q, Tensor codebook, Tensor code_stat, "
        "Tensor tau, Tensor indices, Tensor weights, Tensor raw, Tensor q_norm, bool cosine, bool deterministic, "
        "float norm_eps) -> (Tensor, Tensor, Tensor)");
  m.def("codebook_stats(Tensor indices, int K, Tensor? weights, Tensor? x, bool deterministic) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pacofr_cuda, CUDA, m) {
  m.impl("soft_assign", &pacofr::soft_assign::soft_assign_forward);
  m.impl("soft_assign_backward", &pacofr::soft_assign::soft_assign_backward);
  m.impl("codebook_stats", &pacofr::soft_assign::codebook_stats);
}

// CPU tensors get the same validation and then "needs CUDA tensors" (testable without a GPU).
TORCH_LIBRARY_IMPL(pacofr_cuda, CPU, m) {
  m.impl("soft_assign", &pacofr::soft_assign::soft_assign_forward);
  m.impl("soft_assign_backward", &pacofr::soft_assign::soft_assign_backward);
  m.impl("codebook_stats", &pacofr::soft_assign::codebook_stats);
}
