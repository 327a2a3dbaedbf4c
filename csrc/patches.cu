// Masked patch gathering for masked image modelling (MAE semantics): CUDA backend of
// pacofr.ops.patches. Element-wise ops run one thread per output value on a 2-D grid of
// (rows, values) tiles (csrc/patch_index.h: no per-element division, 32-bit index math with
// FastDivmod, 64-bit element offsets); per-patch reductions run one block per patch row. fp32
// math; fp32 atomics only where a gradient may receive several contributions (duplicated indices).
//
// Conventions (see pacofr/ops/patches.py): images (B, C, H, W) with any strides; ids (B, n)
// int32/int64 row-major patch indices; a patch holds P = p*p*C values in (p, q, c) order,
// value k = (py * p + px) * C + c; uint8 pixels are divided by 255, then (x - mean[c]) / std[c]
// when per-channel statistics are given. An index outside [0, L) gives a NaN row and no gradient.
// Row counts (B * n, B * L), P, L and D must be below 2^31 (checked).
//
// Ops (torch.ops.pacofr_cuda.*), called by pacofr/ops/_patches_fused.py:
//   gather_patches, gather_patches_backward, patch_targets, masked_patch_loss,
//   masked_patch_loss_backward, scatter_tokens, scatter_tokens_backward.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dtype_dispatch.h"
#include "fast_divmod.h"
#include "launch_limits.h"
#include "op_checks.h"
#include "patch_index.h"

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

