// Python module pacofr._C. Ops register themselves with the dispatcher in their own .cu files
// (TORCH_LIBRARY_FRAGMENT(pacofr_cuda, m) / TORCH_LIBRARY_IMPL(pacofr_cuda, CUDA, m)) and are
// called as torch.ops.pacofr_cuda.<name>; this file binds only the build facts.
#include <torch/extension.h>

#include "extension_info.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pacofr CUDA kernels (ops live in torch.ops.pacofr_cuda)";
  m.def("compiled_arches", &pacofr::compiled_arches,
        "Compute capabilities this extension was compiled for, e.g. [80, 90].");
  m.def("probe_kernel_image", &pacofr::probe_kernel_image, pybind11::arg("device_index") = 0,
        "(ok, message): whether a kernel image of this extension runs on the given CUDA device.");
}
