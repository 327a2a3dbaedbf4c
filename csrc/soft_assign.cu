// Multi-candidate soft assignment and codebook statistics: CUDA backend of pacofr.ops.soft_assign.
//
// Correctness first (not tuned): one thread block per query row, fp32 math, int64 offsets.
//   soft_assign           each thread ranks a strided subset of the codes against the row (held in
//                         shared memory as fp32) and keeps a sorted top-M list of packed int64 keys
//                         (order-preserving fp32 bits << 32 | (2^31-1-index): one max gives the best
//                         value and, on ties, the smaller index); the block merges the lists with M
//                         max-reductions, recomputes the M scores exactly from the rows, applies the
//                         softmax of (c - max c) / tau and writes the weighted sum (or the top-1 row).
//   soft_assign_backward  per row: g_w = <dtoken, e_j> (+ dweights), softmax backward, gradient of q
//                         (written once) and of the M chosen rows: fp32 atomicAdd into a K x D buffer,
//                         or (deterministic) per-pair coefficients reduced per code over a stable sort.
//   codebook_stats        counts/sums by fp32 atomics, or (deterministic) by sorted segments.
//
// Conventions (see pacofr/ops/soft_assign.py): q (N, D), codebook (K, D) contiguous, same float dtype;
// code_stat (K,) fp32 = ||e|| (cosine) or ||e||^2 (l2); tau a 0-d fp32 tensor; M <= 16. NaN scores rank
// as -inf. Ranking drops the per-row constants 1/||q|| (cosine) and ||q||^2 (l2).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dtype_dispatch.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace pacofr {
namespace soft_assign {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxM = 16;
constexpr int64_t kKeyFloor = -(int64_t{2147483647} * int64_t{4294967296});
constexpr int32_t kIndexBase = 2147483647;

__device__ __forceinline__ int64_t pack_key(float value, int32_t index) {
  if (value != value) value = -INFINITY;
  const int32_t bits = __float_as_int(value);
  const int32_t ordered = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>(ordered) * int64_t{4294967296} + static_cast<int64_t>(kIndexBase - index);
}

__device__ __forceinline__ int32_t unpack_index(int64_t key) {
  const int64_t low = key - (key >> 32) * int64_t{4294967296};
  return kIndexBase - static_cast<int32_t>(low);
}

// Block-wide reductions (blockDim.x == kThreads); `scratch` holds kThreads / 32 values. Every thread
// gets the result.
__device__ float block_sum(float value, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];  // fixed order: deterministic
  return total;
}

__device__ int64_t block_max(int64_t value, int64_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int64_t other = __shfl_down_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  int64_t best = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) best = scratch[w] > best ? scratch[w] : best;
  return best;
}

template <typename scalar_t>
__global__ void soft_assign_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ codebook,
                                           const float* __restrict__ code_stat, const float* __restrict__ tau_ptr,
                                           scalar_t* __restrict__ token, int64_t* __restrict__ indices,
                                           float* __restrict__ weights, float* __restrict__ raw_out,
                                           float* __restrict__ q_norm, int64_t K, int64_t D, int M, bool cosine,
                                           bool hard, float norm_eps) {
  extern __shared__ float q_row[];  // D floats
  __shared__ float f_scratch[kThreads / 32];
  __shared__ int64_t k_scratch[kThreads / 32];
  __shared__ int64_t top_keys[kMaxM];
  __shared__ float s_weights[kMaxM];
  const int64_t row = blockIdx.x;
  const scalar_t* q_ptr = q + row * D;

  float sq = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const float v = static_cast<float>(q_ptr[d]);
    q_row[d] = v;
    sq += v * v;
  }
  const float qq = block_sum(sq, f_scratch);  // also synchronises q_row

  // per-thread sorted (descending) top-M over codes threadIdx.x, threadIdx.x + kThreads, ...
  int64_t list[kMaxM];