namespace pacofr {
namespace patches {
namespace {

constexpr int kThreads = 256;                 // per-row reduction kernels
constexpr int64_t kMaxRowBlocks = 65535LL * 8;  // grid-stride cap of the per-row kernels

// ------------------------------------------------------------------------------------------
// dtype dispatch helpers (generic lambdas receive a value of the element type as a tag)
// ------------------------------------------------------------------------------------------

template <typename Fn>
void dispatch_pixels(at::ScalarType type, const char* name, Fn&& fn) {
  switch (type) {
    case at::kByte: fn(uint8_t{}); break;
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, " must be uint8, float32, float16 or bfloat16, got ", type);
  }
}

template <typename Fn>
void dispatch_index(at::ScalarType type, const char* name, Fn&& fn) {
  switch (type) {
    case at::kInt: fn(int32_t{}); break;
    case at::kLong: fn(int64_t{}); break;
    default: TORCH_CHECK(false, name, " must be int32 or int64, got ", type);
  }
}

// ------------------------------------------------------------------------------------------
// per-thread helpers
// ------------------------------------------------------------------------------------------

// (row, value) of this thread in a RowTiling launch.
struct RowValue {
  uint32_t row;
  uint32_t value;
};

__device__ __forceinline__ RowValue row_and_value() {
  return {blockIdx.x * blockDim.y + threadIdx.y, blockIdx.y * blockDim.x + threadIdx.x};
}

template <typename pixel_t>
__device__ float normalised_pixel(const pixel_t* images, int64_t offset, uint32_t channel, const float* channel_mean,
                                  const float* channel_std) {
  float x = static_cast<float>(images[offset]);
  if constexpr (std::is_same<pixel_t, uint8_t>::value) {
    x = x / 255.0f;
  }
  if (channel_mean != nullptr) {
    x = (x - channel_mean[channel]) / channel_std[channel];
  }
  return x;
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `op` of `value` over the block (blockDim.x == kThreads), starting from `identity`; every thread gets
// the result. Warps reduce by shuffles, then thread 0 combines the warps in order.
template <typename Op>
__device__ float block_reduce(float value, float* scratch, Op op, float identity) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  float total = identity;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total = op(total, scratch[w]);
    scratch[kThreads / 32] = total;
  }
  __syncthreads();
  total = scratch[kThreads / 32];
  __syncthreads();
  return total;
}

__device__ float block_sum(float value, float* scratch) { return block_reduce(value, scratch, SumOp{}, 0.0f); }

// largest of non-negative values (0 for none)
__device__ float block_max(float value, float* scratch) { return block_reduce(value, scratch, MaxOp{}, 0.0f); }

// ------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------

template <typename pixel_t, typename out_t, typename index_t>
__global__ void gather_patches_kernel(const pixel_t* __restrict__ images, const index_t* __restrict__ ids,
                                      const float* channel_mean, const float* channel_std, out_t* __restrict__ out,
                                      PatchIndexer g, uint32_t rows) {
  const RowValue at = row_and_value();
  if (at.row >= rows || at.value >= g.patch_dim) return;
  int64_t base = 0;
  float value = std::numeric_limits<float>::quiet_NaN();
  if (g.patch_base(static_cast<int64_t>(ids[at.row]), at.row, &base)) {
    value = normalised_pixel(images, base + g.value_offset(at.value), g.value_channel(at.value), channel_mean,
                             channel_std);
  }
  out[static_cast<int64_t>(at.row) * g.patch_dim + at.value] = static_cast<out_t>(value);
}

template <typename grad_t, typename index_t>
__global__ void gather_patches_backward_kernel(const grad_t* __restrict__ grad_out,
                                               const index_t* __restrict__ ids, const float* channel_std,
                                               float* __restrict__ grad_images, PatchIndexer g, uint32_t rows) {
  const RowValue at = row_and_value();
  if (at.row >= rows || at.value >= g.patch_dim) return;
  int64_t base = 0;
  if (!g.patch_base(static_cast<int64_t>(ids[at.row]), at.row, &base)) return;
  float grad = static_cast<float>(grad_out[static_cast<int64_t>(at.row) * g.patch_dim + at.value]);
  if (channel_std != nullptr) grad = grad / channel_std[g.value_channel(at.value)];
  atomicAdd(grad_images + base + g.value_offset(at.value), grad);
}

// Per-patch statistics (mean, 1/sqrt(unbiased var + eps)) of the normalised pixels of one patch
// row, by the whole block. Returns false (mean 0, rstd 1) for a bad index. As in the torch and Triton
// backends, the variance is summed over the centred values divided by their largest magnitude s
// (rstd = 1 / (s sqrt(sum (c / s)^2 / (P - 1) + eps / s / s)); s = 1 for a constant patch), so the
// squares of pixels normalised by a tiny std neither overflow nor underflow in fp32.
template <typename pixel_t, typename index_t>
__device__ bool patch_statistics(const pixel_t* images, const index_t* ids, const float* channel_mean,
                                 const float* channel_std, const PatchIndexer& g, uint32_t row, float eps,
                                 bool norm_pix, float* scratch, int64_t* base, float* patch_mean,
                                 float* patch_rstd) {
  const bool ok = g.patch_base(static_cast<int64_t>(ids[row]), row, base);
  *patch_mean = 0.0f;
  *patch_rstd = 1.0f;
  if (!ok) return false;
  if (!norm_pix) return true;
  float sum = 0.0f;
  for (uint32_t k = threadIdx.x; k < g.patch_dim; k += blockDim.x) {
    sum += normalised_pixel(images, *base + g.value_offset(k), g.value_channel(k), channel_mean, channel_std);
  }
  const float mu = block_sum(sum, scratch) / g.patch_dim;
  float largest = 0.0f;
  for (uint32_t k = threadIdx.x; k < g.patch_dim; k += blockDim.x) {
    largest = fmaxf(largest, fabsf(normalised_pixel(images, *base + g.value_offset(k), g.value_channel(k),
                                                    channel_mean, channel_std) - mu));
  }
  float scale = block_max(largest, scratch);
  if (!(scale > 0.0f)) scale = 1.0f;
  float squares = 0.0f;
  for (uint32_t k = threadIdx.x; k < g.patch_dim; k += blockDim.x) {
    const float d =
        (normalised_pixel(images, *base + g.value_offset(k), g.value_channel(k), channel_mean, channel_std) - mu) /
        scale;
    squares += d * d;
  }
  const float var_scaled = block_sum(squares, scratch) / (g.patch_dim - 1);
  *patch_mean = mu;
  *patch_rstd = (1.0f / sqrtf(var_scaled + eps / scale / scale)) / scale;
  return true;
}

template <typename pixel_t, typename index_t>
__global__ void patch_targets_kernel(const pixel_t* __restrict__ images, const index_t* __restrict__ ids,
                                     const float* channel_mean, const float* channel_std, float* __restrict__ out,
                                     PatchIndexer g, uint32_t rows, float eps, bool norm_pix) {
  __shared__ float scratch[kThreads / 32 + 1];
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t base = 0;
    float mu = 0.0f, rstd = 1.0f;
    const bool ok = patch_statistics(images, ids, channel_mean, channel_std, g, row, eps, norm_pix, scratch,
                                     &base, &mu, &rstd);
    for (uint32_t k = threadIdx.x; k < g.patch_dim; k += blockDim.x) {
      float value = std::numeric_limits<float>::quiet_NaN();
      if (ok) {
        const float x =
            normalised_pixel(images, base + g.value_offset(k), g.value_channel(k), channel_mean, channel_std);
        value = (x - mu) * rstd;
      }
      out[static_cast<int64_t>(row) * g.patch_dim + k] = value;
    }
  }
}

