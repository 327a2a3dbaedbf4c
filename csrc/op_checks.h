// Argument checks shared by the CUDA entry points (torch.ops.pacofr_cuda.*). Every op validates
// shapes, dtypes and values first, then that all tensors share one device, then that the device is
// a CUDA device: the same entry function is registered for the CPU key too, so these checks run
// (and are tested) on machines without a GPU, where the last one raises "needs CUDA tensors".
// Errors name the op and the argument: ValueError for shapes and values, TypeError for dtypes,
// RuntimeError for devices and launch limits.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "code_ranking.h"
#include "launch_limits.h"

namespace pacofr {
namespace checks {

using NamedTensor = std::pair<const char*, const at::Tensor*>;

inline void same_device(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  for (const NamedTensor& item : tensors) {
    if (item.second == nullptr || !item.second->defined()) continue;
    TORCH_CHECK(item.second->device() == first.second->device(), op, ": ", item.first, " is on ",
                item.second->device(), " but ", first.first, " is on ", first.second->device(),
                "; all tensors must be on one device");
  }
}

inline void needs_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": the cuda backend needs CUDA tensors, got ", name, " on ", t.device());
}

inline void float_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", type);
}

inline void dtype_is(const char* op, const char* name, const at::Tensor& t, at::ScalarType type) {
  TORCH_CHECK_TYPE(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ", t.scalar_type());
}

inline void shape_is(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

inline void contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// A size that the kernels keep in 32-bit arithmetic.
inline void fits_int32(const char* op, const char* what, int64_t value) {
  TORCH_CHECK_VALUE(value >= 0 && value <= 2147483647, op, ": ", what, " = ", value,
                    " is outside the 32-bit range the cuda kernels index with (at most 2^31 - 1)");
}

inline ranking::Precision precision(const char* op, const std::string& name) {
  if (name == "ieee") return ranking::Precision::kIeee;
  if (name == "tf32") return ranking::Precision::kTf32;
  if (name == "tf32x3") return ranking::Precision::kTf32x3;
  TORCH_CHECK_VALUE(false, op, ": input_precision must be 'ieee', 'tf32' or 'tf32x3', got '", name, "'");
  return ranking::Precision::kIeee;
}

inline ranking::InputType input_type(at::ScalarType type) {
  if (type == at::kHalf) return ranking::InputType::kFloat16;
  if (type == at::kBFloat16) return ranking::InputType::kBFloat16;
  return ranking::InputType::kFloat32;
}

// Grid of `x` (and `y`) blocks after checking CUDA's limits.
inline dim3 grid(const char* op, int64_t x, int64_t y = 1) {
  TORCH_CHECK(launch::grid_fits(x, y), op, ": the launch needs a grid of ", x, " x ", y, " blocks; CUDA allows at most ",
              launch::kMaxGridX, " x ", launch::kMaxGridYZ);
  return dim3(static_cast<unsigned int>(x), static_cast<unsigned int>(y));
}

// `t` contiguous with its first element 16-byte aligned (the ranking kernel reads it with 16-byte
// cp.async copies): `t` itself when it already is, else a copy.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor out = t.contiguous();
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) return out.clone();
  return out;
}

// Rows of a (R, D) float tensor as the ranking kernel reads them: contiguous, 16-byte aligned,
// and D zero-padded to a multiple of 16 bytes (zeros change no dot product).
inline at::Tensor padded_rows(const at::Tensor& t) {
  const int64_t per_vector = 16 / static_cast<int64_t>(t.element_size());
  const int64_t padded = (t.size(1) + per_vector - 1) / per_vector * per_vector;
  if (padded != t.size(1)) return at::constant_pad_nd(t.contiguous(), {0, padded - t.size(1)});
  return aligned_contiguous(t);
}

}  // namespace checks
}  // namespace pacofr
