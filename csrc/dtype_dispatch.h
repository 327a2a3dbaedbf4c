// dtype dispatch shared by the CUDA kernels: a generic lambda receives a value of the element
// type as a tag (fn(float{}), fn(at::Half{}), ...), so one kernel template serves every dtype.
#pragma once

#include <ATen/ATen.h>

namespace pacofr {

// float32 / float16 / bfloat16; any other dtype is a TORCH_CHECK error naming the argument.
template <typename Fn>
void dispatch_floats(at::ScalarType type, const char* name, Fn&& fn) {
  switch (type) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", type);
  }
}

}  // namespace pacofr