template <typename pred_t, typename pixel_t, typename index_t>
__global__ void masked_patch_loss_kernel(const pred_t* __restrict__ pred, const pixel_t* __restrict__ images,
                                         const index_t* __restrict__ ids, const float* channel_mean,
                                         const float* channel_std,
                                         float* __restrict__ row_squares, float* __restrict__ patch_mean,
                                         float* __restrict__ patch_rstd, PatchIndexer g, uint32_t rows, float eps,
                                         bool norm_pix) {
  __shared__ float scratch[kThreads / 32 + 1];
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    int64_t base = 0;
    float mu = 0.0f, rstd = 1.0f;
    const bool ok = patch_statistics(images, ids, channel_mean, channel_std, g, row, eps, norm_pix, scratch,
                                     &base, &mu, &rstd);
    float squares = 0.0f;
    if (ok) {
      for (uint32_t k = threadIdx.x; k < g.patch_dim; k += blockDim.x) {
        const float target =
            (normalised_pixel(images, base + g.value_offset(k), g.value_channel(k), channel_mean, channel_std) - mu) *
            rstd;
        const float d = static_cast<float>(pred[static_cast<int64_t>(row) * g.patch_dim + k]) - target;
        squares += d * d;
      }
    }
    const float total = block_sum(squares, scratch);
    if (threadIdx.x == 0) {
      row_squares[row] = ok ? total : std::numeric_limits<float>::quiet_NaN();
      if (norm_pix) {
        patch_mean[row] = mu;
        patch_rstd[row] = rstd;
      }
    }
  }
}

template <typename pred_t, typename pixel_t, typename index_t>
__global__ void masked_patch_loss_backward_kernel(const float* __restrict__ grad_loss, const pred_t* __restrict__ pred,
                                                  const pixel_t* __restrict__ images,
                                                  const index_t* __restrict__ ids, const float* channel_mean,
                                                  const float* channel_std, const float* patch_mean,
                                                  const float* patch_rstd, pred_t* __restrict__ grad_pred,
                                                  PatchIndexer g, uint32_t rows, float inv_count, bool norm_pix) {
  const RowValue at = row_and_value();
  if (at.row >= rows || at.value >= g.patch_dim) return;
  const int64_t e = static_cast<int64_t>(at.row) * g.patch_dim + at.value;
  const float scale = grad_loss[0] * 2.0f * inv_count;
  int64_t base = 0;
  float grad = 0.0f;
  if (g.patch_base(static_cast<int64_t>(ids[at.row]), at.row, &base)) {
    float target = normalised_pixel(images, base + g.value_offset(at.value), g.value_channel(at.value), channel_mean,
                                    channel_std);
    if (norm_pix) target = (target - patch_mean[at.row]) * patch_rstd[at.row];
    grad = (static_cast<float>(pred[e]) - target) * scale;
  }
  grad_pred[e] = static_cast<pred_t>(grad);
}

// Rows are (image, position) pairs of the (B, L) token grid: row = image * L + position.
struct TokenGrid {
  FastDivmod length;  // L
  uint32_t rows;      // B * L
  uint32_t dim;       // D
};

template <typename token_t, typename mask_t, typename pos_t, typename index_t>
__global__ void scatter_tokens_kernel(const token_t* __restrict__ visible, const index_t* __restrict__ ids,
                                      const mask_t* __restrict__ mask_token, const pos_t* pos,
                                      token_t* __restrict__ out, TokenGrid grid, int64_t n_visible,
                                      int64_t stride_vb, int64_t stride_vn, int64_t stride_vd) {
  const RowValue at = row_and_value();
  if (at.row >= grid.rows || at.value >= grid.dim) return;
  const uint32_t image = grid.length.div(at.row);
  const uint32_t position = grid.length.mod(at.row, image);
  const int64_t source = static_cast<int64_t>(ids[at.row]);
  const uint32_t d = at.value;
  float value = std::numeric_limits<float>::quiet_NaN();
  if (source >= 0 && source < grid.length.divisor) {
    if (source < n_visible) {
      value = static_cast<float>(visible[image * stride_vb + source * stride_vn + d * stride_vd]);
    } else {
      // rounded to the tokens' dtype first, as the reference's cat does
      value = static_cast<float>(static_cast<token_t>(static_cast<float>(mask_token[d])));
    }
    if (pos != nullptr) value += static_cast<float>(pos[static_cast<int64_t>(position) * grid.dim + d]);
  }
  out[static_cast<int64_t>(at.row) * grid.dim + d] = static_cast<token_t>(value);
}