#pragma unroll
  for (int j = 0; j < kMaxM; ++j) list[j] = kKeyFloor;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const scalar_t* e = codebook + k * D;
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q_row[d] * static_cast<float>(e[d]);
    const float value = cosine ? dot / fmaxf(code_stat[k], norm_eps) : 2.f * dot - code_stat[k];
    const int64_t key = pack_key(value, static_cast<int32_t>(k));
    if (key > list[M - 1]) {
      int pos = M - 1;
      while (pos > 0 && list[pos - 1] < key) {
        list[pos] = list[pos - 1];
        --pos;
      }
      list[pos] = key;
    }
  }
  // merge: M rounds of "largest head wins"; keys are unique, so exactly one thread advances
  int head = 0;
  for (int r = 0; r < M; ++r) {
    const int64_t mine = head < M ? list[head] : kKeyFloor;
    const int64_t best = block_max(mine, k_scratch);
    if (mine == best && best != kKeyFloor) ++head;
    if (threadIdx.x == 0) top_keys[r] = best;
  }
  __syncthreads();

  // exact scores of the M winners, then softmax (thread 0)
  const float q_len = sqrtf(qq);
  float raw_j[kMaxM];
  for (int j = 0; j < M; ++j) {
    const scalar_t* e = codebook + static_cast<int64_t>(unpack_index(top_keys[j])) * D;
    float part = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float ev = static_cast<float>(e[d]);
      part += cosine ? q_row[d] * ev : (q_row[d] - ev) * (q_row[d] - ev);
    }
    const float total = block_sum(part, f_scratch);
    const int32_t idx = unpack_index(top_keys[j]);
    raw_j[j] = cosine ? total / fmaxf(q_len, norm_eps) / fmaxf(code_stat[idx], norm_eps) : -total;
  }
  if (threadIdx.x == 0) {
    const float tau = *tau_ptr;
    float top = -INFINITY;
    for (int j = 0; j < M; ++j) top = fmaxf(top, raw_j[j]);
    float denom = 0.f;
    for (int j = 0; j < M; ++j) {
      s_weights[j] = expf((raw_j[j] - top) / tau);
      denom += s_weights[j];
    }
    for (int j = 0; j < M; ++j) {
      s_weights[j] /= denom;
      indices[row * M + j] = unpack_index(top_keys[j]);
      weights[row * M + j] = s_weights[j];
      raw_out[row * M + j] = raw_j[j];
    }
    q_norm[row] = q_len;
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int j = 0; j < (hard ? 1 : M); ++j) {
      const float ev = static_cast<float>(codebook[static_cast<int64_t>(unpack_index(top_keys[j])) * D + d]);
      acc += hard ? ev : s_weights[j] * ev;
    }
    token[row * D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void soft_assign_backward_kernel(const scalar_t* __restrict__ g_token, const float* __restrict__ g_weights,
                                            const scalar_t* __restrict__ q, const scalar_t* __restrict__ codebook,
                                            const float* __restrict__ code_stat, const float* __restrict__ tau_ptr,
                                            const int64_t* __restrict__ indices, const float* __restrict__ weights,
                                            const float* __restrict__ raw, const float* __restrict__ q_norm,
                                            scalar_t* __restrict__ grad_q, float* __restrict__ grad_acc,
                                            float* __restrict__ coef, float* __restrict__ tau_parts, int64_t D,
                                            int M, bool cosine, bool atomic, float norm_eps) {
  __shared__ float f_scratch[kThreads / 32];
  __shared__ float s_gc[kMaxM];
  __shared__ float s_gc_raw_sum, s_gc_sum;
  const int64_t row = blockIdx.x;
  const scalar_t* gt = g_token + row * D;
  const scalar_t* qr = q + row * D;
  float gw[kMaxM];
  for (int j = 0; j < M; ++j) {
    const scalar_t* e = codebook + indices[row * M + j] * D;
    float part = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) part += static_cast<float>(gt[d]) * static_cast<float>(e[d]);
    gw[j] = block_sum(part, f_scratch);
  }
  if (threadIdx.x == 0) {
    const float tau = *tau_ptr;
    float dot = 0.f, top = -INFINITY;
    for (int j = 0; j < M; ++j) {
      if (g_weights != nullptr) gw[j] += g_weights[row * M + j];
      dot += weights[row * M + j] * gw[j];
      top = fmaxf(top, raw[row * M + j]);
    }
    float tau_part = 0.f, gc_raw = 0.f, gc_sum = 0.f;
    for (int j = 0; j < M; ++j) {
      const float g_s = weights[row * M + j] * (gw[j] - dot);
      tau_part += g_s * (raw[row * M + j] - top);
      s_gc[j] = g_s / tau;
      gc_raw += s_gc[j] * raw[row * M + j];
      gc_sum += s_gc[j];
      if (!atomic) coef[row * M + j] = s_gc[j];
    }
    tau_parts[row] = tau_part;
    s_gc_raw_sum = gc_raw;
    s_gc_sum = gc_sum;
  }
  __syncthreads();
  const float qn_len = cosine ? q_norm[row] : 1.f;
  const float inv_q = 1.f / fmaxf(qn_len, norm_eps);
  const bool q_free = qn_len >= norm_eps;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const float qv = static_cast<float>(qr[d]);
    const float gtv = static_cast<float>(gt[d]);
    float gq = 0.f;
    for (int j = 0; j < M; ++j) {
      const int64_t k = indices[row * M + j];
      const float ev = static_cast<float>(codebook[k * D + d]);
      const float w = weights[row * M + j];
      float ge = w * gtv;
      if (cosine) {
        const float e_len = code_stat[k];
        const float inv_e = 1.f / fmaxf(e_len, norm_eps);
        const float c = raw[row * M + j];
        gq += s_gc[j] * ev * inv_e;
        const float qn = qv * inv_q;
        ge += s_gc[j] * inv_e * (e_len >= norm_eps ? qn - c * ev * inv_e : qn);
      } else {
        gq += 2.f * s_gc[j] * ev;
        ge += 2.f * s_gc[j] * (qv - ev);
      }
      if (atomic) atomicAdd(grad_acc + k * D + d, ge);
    }
    if (cosine) {
      if (q_free) gq -= s_gc_raw_sum * qv * inv_q;
      gq *= inv_q;
    } else {
      gq -= 2.f * s_gc_sum * qv;
    }
    grad_q[row * D + d] = static_cast<scalar_t>(gq);
  }
}

