// CUDA kernel of `merge` and the merge/gather step shared with `prune` (SPEC.md section 4).
//
// Deterministic, no float atomics: the size-weighted sums are taken in ascending token order,
// like the CPU's, by giving every (sample, feature column) to one thread.
// 1. accumulate_groups: grid (ceil(D/128), B), 128 threads = 128 adjacent columns (coalesced).
//    Each thread walks the tokens j = 0..N-1 of its sample and adds s_j * x[j, c] into
//    sums[slot[j], c] (a row only it writes); thread 0 of column block 0 also adds s_j into
//    group_size[slot[j]] and counts the members. Workspace: B*K*D + B*K accumulation values.
// 2. finish_groups: grid (B*K, ceil(D/128)), one block row per output position p: the kept token
//    copied bit for bit when math.h's copies_kept_token says so, else sums / group_size.
// merge = false (prune only): gather_kept, same grid as 2, out[p] = x[index[p]].
// Values that the CPU checks by reading them (sizes finite and >= 0, slot in [-1, K), index in
// [0, N), slot[index[p]] == p): the `merge` op checks them eagerly with one host synchronization
// (check_merge_values) and raises the CPU's ValueError; while a CUDA graph is being captured, and
// for the sizes given to `prune` (which stays sync-free), the kernels' device-side assertions are
// the check. A failed assertion stops the kernel and surfaces as a CUDA error on the next
// synchronizing call (docs/CUDA.md); the kernels never read out of bounds even then.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../math.h"
#include "kernels.cuh"