template <typename grad_t, typename index_t>
__global__ void scatter_tokens_visible_grad_kernel(const grad_t* __restrict__ grad_out,
                                                   const index_t* __restrict__ ids, float* __restrict__ grad_visible,
                                                   TokenGrid grid, int64_t n_visible) {
  const RowValue at = row_and_value();
  if (at.row >= grid.rows || at.value >= grid.dim) return;
  const int64_t source = static_cast<int64_t>(ids[at.row]);
  if (source < 0 || source >= n_visible) return;
  const uint32_t image = grid.length.div(at.row);
  atomicAdd(grad_visible + (image * n_visible + source) * grid.dim + at.value,
            static_cast<float>(grad_out[static_cast<int64_t>(at.row) * grid.dim + at.value]));
}

// One thread per (position l, feature d): sums over the batch, deterministic order.
// mask_partial[l, d] = sum_b [ids[b, l] masked] grad_out[b, l, d]; pos_grad[l, d] = sum_b grad_out[b, l, d].
template <typename grad_t, typename index_t>
__global__ void scatter_tokens_column_grad_kernel(const grad_t* __restrict__ grad_out,
                                                  const index_t* __restrict__ ids, float* __restrict__ mask_partial,
                                                  float* pos_grad, TokenGrid grid, int64_t batch, int64_t n_visible) {
  const RowValue at = row_and_value();  // row = position
  const uint32_t length = grid.length.divisor;
  if (at.row >= length || at.value >= grid.dim) return;
  float masked = 0.0f, all = 0.0f;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = b * length + at.row;
    const float g = static_cast<float>(grad_out[row * grid.dim + at.value]);
    const int64_t source = static_cast<int64_t>(ids[row]);
    if (source >= n_visible && source < length) masked += g;
    all += g;
  }
  const int64_t e = static_cast<int64_t>(at.row) * grid.dim + at.value;
  mask_partial[e] = masked;
  if (pos_grad != nullptr) pos_grad[e] = all;
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

void check_patch_inputs(const at::Tensor& images, const at::Tensor& ids, int64_t patch) {
  check_cuda(images, "images");
  check_cuda(ids, "ids");
  TORCH_CHECK(images.dim() == 4, "images must be (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == images.size(0), "ids must be (B, n) with B = ", images.size(0),
              ", got ", ids.sizes());
  TORCH_CHECK(patch >= 1 && images.size(2) % patch == 0 && images.size(3) % patch == 0,
              "images height and width must be multiples of patch_size=", patch, ", got ", images.sizes());
  TORCH_CHECK(images.get_device() == ids.get_device(), "images and ids must be on one device");
}

// The indexer of `images` (or of a tensor of their shape and its strides) for patch rows `ids`,
// after checking that every index the kernels keep in 32 bits fits.
PatchIndexer make_indexer(const char* op, const at::Tensor& images, const at::Tensor& ids, int64_t patch) {
  const int64_t channels = images.size(1), grid_cols = images.size(3) / patch;
  const int64_t num_patches = (images.size(2) / patch) * grid_cols;
  const int64_t patch_dim = patch * patch * channels;
  checks::fits_int32(op, "B * n (patch rows)", ids.numel());
  checks::fits_int32(op, "L (patches per image)", num_patches);
  checks::fits_int32(op, "P (values per patch)", patch_dim);
  PatchIndexer g;
  g.stride_b = images.stride(0);
  g.stride_c = images.stride(1);
  g.stride_h = images.stride(2);
  g.stride_w = images.stride(3);
  g.num_patches = static_cast<uint32_t>(num_patches);
  g.patch = static_cast<uint32_t>(patch);
  g.patch_dim = static_cast<uint32_t>(patch_dim);
  g.channels = FastDivmod(static_cast<uint32_t>(channels > 0 ? channels : 1));
  g.patch_side = FastDivmod(static_cast<uint32_t>(patch));
  g.grid_cols = FastDivmod(static_cast<uint32_t>(grid_cols > 0 ? grid_cols : 1));
  g.rows_per_image = FastDivmod(static_cast<uint32_t>(ids.size(1) > 0 ? ids.size(1) : 1));
  return g;
}

