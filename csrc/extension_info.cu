// Build facts of pacofr._C: which architectures it was compiled for, and whether one of its
// kernel images can run on a given device.
#include "extension_info.h"

#include <cuda_runtime.h>

#include <sstream>

namespace pacofr {
namespace {

__global__ void probe_kernel(int* out) {
  if (out != nullptr) *out = 1;
}

}  // namespace

std::vector<int> compiled_arches() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

std::tuple<bool, std::string> probe_kernel_image(int device_index) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err)};
  }
  if (device_index < 0 || device_index >= count) {
    std::ostringstream msg;
    msg << "device_index " << device_index << " is out of range: " << count << " CUDA devices visible";
    return {false, msg.str()};
  }
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device_index);
  cudaFuncAttributes attr{};
  err = cudaFuncGetAttributes(&attr, probe_kernel);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls are not affected
    return {false, std::string("no kernel image for this device: ") + cudaGetErrorString(err)};
  }
  std::ostringstream msg;
  msg << "kernel image sm_" << attr.binaryVersion << " (PTX " << attr.ptxVersion << ") runs on device "
      << device_index;
  return {true, msg.str()};
}

}  // namespace pacofr
