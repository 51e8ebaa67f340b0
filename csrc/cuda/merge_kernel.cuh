// Device code of `merge` and of prune's merge/gather step (SPEC.md section 4) and its launch
// policy, included by merge.cu (nvcc) and by the CPU execution model of the tests
// (python_tests/kernels/); no ATen here. The design is described in merge.cu.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../math.h"
#include "device.cuh"

namespace evoprune::cuda {

constexpr int kMergeColumns = 128;  // feature columns per block
constexpr int kCheckThreads = 256;

struct Sizes {
  const float* data;  // nullptr: all ones
  int64_t sb, sn;
};

template <typename acc_t>
__device__ __forceinline__ acc_t size_of(const Sizes& sizes, int64_t b, int64_t j) {
  return sizes.data == nullptr ? acc_t(1) : static_cast<acc_t>(sizes.data[b * sizes.sb + j * sizes.sn]);
}

struct Tokens {
  int64_t n, d, sb, sn, sd;
};

__global__ void check_sizes_values(Sizes sizes, int64_t batch, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * kCheckThreads + threadIdx.x;
  if (i >= batch * n) return;
  const float s = sizes.data[(i / n) * sizes.sb + (i % n) * sizes.sn];
  EVOPRUNE_DEVICE_ASSERT(is_finite(s) && s >= 0.0f, "sizes must be finite and >= 0");
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeColumns)
    accumulate_groups(const scalar_t* __restrict__ x, Tokens t, Sizes sizes, const int64_t* __restrict__ slot,
                      int64_t keep, acc_t* __restrict__ sums, acc_t* __restrict__ group_size,
                      int32_t* __restrict__ members) {
  const int64_t b = blockIdx.y, c = int64_t(blockIdx.x) * kMergeColumns + threadIdx.x;
  const bool counts_groups = blockIdx.x == 0 && threadIdx.x == 0;
  const bool has_column = c < t.d;
  const scalar_t* xb = x + b * t.sb + (has_column ? c : 0) * t.sd;
  acc_t* sums_b = sums + b * keep * t.d + (has_column ? c : 0);
  for (int64_t j = 0; j < t.n; ++j) {
    const int64_t p = slot[b * t.n + j];
    const bool valid = p >= -1 && p < keep;
    EVOPRUNE_DEVICE_ASSERT(valid, "slot must be in [-1, K)");
    if (!valid || p < 0) continue;
    const acc_t weight = size_of<acc_t>(sizes, b, j);
    if (has_column) sums_b[p * t.d] += weight * static_cast<acc_t>(xb[j * t.sn]);
    if (counts_groups) {
      group_size[b * keep + p] += weight;
      members[b * keep + p] += 1;
    }
  }
}

// The kept token of output position (b, p), checked against index/slot.
__device__ __forceinline__ int64_t kept_token(const int64_t* index, const int64_t* slot, int64_t n, int64_t keep,
                                              int64_t b, int64_t p, bool check_slot) {
  const int64_t kept = index[b * keep + p];
  const bool in_range = kept >= 0 && kept < n;
  EVOPRUNE_DEVICE_ASSERT(in_range, "index must be in [0, N)");
  if (!in_range) return -1;
  if (check_slot) EVOPRUNE_DEVICE_ASSERT(slot[b * n + kept] == p, "slot must map each kept token to its own position");
  return kept;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeColumns)
    finish_groups(const scalar_t* __restrict__ x, Tokens t, const int64_t* __restrict__ index,
                  const int64_t* __restrict__ slot, int64_t keep, const acc_t* __restrict__ sums,
                  const acc_t* __restrict__ group_size, const int32_t* __restrict__ members,
                  scalar_t* __restrict__ out, float* __restrict__ sizes_out) {
  const int64_t row = blockIdx.x, b = row / keep, p = row % keep;
  const int64_t c = int64_t(blockIdx.y) * kMergeColumns + threadIdx.x;
  const int64_t kept = kept_token(index, slot, t.n, keep, b, p, /*check_slot=*/c == 0);
  const acc_t size = group_size[row];
  if (blockIdx.y == 0 && threadIdx.x == 0) sizes_out[row] = static_cast<float>(size);
  if (c >= t.d || kept < 0) return;
  out[row * t.d + c] = copies_kept_token(int64_t(members[row]), size)
                           ? x[b * t.sb + kept * t.sn + c * t.sd]
                           : static_cast<scalar_t>(sums[row * t.d + c] / size);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMergeColumns)
    gather_kept(const scalar_t* __restrict__ x, Tokens t, Sizes sizes, const int64_t* __restrict__ index,
                int64_t keep, scalar_t* __restrict__ out, float* __restrict__ sizes_out) {
  const int64_t row = blockIdx.x, b = row / keep, p = row % keep;
  const int64_t c = int64_t(blockIdx.y) * kMergeColumns + threadIdx.x;
  const int64_t kept = kept_token(index, nullptr, t.n, keep, b, p, /*check_slot=*/false);
  if (kept < 0) return;
  if (blockIdx.y == 0 && threadIdx.x == 0) sizes_out[row] = size_of<float>(sizes, b, kept);
  if (c < t.d) out[row * t.d + c] = x[b * t.sb + kept * t.sn + c * t.sd];
}

// The launches of merge/gather for one call, a plain function of the shapes, so that tests can
// drive them on the CPU (python_tests/kernels/).
struct MergePlan {
  unsigned check_blocks;  // blocks of check_sizes_values over the B*N sizes
  int64_t column_blocks;  // blocks of kMergeColumns feature columns (at least 1, also for D = 0)
  dim3 accumulate_grid;   // (column blocks, B)
  dim3 rows_grid;         // (B*K, column blocks): finish_groups and gather_kept
};

inline MergePlan plan_merge(int64_t batch, int64_t n, int64_t keep, int64_t d) {
  MergePlan plan{};
  plan.check_blocks = static_cast<unsigned>((batch * n + kCheckThreads - 1) / kCheckThreads);
  plan.column_blocks = std::max<int64_t>(1, (d + kMergeColumns - 1) / kMergeColumns);
  plan.accumulate_grid = dim3(static_cast<unsigned>(plan.column_blocks), static_cast<unsigned>(batch));
  plan.rows_grid = dim3(static_cast<unsigned>(batch * keep), static_cast<unsigned>(plan.column_blocks));
  return plan;
}

}  // namespace evoprune::cuda