// Grid and block of an element-wise kernel over (rows, values per row); see RowTiling.
struct ElementLaunch {
  dim3 grid;
  dim3 block;
};

ElementLaunch element_launch(const char* op, int64_t rows, int64_t values) {
  const RowTiling tiling = tile_rows_by_values(rows, values);
  return {checks::grid(op, tiling.blocks_x, tiling.blocks_y),
          dim3(static_cast<unsigned int>(tiling.threads_x), static_cast<unsigned int>(tiling.threads_y))};
}

// Blocks of a per-row reduction kernel (grid-stride over rows beyond the cap).
unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks);
}

TokenGrid make_token_grid(const char* op, int64_t batch, int64_t length, int64_t dim) {
  checks::fits_int32(op, "B * L (token rows)", batch * length);
  checks::fits_int32(op, "D", dim);
  TokenGrid grid;
  grid.length = FastDivmod(static_cast<uint32_t>(length > 0 ? length : 1));
  grid.rows = static_cast<uint32_t>(batch * length);
  grid.dim = static_cast<uint32_t>(dim);
  return grid;
}

const float* stats_pointer(const std::optional<at::Tensor>& stats, const at::Tensor& images, const char* name) {
  if (!stats.has_value()) return nullptr;
  const at::Tensor& t = *stats;
  TORCH_CHECK(t.is_cuda() && t.get_device() == images.get_device(), name, " must be on the images' device");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == images.size(1), name,
              " must be a contiguous float32 tensor of C=", images.size(1), " values");
  return t.data_ptr<float>();
}

