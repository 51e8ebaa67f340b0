// evoprune_ext._C: the shared library that registers the ops (csrc/ops.cpp and the kernels
// linked beside it) and, as a pybind11 module, reports how it was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifndef EVOPRUNE_VERSION
#define EVOPRUNE_VERSION "unknown"
#endif
#ifndef EVOPRUNE_CUDA_ARCHS
#define EVOPRUNE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "evoprune_ext native library: registers torch.ops.evoprune.* and reports build info";
  m.def("build_info", [] {
    py::dict info;
    info["version"] = EVOPRUNE_VERSION;
#ifdef EVOPRUNE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_archs"] = EVOPRUNE_CUDA_ARCHS;
    info["torch_built_with"] = TORCH_VERSION;
    info["num_threads"] = at::get_num_threads();
    info["parallel_backend"] = at::get_parallel_info();
    // ATen defines INTRA_OP_PARALLEL where at::parallel_for can use threads in this library: always under
    // torch's native backend, and under its OpenMP backend only when this library was compiled with OpenMP.
#ifdef INTRA_OP_PARALLEL
    info["parallel_kernels"] = true;
#else
    info["parallel_kernels"] = false;
#endif
    return info;
  }, "How this library was built and the intra-op threads it will use.");
}