namespace evoprune::cuda {
namespace {

constexpr int kColumns = 128;  // feature columns per block
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
  CUDA_KERNEL_ASSERT(isfinite(s) && s >= 0.0f && "sizes must be finite and >= 0");
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColumns)
    accumulate_groups(const scalar_t* __restrict__ x, Tokens t, Sizes sizes, const int64_t* __restrict__ slot,
                      int64_t keep, acc_t* __restrict__ sums, acc_t* __restrict__ group_size,
                      int32_t* __restrict__ members) {
  const int64_t b = blockIdx.y, c = int64_t(blockIdx.x) * kColumns + threadIdx.x;
  const bool counts_groups = blockIdx.x == 0 && threadIdx.x == 0;
  const bool has_column = c < t.d;
  const scalar_t* xb = x + b * t.sb + (has_column ? c : 0) * t.sd;
  acc_t* sums_b = sums + b * keep * t.d + (has_column ? c : 0);
  for (int64_t j = 0; j < t.n; ++j) {
    const int64_t p = slot[b * t.n + j];
    const bool valid = p >= -1 && p < keep;
    CUDA_KERNEL_ASSERT(valid && "slot must be in [-1, K)");
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
  CUDA_KERNEL_ASSERT(in_range && "index must be in [0, N)");
  if (!in_range) return -1;
  if (check_slot) CUDA_KERNEL_ASSERT(slot[b * n + kept] == p && "slot must map each kept token to its own position");
  return kept;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColumns)
    finish_groups(const scalar_t* __restrict__ x, Tokens t, const int64_t* __restrict__ index,
                  const int64_t* __restrict__ slot, int64_t keep, const acc_t* __restrict__ sums,
                  const acc_t* __restrict__ group_size, const int32_t* __restrict__ members,
                  scalar_t* __restrict__ out, float* __restrict__ sizes_out) {
  const int64_t row = blockIdx.x, b = row / keep, p = row % keep;
  const int64_t c = int64_t(blockIdx.y) * kColumns + threadIdx.x;
  const int64_t kept = kept_token(index, slot, t.n, keep, b, p, /*check_slot=*/c == 0);
  const acc_t size = group_size[row];
  if (blockIdx.y == 0 && threadIdx.x == 0) sizes_out[row] = static_cast<float>(size);
  if (c >= t.d || kept < 0) return;
  out[row * t.d + c] = copies_kept_token(int64_t(members[row]), size)
                           ? x[b * t.sb + kept * t.sn + c * t.sd]
                           : static_cast<scalar_t>(sums[row * t.d + c] / size);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kColumns)
    gather_kept(const scalar_t* __restrict__ x, Tokens t, Sizes sizes, const int64_t* __restrict__ index,
                int64_t keep, scalar_t* __restrict__ out, float* __restrict__ sizes_out) {
  const int64_t row = blockIdx.x, b = row / keep, p = row % keep;
  const int64_t c = int64_t(blockIdx.y) * kColumns + threadIdx.x;
  const int64_t kept = kept_token(index, nullptr, t.n, keep, b, p, /*check_slot=*/false);
  if (kept < 0) return;
  if (blockIdx.y == 0 && threadIdx.x == 0) sizes_out[row] = size_of<float>(sizes, b, kept);
  if (c < t.d) out[row * t.d + c] = x[b * t.sb + kept * t.sn + c * t.sd];
}

template <typename scalar_t, typename acc_t>
void merge_impl(const at::Tensor& tokens, const Sizes& sizes, const at::Tensor& index, const at::Tensor& slot,
                bool merge, at::Tensor& out, at::Tensor& sizes_out) {
  const int64_t batch = tokens.size(0), keep = index.size(1);
  const Tokens t{tokens.size(1), tokens.size(2), tokens.stride(0), tokens.stride(1), tokens.stride(2)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t column_blocks = std::max<int64_t>(1, (t.d + kColumns - 1) / kColumns);
  TORCH_CHECK(column_blocks <= 65535 && batch <= 65535, "merge on CUDA supports D <= ", 65535 * kColumns,
              " and B <= 65535, got D = ", t.d, ", B = ", batch);
  const dim3 rows_grid(static_cast<unsigned>(batch * keep), static_cast<unsigned>(column_blocks));
  const scalar_t* x = tokens.const_data_ptr<scalar_t>();
  if (!merge) {
    gather_kept<scalar_t><<<rows_grid, kColumns, 0, stream>>>(x, t, sizes, index.const_data_ptr<int64_t>(), keep,
                                                              out.mutable_data_ptr<scalar_t>(),
                                                              sizes_out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto acc_options = tokens.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor sums = at::zeros({batch, keep, t.d}, acc_options);
  at::Tensor group_size = at::zeros({batch, keep}, acc_options);
  at::Tensor members = at::zeros({batch, keep}, tokens.options().dtype(at::kInt));
  accumulate_groups<scalar_t, acc_t>
      <<<dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(batch)), kColumns, 0, stream>>>(
          x, t, sizes, slot.const_data_ptr<int64_t>(), keep, sums.mutable_data_ptr<acc_t>(),
          group_size.mutable_data_ptr<acc_t>(), members.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_groups<scalar_t, acc_t><<<rows_grid, kColumns, 0, stream>>>(
      x, t, index.const_data_ptr<int64_t>(), slot.const_data_ptr<int64_t>(), keep, sums.const_data_ptr<acc_t>(),
      group_size.const_data_ptr<acc_t>(), members.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(),
      sizes_out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> merge_cuda(const at::Tensor& tokens, const at::Tensor& index,
                                              const at::Tensor& slot, const std::optional<at::Tensor>& sizes) {
  check_hidden(tokens, "tokens");
  check_index_slot(tokens, index, slot);
  if (sizes.has_value()) check_sizes(*sizes, tokens);
  const c10::cuda::CUDAGuard guard(tokens.device());
  // index and slot come from the caller here (prune makes its own): a bad value would fire a
  // device-side assertion, which leaves the CUDA context unusable, so read them first. A graph
  // being captured cannot synchronize; its replays rely on the assertions.
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_merge_values(index, slot, sizes.has_value() ? *sizes : at::Tensor());
  }
  return merge_tokens(tokens, sizes.has_value() ? *sizes : at::Tensor(), index, slot, /*merge=*/true);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_tokens(const at::Tensor& tokens, const at::Tensor& sizes,
                                                const at::Tensor& index, const at::Tensor& slot, bool merge) {
  const c10::cuda::CUDAGuard guard(tokens.device());
  const int64_t batch = tokens.size(0), n = tokens.size(1), keep = index.size(1);
  at::Tensor out = at::empty({batch, keep, tokens.size(2)}, tokens.options());
  at::Tensor sizes_out = at::empty({batch, keep}, tokens.options().dtype(at::kFloat));
  const Sizes s{sizes.defined() ? sizes.const_data_ptr<float>() : nullptr, sizes.defined() ? sizes.stride(0) : 0,
                sizes.defined() ? sizes.stride(1) : 0};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (sizes.defined() && batch * n > 0) {
    check_sizes_values<<<static_cast<unsigned>((batch * n + kCheckThreads - 1) / kCheckThreads), kCheckThreads, 0,
                         stream>>>(s, batch, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (batch * keep == 0) return {out, sizes_out};
  const at::Tensor index_c = index.contiguous(), slot_c = slot.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "evoprune_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_impl<scalar_t, acc_t>(tokens, s, index_c, slot_c, merge, out, sizes_out);
  });
  return {out, sizes_out};
}

TORCH_LIBRARY_IMPL(evoprune, CUDA, m) { m.impl("merge", &merge_cuda); }

}  // namespace evoprune::cuda