at::Tensor gather_patches(const at::Tensor& images, const at::Tensor& ids_in, int64_t patch_size,
                          const std::optional<at::Tensor>& channel_mean, const std::optional<at::Tensor>& channel_std,
                          at::ScalarType out_dtype) {
  check_patch_inputs(images, ids_in, patch_size);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor ids = ids_in.contiguous();
  const PatchIndexer g = make_indexer("gather_patches", images, ids, patch_size);
  at::Tensor out = at::empty({images.size(0), ids.size(1), g.patch_dim}, images.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const float* mean_ptr = stats_pointer(channel_mean, images, "mean");
  const float* std_ptr = stats_pointer(channel_std, images, "std");
  TORCH_CHECK((mean_ptr == nullptr) == (std_ptr == nullptr), "mean and std must be given together");
  const ElementLaunch launch = element_launch("gather_patches", ids.numel(), g.patch_dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_pixels(images.scalar_type(), "images", [&](auto pixel_tag) {
    using pixel_t = decltype(pixel_tag);
    dispatch_floats(out_dtype, "out_dtype", [&](auto out_tag) {
      using out_t = decltype(out_tag);
      dispatch_index(ids.scalar_type(), "ids", [&](auto index_tag) {
        using index_t = decltype(index_tag);
        gather_patches_kernel<pixel_t, out_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
            images.data_ptr<pixel_t>(), ids.data_ptr<index_t>(), mean_ptr, std_ptr, out.data_ptr<out_t>(), g,
            static_cast<uint32_t>(ids.numel()));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

at::Tensor gather_patches_backward(const at::Tensor& grad_out_in, const at::Tensor& ids_in, int64_t patch_size,
                                   const std::optional<at::Tensor>& channel_std, const at::Tensor& images) {
  check_patch_inputs(images, ids_in, patch_size);
  check_cuda(grad_out_in, "grad_out");
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor grad_images = at::zeros_like(images, images.options().dtype(at::kFloat));
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const PatchIndexer g = make_indexer("gather_patches_backward", grad_images, ids, patch_size);
  TORCH_CHECK(grad_out.numel() == ids.numel() * g.patch_dim, "grad_out must be (B, n, P), got ", grad_out.sizes());
  if (grad_out.numel() == 0) return grad_images;
  const float* std_ptr = stats_pointer(channel_std, images, "std");
  const ElementLaunch launch = element_launch("gather_patches_backward", ids.numel(), g.patch_dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(grad_out.scalar_type(), "grad_out", [&](auto grad_tag) {
    using grad_t = decltype(grad_tag);
    dispatch_index(ids.scalar_type(), "ids", [&](auto index_tag) {
      using index_t = decltype(index_tag);
      gather_patches_backward_kernel<grad_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
          grad_out.data_ptr<grad_t>(), ids.data_ptr<index_t>(), std_ptr, grad_images.data_ptr<float>(), g,
          static_cast<uint32_t>(ids.numel()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_images;
}

at::Tensor patch_targets(const at::Tensor& images, const at::Tensor& ids_in, int64_t patch_size, bool norm_pix,
                         double eps, const std::optional<at::Tensor>& channel_mean,
                         const std::optional<at::Tensor>& channel_std) {
  check_patch_inputs(images, ids_in, patch_size);
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor ids = ids_in.contiguous();
  const PatchIndexer g = make_indexer("patch_targets", images, ids, patch_size);
  TORCH_CHECK(!norm_pix || g.patch_dim >= 2, "norm_pix needs at least 2 values per patch");
  at::Tensor out = at::empty({images.size(0), ids.size(1), g.patch_dim}, images.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const float* mean_ptr = stats_pointer(channel_mean, images, "mean");
  const float* std_ptr = stats_pointer(channel_std, images, "std");
  const auto stream = at::cuda::getCurrentCUDAStream();
  const uint32_t rows = static_cast<uint32_t>(ids.numel());
  dispatch_pixels(images.scalar_type(), "images", [&](auto pixel_tag) {
    using pixel_t = decltype(pixel_tag);
    dispatch_index(ids.scalar_type(), "ids", [&](auto index_tag) {
      using index_t = decltype(index_tag);
      patch_targets_kernel<pixel_t, index_t><<<row_blocks(rows), kThreads, 0, stream>>>(
          images.data_ptr<pixel_t>(), ids.data_ptr<index_t>(), mean_ptr, std_ptr, out.data_ptr<float>(), g, rows,
          static_cast<float>(eps), norm_pix);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_patch_loss(
    const at::Tensor& pred_in, const at::Tensor& images, const at::Tensor& ids_in, int64_t patch_size,
    bool norm_pix, double eps, const std::optional<at::Tensor>& channel_mean,
    const std::optional<at::Tensor>& channel_std) {
  check_patch_inputs(images, ids_in, patch_size);
  check_cuda(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor pred = pred_in.contiguous();
  const PatchIndexer g = make_indexer("masked_patch_loss", images, ids, patch_size);
  const int64_t rows = ids.numel();
  TORCH_CHECK(pred.numel() == rows * g.patch_dim, "pred must be (B, n, P), got ", pred.sizes());
  TORCH_CHECK(!norm_pix || g.patch_dim >= 2, "norm_pix needs at least 2 values per patch");
  const auto f32 = images.options().dtype(at::kFloat);
  at::Tensor row_squares = at::empty({rows}, f32);
  at::Tensor patch_mean = at::empty({norm_pix ? rows : 1}, f32);
  at::Tensor patch_rstd = at::empty({norm_pix ? rows : 1}, f32);
  if (rows == 0) return {row_squares.sum(), patch_mean, patch_rstd};
  const float* mean_ptr = stats_pointer(channel_mean, images, "mean");
  const float* std_ptr = stats_pointer(channel_std, images, "std");
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(pred.scalar_type(), "pred", [&](auto pred_tag) {
    using pred_t = decltype(pred_tag);
    dispatch_pixels(images.scalar_type(), "images", [&](auto pixel_tag) {
      using pixel_t = decltype(pixel_tag);
      dispatch_index(ids.scalar_type(), "ids", [&](auto index_tag) {
        using index_t = decltype(index_tag);
        masked_patch_loss_kernel<pred_t, pixel_t, index_t><<<row_blocks(rows), kThreads, 0, stream>>>(
            pred.data_ptr<pred_t>(), images.data_ptr<pixel_t>(), ids.data_ptr<index_t>(), mean_ptr, std_ptr,
            row_squares.data_ptr<float>(), patch_mean.data_ptr<float>(), patch_rstd.data_ptr<float>(), g,
            static_cast<uint32_t>(rows), static_cast<float>(eps), norm_pix);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  at::Tensor loss = row_squares.sum() / static_cast<double>(rows * g.patch_dim);
  return {loss, patch_mean, patch_rstd};
}

at::Tensor masked_patch_loss_backward(const at::Tensor& grad_loss, const at::Tensor& pred_in,
                                      const at::Tensor& images, const at::Tensor& ids_in, int64_t patch_size,
                                      bool norm_pix, const std::optional<at::Tensor>& channel_mean,
                                      const std::optional<at::Tensor>& channel_std, const at::Tensor& patch_mean,
                                      const at::Tensor& patch_rstd) {
  check_patch_inputs(images, ids_in, patch_size);
  check_cuda(pred_in, "pred");
  const c10::cuda::CUDAGuard guard(images.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor grad_scalar = grad_loss.to(at::kFloat).contiguous();
  const PatchIndexer g = make_indexer("masked_patch_loss_backward", images, ids, patch_size);
  const int64_t rows = ids.numel();
  TORCH_CHECK(pred.numel() == rows * g.patch_dim, "pred must be (B, n, P), got ", pred.sizes());
  TORCH_CHECK(grad_scalar.numel() == 1, "grad_loss must be a scalar");
  at::Tensor grad_pred = at::empty_like(pred);
  if (pred.numel() == 0) return grad_pred;
  TORCH_CHECK(!norm_pix || (patch_mean.numel() == rows && patch_rstd.numel() == rows),
              "patch_mean and patch_rstd must hold one value per patch row");
  const float* mean_ptr = stats_pointer(channel_mean, images, "mean");
  const float* std_ptr = stats_pointer(channel_std, images, "std");
  const float inv_count = 1.0f / static_cast<float>(rows * g.patch_dim);
  const ElementLaunch launch = element_launch("masked_patch_loss_backward", rows, g.patch_dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_floats(pred.scalar_type(), "pred", [&](auto pred_tag) {
    using pred_t = decltype(pred_tag);
    dispatch_pixels(images.scalar_type(), "images", [&](auto pixel_tag) {
      using pixel_t = decltype(pixel_tag);
      dispatch_index(ids.scalar_type(), "ids", [&](auto index_tag) {
        using index_t = decltype(index_tag);
        masked_patch_loss_backward_kernel<pred_t, pixel_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
            grad_scalar.data_ptr<float>(), pred.data_ptr<pred_t>(), images.data_ptr<pixel_t>(),
            ids.data_ptr<index_t>(), mean_ptr, std_ptr, patch_mean.data_ptr<float>(), patch_rstd.data_ptr<float>(),
            grad_pred.data_ptr<pred_t>(), g, static_cast<uint32_t>(rows), inv_count, norm_pix);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad_pred;
}

at::Tensor scatter_tokens(const at::Tensor& visible, const at::Tensor& ids_in, const at::Tensor& mask_token_in,
                          const std::optional<at::Tensor>& pos_in) {
  check_cuda(visible, "visible_tokens");
  check_cuda(ids_in, "ids_restore");
  check_cuda(mask_token_in, "mask_token");
  TORCH_CHECK(visible.dim() == 3, "visible_tokens must be (B, n_vis, D), got ", visible.sizes());
  const int64_t batch = visible.size(0), n_visible = visible.size(1), dim = visible.size(2);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == batch && ids_in.size(1) >= n_visible,
              "ids_restore must be (B, L) with L >= n_vis, got ", ids_in.sizes());
  TORCH_CHECK(mask_token_in.numel() == dim, "mask_token must hold D=", dim, " values");
  const int64_t length = ids_in.size(1);
  const c10::cuda::CUDAGuard guard(visible.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor mask_token = mask_token_in.contiguous();
  at::Tensor pos;
  if (pos_in.has_value()) {
    check_cuda(*pos_in, "pos_embed");
    TORCH_CHECK(pos_in->numel() == length * dim, "pos_embed must be (L, D) = (", length, ", ", dim, ")");
    pos = pos_in->contiguous();
  }
  at::Tensor out = at::empty({batch, length, dim}, visible.options());
  if (out.numel() == 0) return out;
  const TokenGrid grid = make_token_grid("scatter_tokens", batch, length, dim);
  const ElementLaunch launch = element_launch("scatter_tokens", batch * length, dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType pos_type = pos.defined() ? pos.scalar_type() : visible.scalar_type();
  dispatch_floats(visible.scalar_type(), "visible_tokens", [&](auto token_tag) {
    using token_t = decltype(token_tag);
    dispatch_floats(mask_token.scalar_type(), "mask_token", [&](auto mask_tag) {
      using mask_t = decltype(mask_tag);
      dispatch_floats(pos_type, "pos_embed", [&](auto pos_tag) {
        using pos_t = decltype(pos_tag);
        dispatch_index(ids.scalar_type(), "ids_restore", [&](auto index_tag) {
          using index_t = decltype(index_tag);
          const pos_t* pos_ptr = pos.defined() ? pos.data_ptr<pos_t>() : nullptr;
          scatter_tokens_kernel<token_t, mask_t, pos_t, index_t><<<launch.grid, launch.block, 0, stream>>>(
              visible.data_ptr<token_t>(), ids.data_ptr<index_t>(), mask_token.data_ptr<mask_t>(), pos_ptr,
              out.data_ptr<token_t>(), grid, n_visible, visible.stride(0), visible.stride(1), visible.stride(2));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_tokens_backward(const at::Tensor& grad_out_in,
                                                                       const at::Tensor& ids_in, int64_t n_visible,
                                                                       bool has_pos) {
  check_cuda(grad_out_in, "grad_out");
  check_cuda(ids_in, "ids_restore");
  TORCH_CHECK(grad_out_in.dim() == 3, "grad_out must be (B, L, D), got ", grad_out_in.sizes());
  const int64_t batch = grad_out_in.size(0), length = grad_out_in.size(1), dim = grad_out_in.size(2);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == batch && ids_in.size(1) == length,
              "ids_restore must be (B, L) = (", batch, ", ", length, "), got ", ids_in.sizes());
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor ids = ids_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const auto f32 = grad_out.options().dtype(at::kFloat);
  at::Tensor grad_visible = at::zeros({batch, n_visible, dim}, f32);
  at::Tensor mask_partial = at::zeros({length, dim}, f32);
  at::Tensor grad_pos = has_pos ? at::zeros({length, dim}, f32) : at::Tensor();
  if (grad_out.numel() > 0) {
    const TokenGrid grid = make_token_grid("scatter_tokens_backward", batch, length, dim);
    const ElementLaunch rows_launch = element_launch("scatter_tokens_backward", batch * length, dim);
    const ElementLaunch columns_launch = element_launch("scatter_tokens_backward", length, dim);
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_floats(grad_out.scalar_type(), "grad_out", [&](auto grad_tag) {
      using grad_t = decltype(grad_tag);
      dispatch_index(ids.scalar_type(), "ids_restore", [&](auto index_tag) {
        using index_t = decltype(index_tag);
        if (n_visible > 0) {
          scatter_tokens_visible_grad_kernel<grad_t, index_t><<<rows_launch.grid, rows_launch.block, 0, stream>>>(
              grad_out.data_ptr<grad_t>(), ids.data_ptr<index_t>(), grad_visible.data_ptr<float>(), grid, n_visible);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        scatter_tokens_column_grad_kernel<grad_t, index_t><<<columns_launch.grid, columns_launch.block, 0, stream>>>(
            grad_out.data_ptr<grad_t>(), ids.data_ptr<index_t>(), mask_partial.data_ptr<float>(),
            has_pos ? grad_pos.data_ptr<float>() : nullptr, grid, batch, n_visible);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  at::Tensor grad_mask = mask_partial.sum(0);
  if (!has_pos) grad_pos = at::zeros({0}, f32);
  return {grad_visible, grad_mask, grad_pos};
}

}  // namespace
}  // namespace patches
}  // namespace pacofr

TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) {
  m.def("gather_patches(Tensor images, Tensor ids, int patch_size, Tensor? mean, Tensor? std, "
        "ScalarType out_dtype) -> Tensor");
  m.def("gather_patches_backward(Tensor grad_out, Tensor ids, int patch_size, Tensor? std, Tensor images) -> Tensor");
  m.def("patch_targets(Tensor images, Tensor ids, int patch_size, bool norm_pix, float eps, Tensor? mean, "
        "Tensor? std) -> Tensor");
  m.def("masked_patch_loss(Tensor pred, Tensor images, Tensor ids, int patch_size, bool norm_pix, float eps, "
        "Tensor? mean, Tensor? std) -> (Tensor, Tensor, Tensor)");
  m.def("masked_patch_loss_backward(Tensor grad_loss, Tensor pred, Tensor images, Tensor ids, int patch_size, "
        "bool norm_pix, Tensor? mean, Tensor? std, Tensor patch_mean, Tensor patch_rstd) -> Tensor");
  m.def("scatter_tokens(Tensor visible, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor");
  m.def("scatter_tokens_backward(Tensor grad_out, Tensor ids_restore, int n_visible, bool has_pos) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pacofr_cuda, CUDA, m) {
  m.impl("gather_patches", &pacofr::patches::gather_patches);
  m.impl("gather_patches_backward", &pacofr::patches::gather_patches_backward);
  m.impl("patch_targets", &pacofr::patches::patch_targets);
  m.impl("masked_patch_loss", &pacofr::patches::masked_patch_loss);
  m.impl("masked_patch_loss_backward", &pacofr::patches::masked_patch_loss_backward);
  m.impl("scatter_tokens", &pacofr::patches::scatter_tokens);
  m.impl("scatter_tokens_backward", &pacofr::patches::scatter_tokens_backward);
}
