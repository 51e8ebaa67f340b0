// What the kernel headers (*_kernel.cuh) need beyond CUDA C++ itself, spelled once for both ways
// they are compiled: by nvcc into the extension, and as host C++ by the test-only CPU execution
// model (python_tests/kernels/cuda_sim.h), which runs the same device code without a GPU
// (docs/CUDA.md, "Executing the kernels on the CPU"). The kernel headers include no ATen.
#pragma once

#if defined(__CUDACC__)
#include <c10/macros/Macros.h>

// A failed check stops the kernel; the error surfaces on the next synchronizing call.
#define EVOPRUNE_DEVICE_ASSERT(condition, message) CUDA_KERNEL_ASSERT((condition) && message)
// A static shared variable of the block (`type` may be an array type, through an alias).
#define EVOPRUNE_SHARED(type, name) __shared__ type name
// The block's dynamic shared memory (the launch's third <<<>>> argument) as an array of `type`.
#define EVOPRUNE_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#else
#include "cuda_sim.h"

#define EVOPRUNE_DEVICE_ASSERT(condition, message) \
  ::evoprune::sim::device_assert(static_cast<bool>(condition), message, __FILE__, __LINE__)
// The simulator gives each block fresh, garbage-filled shared variables, as a GPU does.
#define EVOPRUNE_SHARED(type, name) type& name = ::evoprune::sim::static_shared<type>(__FILE__, __LINE__)
#define EVOPRUNE_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::evoprune::sim::dynamic_shared())
#endif

namespace evoprune::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

}  // namespace evoprune::cuda
