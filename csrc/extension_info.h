// Build facts of pacofr._C (implemented in extension_info.cu, bound in binding.cpp).
#pragma once

#include <string>
#include <tuple>
#include <vector>

namespace pacofr {

// Compute capabilities (e.g. 80, 90) this extension was compiled for, from nvcc's __CUDA_ARCH_LIST__.
std::vector<int> compiled_arches();

// (ok, message): whether a kernel image of this extension can run on CUDA device `device_index`.
std::tuple<bool, std::string> probe_kernel_image(int device_index);

}  // namespace pacofr
