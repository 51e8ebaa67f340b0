// Building blocks of the CUDA kernels, shared by the op entry points in this folder
// (importance.cu, select.cu, merge.cu, prune.cu), the twins of csrc/cpu/kernels.h. Each runs on
// the current stream of the inputs' device and never synchronizes with the host, so `prune` can
// be captured in a CUDA graph. Design, launch shapes and memory: docs/CUDA.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>

namespace evoprune::cuda {

// An attribute of the current device (SM count, shared memory limit). A cached driver query, no
// synchronization. (ATen/cuda/CUDAContext.h would give the same but includes the cuBLAS and
// cuSPARSE headers, which a CUDA toolkit without those libraries lacks; this folder needs neither.)
inline int current_device_attribute(cudaDeviceAttr attribute) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, c10::cuda::current_device()));
  return value;
}

// Section 1: importance[B,N] float32 = mean over heads and query rows of attn[B,H,Q,N] (any strides).
at::Tensor attention_importance(const at::Tensor& attn);

// Sections 1-3: the greedy on metric [B,N,Dm] (any strides), guided by importance ([B,N] in the
// accumulation dtype, or undefined for none). Returns index [B,keep] and slot [B,N], int64.
std::tuple<at::Tensor, at::Tensor> select_tokens(const at::Tensor& metric, const at::Tensor& importance, int64_t keep,
                                                 double alpha, int64_t protect);

// Section 4: out [B,K,D] and sizes_out [B,K] float32 from tokens (any strides), sizes (float32
// [B,N], or undefined for all ones), index [B,K] and slot [B,N]. merge = true: size-weighted
// merge into the slots; false: gather at index. Out-of-range index/slot values and negative or
// non-finite sizes stop the kernel with a device-side assertion (reading them would need a sync;
// the `merge` op reads them before, see merge.cu).
std::tuple<at::Tensor, at::Tensor> merge_tokens(const at::Tensor& tokens, const at::Tensor& sizes,
                                                const at::Tensor& index, const at::Tensor& slot, bool merge);

}  // namespace evoprune::cuda
