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
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "../composite.h"
#include "kernels.cuh"

namespace evoprune::cuda {
namespace {

constexpr int kColumns = 32;    // columns per block: one warp's coalesced 128-byte row segment
constexpr int kRowWarps = 8;    // warps per block, each summing every 8th row of the block's range
constexpr int kBlocksPerSM = 4;  // blocks the row splits aim for, per SM

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColumns* kRowWarps)
    column_partial_sums(const scalar_t* __restrict__ attn, int64_t n, int64_t queries, int64_t rows,
                        int64_t rows_per_split, int64_t sb, int64_t sh, int64_t sq, int64_t sn,
                        acc_t* __restrict__ partial) {
  __shared__ acc_t sums[kRowWarps][kColumns + 1];
  const int64_t j = int64_t(blockIdx.x) * kColumns + threadIdx.x;
  const int64_t b = blockIdx.y, split = blockIdx.z;
  const int64_t r0 = split * rows_per_split, r1 = std::min(rows, r0 + rows_per_split);
  acc_t sum = 0;
  if (j < n) {
    const scalar_t* column = attn + b * sb + j * sn;
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowWarps) {
      sum += static_cast<acc_t>(column[(r / queries) * sh + (r % queries) * sq]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    acc_t total = 0;
    for (int w = 0; w < kRowWarps; ++w) total += sums[w][threadIdx.x];
    partial[(split * gridDim.y + b) * n + j] = total;
  }
}

template <typename acc_t>
__global__ void finish_importance(const acc_t* __restrict__ partial, int64_t splits, int64_t columns, acc_t rows,
                                  float* __restrict__ importance) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= columns) return;
  acc_t total = 0;
  for (int64_t s = 0; s < splits; ++s) total += partial[s * columns + i];
  importance[i] = static_cast<float>(total / rows);
}

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

  const int64_t column_blocks = (n + kColumns - 1) / kColumns;
  const int64_t sms = current_device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t max_splits = (rows + kRowWarps - 1) / kRowWarps;
  const int64_t wanted = (kBlocksPerSM * sms + column_blocks * batch - 1) / (column_blocks * batch);
  int64_t splits = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(max_splits, 65535));
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  splits = (rows + rows_per_split - 1) / rows_per_split;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "evoprune_importance_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({splits, batch, n}, attn.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(batch), static_cast<unsigned>(splits));
    const dim3 block(kColumns, kRowWarps);
    column_partial_sums<scalar_t, acc_t><<<grid, block, 0, stream>>>(
        attn.const_data_ptr<scalar_t>(), n, queries, rows, rows_per_split, attn.stride(0), attn.stride(1),
        attn.stride(2), attn.stride(3), partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    constexpr int threads = 256;
    const int64_t columns = batch * n;
    finish_importance<acc_t><<<static_cast<unsigned>((columns + threads - 1) / threads), threads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), splits, columns, static_cast<acc_t>(rows),
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