// One block per code: sum, in sorted order, the contributions of the (row, slot) pairs assigned to it.
template <typename scalar_t>
__global__ void codebook_grad_segment_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                                             const scalar_t* __restrict__ g_token, const scalar_t* __restrict__ q,
                                             const scalar_t* __restrict__ codebook,
                                             const float* __restrict__ code_stat, const float* __restrict__ q_norm,
                                             const float* __restrict__ weights, const float* __restrict__ raw,
                                             const float* __restrict__ coef, scalar_t* __restrict__ grad_cb,
                                             int64_t D, int M, bool cosine, float norm_eps) {
  const int64_t k = blockIdx.x;
  const int64_t start = starts[k], end = starts[k + 1];
  const float e_len = cosine ? code_stat[k] : 1.f;
  const float inv_e = 1.f / fmaxf(e_len, norm_eps);
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const float ev = static_cast<float>(codebook[k * D + d]);
    float acc = 0.f;
    for (int64_t p = start; p < end; ++p) {
      const int64_t pair = order[p];
      const int64_t row = pair / M;
      const float gtv = static_cast<float>(g_token[row * D + d]);
      const float qv = static_cast<float>(q[row * D + d]);
      float contrib = weights[pair] * gtv;
      if (cosine) {
        const float qn = qv / fmaxf(q_norm[row], norm_eps);
        contrib += coef[pair] * inv_e * (e_len >= norm_eps ? qn - raw[pair] * ev * inv_e : qn);
      } else {
        contrib += 2.f * coef[pair] * (qv - ev);
      }
      acc += contrib;
    }
    grad_cb[k * D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename index_t, typename weight_t, typename x_t>
__global__ void stats_atomic_kernel(const index_t* __restrict__ indices, const weight_t* __restrict__ weights,
                                    const x_t* __restrict__ x, float* __restrict__ counts, float* __restrict__ sums,
                                    int64_t D, int M) {
  const int64_t row = blockIdx.x;
  for (int j = 0; j < M; ++j) {
    const int64_t k = static_cast<int64_t>(indices[row * M + j]);
    const float w = weights != nullptr ? static_cast<float>(weights[row * M + j]) : 1.f;
    if (threadIdx.x == 0) atomicAdd(counts + k, w);
    if (x != nullptr) {
      for (int64_t d = threadIdx.x; d < D; d += kThreads) atomicAdd(sums + k * D + d, w * static_cast<float>(x[row * D + d]));
    }
  }
}

template <typename weight_t, typename x_t>
__global__ void stats_segment_kernel(const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                                     const weight_t* __restrict__ weights, const x_t* __restrict__ x,
                                     float* __restrict__ counts, float* __restrict__ sums, int64_t D, int M) {
  const int64_t k = blockIdx.x;
  const int64_t start = starts[k], end = starts[k + 1];
  if (threadIdx.x == 0) {
    float count = 0.f;
    for (int64_t p = start; p < end; ++p) count += weights != nullptr ? static_cast<float>(weights[order[p]]) : 1.f;
    counts[k] = count;
  }
  if (x == nullptr) return;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int64_t p = start; p < end; ++p) {
      const int64_t entry = order[p];
      const float w = weights != nullptr ? static_cast<float>(weights[entry]) : 1.f;
      acc += w * static_cast<float>(x[(entry / M) * D + d]);
    }
    sums[k * D + d] = acc;
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> sorted_segments(const at::Tensor& indices, int64_t num_codes) {
  const at::Tensor flat = indices.reshape({-1}).to(at::kLong);
  auto [sorted, order] = flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor bounds = at::arange(num_codes + 1, flat.options());
  return {order, at::searchsorted(sorted, bounds)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_assign_forward(
    const at::Tensor& q, const at::Tensor& codebook, const at::Tensor& code_stat, const at::Tensor& tau, int64_t m,
    bool cosine, bool hard, double norm_eps) {
  check_cuda(q, "q");
  check_cuda(codebook, "codebook");
  check_cuda(code_stat, "code_stat");
  check_cuda(tau, "tau");
  TORCH_CHECK(q.dim() == 2 && codebook.dim() == 2 && q.size(1) == codebook.size(1),
              "q (N, D) and codebook (K, D) must share D");
  TORCH_CHECK(q.scalar_type() == codebook.scalar_type(), "q and codebook must have the same dtype");
  TORCH_CHECK(code_stat.scalar_type() == at::kFloat && tau.scalar_type() == at::kFloat,
              "code_stat and tau must be float32");
  TORCH_CHECK(m >= 1 && m <= kMaxM && m <= codebook.size(0), "m must lie in [1, min(16, K)], got ", m);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.size(0), num_codes = codebook.size(0), dim = q.size(1);
  at::Tensor token = at::empty_like(q);
  at::Tensor indices = at::empty({n, m}, q.options().dtype(at::kLong));
  at::Tensor weights = at::empty({n, m}, q.options().dtype(at::kFloat));
  at::Tensor raw = at::empty({n, m}, q.options().dtype(at::kFloat));
  at::Tensor q_norm = at::empty({n}, q.options().dtype(at::kFloat));
  if (n == 0) return {token, indices, weights, raw, q_norm};
  const size_t shared = static_cast<size_t>(dim) * sizeof(float);
  TORCH_CHECK(shared <= 48 * 1024, "soft_assign (cuda): D must be <= 12288, got ", dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(q.scalar_type(), "q", [&](auto tag) {
    using scalar_t = decltype(tag);
    soft_assign_forward_kernel<scalar_t><<<n, kThreads, shared, stream>>>(
        q.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), code_stat.data_ptr<float>(), tau.data_ptr<float>(),
        token.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), weights.data_ptr<float>(), raw.data_ptr<float>(),
        q_norm.data_ptr<float>(), num_codes, dim, static_cast<int>(m), cosine, hard, static_cast<float>(norm_eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {token, indices, weights, raw, q_norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_assign_backward(
    const at::Tensor& g_token, const std::optional<at::Tensor>& g_weights, const at::Tensor& q,
    const at::Tensor& codebook, const at::Tensor& code_stat, const at::Tensor& tau, const at::Tensor& indices,
    const at::Tensor& weights, const at::Tensor& raw, const at::Tensor& q_norm, bool cosine, bool deterministic,
    double norm_eps) {
  check_cuda(g_token, "g_token");
  check_cuda(q, "q");
  check_cuda(codebook, "codebook");
  check_cuda(indices, "indices");
  check_cuda(weights, "weights");
  check_cuda(raw, "raw");
  check_cuda(q_norm, "q_norm");
  if (g_weights.has_value()) check_cuda(*g_weights, "g_weights");
  TORCH_CHECK(g_token.scalar_type() == q.scalar_type(), "g_token must have q's dtype");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t n = q.size(0), num_codes = codebook.size(0), dim = q.size(1), m = indices.size(1);
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor tau_parts = at::empty({n}, q.options().dtype(at::kFloat));
  at::Tensor grad_acc = deterministic ? at::Tensor() : at::zeros({num_codes, dim}, q.options().dtype(at::kFloat));
  at::Tensor coef = deterministic ? at::empty({n, m}, q.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor grad_cb = deterministic ? at::empty_like(codebook) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(q.scalar_type(), "q", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (n > 0) {
      soft_assign_backward_kernel<scalar_t><<<n, kThreads, 0, stream>>>(
          g_token.data_ptr<scalar_t>(), g_weights.has_value() ? g_weights->data_ptr<float>() : nullptr,
          q.data_ptr<scalar_t>(), codebook.data_ptr<scalar_t>(), code_stat.data_ptr<float>(), tau.data_ptr<float>(),
          indices.data_ptr<int64_t>(), weights.data_ptr<float>(), raw.data_ptr<float>(), q_norm.data_ptr<float>(),
          grad_q.data_ptr<scalar_t>(), deterministic ? nullptr : grad_acc.data_ptr<float>(),
          deterministic ? coef.data_ptr<float>() : nullptr, tau_parts.data_ptr<float>(), dim, static_cast<int>(m),
          cosine, !deterministic, static_cast<float>(norm_eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (deterministic) {
      auto [order, starts] = sorted_segments(indices, num_codes);
      codebook_grad_segment_kernel<scalar_t><<<num_codes, kThreads, 0, stream>>>(
          order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), g_token.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
          codebook.data_ptr<scalar_t>(), code_stat.data_ptr<float>(), q_norm.data_ptr<float>(),
          weights.data_ptr<float>(), raw.data_ptr<float>(), coef.data_ptr<float>(), grad_cb.data_ptr<scalar_t>(), dim,
          static_cast<int>(m), cosine, static_cast<float>(norm_eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (!deterministic) grad_cb = grad_acc.to(codebook.scalar_type());
  return {grad_q, grad_cb, tau_parts};
}

std::tuple<at::Tensor, at::Tensor> codebook_stats(const at::Tensor& indices, int64_t num_codes,
                                                  const std::optional<at::Tensor>& weights,
                                                  const std::optional<at::Tensor>& x, bool deterministic) {
  check_cuda(indices, "indices");
  if (weights.has_value()) check_cuda(*weights, "weights");
  if (x.has_value()) check_cuda(*x, "x");
  TORCH_CHECK(indices.dim() == 2, "indices must be (N, M)");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "indices must be int64 or int32");
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t n = indices.size(0), m = indices.size(1);
  const int64_t dim = x.has_value() ? x->size(1) : 0;
  const auto f32 = indices.options().dtype(at::kFloat);
  at::Tensor counts = deterministic ? at::empty({num_codes}, f32) : at::zeros({num_codes}, f32);
  at::Tensor sums = deterministic ? at::empty({num_codes, dim}, f32) : at::zeros({num_codes, dim}, f32);
  const at::Tensor w = weights.has_value() ? weights->to(at::kFloat).contiguous() : at::Tensor();
  const at::ScalarType x_type = x.has_value() ? x->scalar_type() : at::kFloat;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(x_type, "x", [&](auto tag) {
    using x_t = decltype(tag);
    const x_t* x_ptr = x.has_value() ? x->data_ptr<x_t>() : nullptr;
    const float* w_ptr = w.defined() ? w.data_ptr<float>() : nullptr;
    float* sums_ptr = x.has_value() ? sums.data_ptr<float>() : nullptr;
    if (deterministic) {
      auto [order, starts] = sorted_segments(indices, num_codes);
      stats_segment_kernel<float, x_t><<<num_codes, kThreads, 0, stream>>>(
          order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), w_ptr, x_ptr, counts.data_ptr<float>(), sums_ptr,
          dim, static_cast<int>(m));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (n > 0) {
      if (indices.scalar_type() == at::kLong) {
        stats_atomic_kernel<int64_t, float, x_t><<<n, kThreads, 0, stream>>>(
            indices.data_ptr<int64_t>(), w_ptr, x_ptr, counts.data_ptr<float>(), sums_ptr, dim, static_cast<int>(m));
      } else {
        stats_atomic_kernel<int32_t, float, x_t><<<n, kThreads, 0, stream>>>(
            indices.data_ptr<int32_t>(), w_ptr, x_ptr, counts.data_ptr<float>(), sums_ptr, dim, static_cast<int>(m));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {counts, sums};
}

}  // namespace soft_assign
}  // namespace pacofr

TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) {
  m.def("soft_assign(Tensor q, Tensor codebook, Tensor code_stat, Tensor tau, int m, bool cosine, bool hard, "
        "float norm_eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
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
