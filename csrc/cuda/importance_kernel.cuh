// Device code of `importance` (SPEC.md section 1) and its launch policy, included by
// importance.cu (nvcc) and by the CPU execution model of the tests (python_tests/kernels/); no
// ATen here. The design is described in importance.cu.
#pragma once

#include <algorithm>
#include <cstdint>

#include "device.cuh"

namespace evoprune::cuda {

constexpr int kImportanceColumns = 32;  // columns per block: one warp's coalesced 128-byte row segment
constexpr int kRowWarps = 8;            // warps per block, each summing every 8th row of the block's range
constexpr int kBlocksPerSM = 4;         // blocks the row splits aim for, per SM
constexpr int kFinishThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kImportanceColumns* kRowWarps)
    column_partial_sums(const scalar_t* __restrict__ attn, int64_t n, int64_t queries, int64_t rows,
                        int64_t rows_per_split, int64_t sb, int64_t sh, int64_t sq, int64_t sn,
                        acc_t* __restrict__ partial) {
  using Sums = acc_t[kRowWarps][kImportanceColumns + 1];
  EVOPRUNE_SHARED(Sums, sums);
  const int64_t j = int64_t(blockIdx.x) * kImportanceColumns + threadIdx.x;
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

// The launches of importance for one call, a plain function of the shapes and the SM count, so
// that tests can drive them on the CPU (python_tests/kernels/). `rows` = H*Q > 0, B*N > 0.
struct ImportancePlan {
  int64_t splits;          // ranges of rows, each summed by its own blocks
  int64_t rows_per_split;
  dim3 grid;               // (column blocks, B, splits) of column_partial_sums
  dim3 block;              // (kImportanceColumns, kRowWarps)
  unsigned finish_blocks;  // of finish_importance, kFinishThreads each
};

inline ImportancePlan plan_importance(int64_t batch, int64_t n, int64_t rows, int64_t sms) {
  ImportancePlan plan{};
  const int64_t column_blocks = (n + kImportanceColumns - 1) / kImportanceColumns;
  const int64_t max_splits = (rows + kRowWarps - 1) / kRowWarps;
  const int64_t wanted = (kBlocksPerSM * sms + column_blocks * batch - 1) / (column_blocks * batch);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(max_splits, 65535));
  plan.rows_per_split = (rows + splits - 1) / splits;
  plan.splits = (rows + plan.rows_per_split - 1) / plan.rows_per_split;
  plan.grid =
      dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(batch), static_cast<unsigned>(plan.splits));
  plan.block = dim3(kImportanceColumns, kRowWarps);
  plan.finish_blocks = static_cast<unsigned>((batch * n + kFinishThreads - 1) / kFinishThreads);
  return plan;
}

}  // namespace evoprune::cuda
