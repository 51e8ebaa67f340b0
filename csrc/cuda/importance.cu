// CUDA kernels of `importance` and `importance_from_qk` (SPEC.md sections 1 and 6).
//
// importance: one pass over attn [B,H,Q,N] (any strides), coalesced along N. Block (32, 8): the 32
// threads of a warp own 32 adjacent columns, the 8 warps split the H*Q rows, and the grid's third
// dimension splits the rows further into `splits` ranges so that small batches still fill the GPU.
// Each block sums its rows per column in float32/float64, reduces its 8 warps in a fixed order and
// writes one partial per (split, sample, column); a second kernel adds the splits in order. No
// atomics: the result depends only on the shapes and the device's SM count. Extra memory:
// splits*B*N accumulation-dtype partials.
// importance_from_qk: the blocked ATen composition of csrc/composite.cpp, shared with the CPU
// (cuBLAS GEMMs; docs/CUDA.md says why this beats a hand-written flash kernel here).
// The kernels and the launch policy (plan_importance) live in importance_kernel.cuh, which the
// tests also execute on the CPU (make test-kernels).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"
#include "../composite.h"
#include "importance_kernel.cuh"
#include "kernels.cuh"

namespace evoprune::cuda {
namespace {

at::Tensor importance_cuda(const at::Tensor& attn) {
  check_attention(attn);
  return attention_importance(attn);
}

at::Tensor importance_from_qk_cuda(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_qk(q, k, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  return importance_from_qk_blocked(q, k, scale);
}

}  // namespace

at::Tensor attention_importance(const at::Tensor& attn) {
  const c10::cuda::CUDAGuard guard(attn.device());
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), n = attn.size(3);
  at::Tensor importance = at::empty({batch, n}, attn.options().dtype(at::kFloat));
  const int64_t rows = heads * queries;
  TORCH_CHECK(batch <= 65535, "importance on CUDA supports B <= 65535, got ", batch);
  if (batch == 0 || n == 0) return importance;
  if (rows == 0) return importance.fill_(std::numeric_limits<float>::quiet_NaN());  // a mean over nothing

  const ImportancePlan plan =
      plan_importance(batch, n, rows, current_device_attribute(cudaDevAttrMultiProcessorCount));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "evoprune_importance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial =
        at::empty({plan.splits, batch, n}, attn.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    column_partial_sums<scalar_t, acc_t><<<plan.grid, plan.block, 0, stream>>>(
        attn.const_data_ptr<scalar_t>(), n, queries, rows, plan.rows_per_split, attn.stride(0), attn.stride(1),
        attn.stride(2), attn.stride(3), partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_importance<acc_t><<<plan.finish_blocks, kFinishThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), plan.splits, batch * n, static_cast<acc_t>(rows),
        importance.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return importance;
}

TORCH_LIBRARY_IMPL(evoprune, CUDA, m) {
  m.impl("importance", &importance_cuda);
  m.impl("importance_from_qk", &importance_from_qk_cuda);
}

}  // namespace evoprune::cuda
