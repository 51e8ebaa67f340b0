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
// The kernels and the launch policy (plan_merge) live in merge_kernel.cuh, which the tests also
// execute on the CPU (make test-kernels).
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
#include "kernels.cuh"
#include "merge_kernel.cuh"

namespace evoprune::cuda {
namespace {

template <typename scalar_t, typename acc_t>
void merge_impl(const at::Tensor& tokens, const Sizes& sizes, const at::Tensor& index, const at::Tensor& slot,
                bool merge, const MergePlan& plan, at::Tensor& out, at::Tensor& sizes_out) {
  const int64_t batch = tokens.size(0), keep = index.size(1);
  const Tokens t{tokens.size(1), tokens.size(2), tokens.stride(0), tokens.stride(1), tokens.stride(2)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(plan.column_blocks <= 65535 && batch <= 65535, "merge on CUDA supports D <= ",
              65535 * kMergeColumns, " and B <= 65535, got D = ", t.d, ", B = ", batch);
  const scalar_t* x = tokens.const_data_ptr<scalar_t>();
  if (!merge) {
    gather_kept<scalar_t><<<plan.rows_grid, kMergeColumns, 0, stream>>>(
        x, t, sizes, index.const_data_ptr<int64_t>(), keep, out.mutable_data_ptr<scalar_t>(),
        sizes_out.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto acc_options = tokens.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor sums = at::zeros({batch, keep, t.d}, acc_options);
  at::Tensor group_size = at::zeros({batch, keep}, acc_options);
  at::Tensor members = at::zeros({batch, keep}, tokens.options().dtype(at::kInt));
  accumulate_groups<scalar_t, acc_t><<<plan.accumulate_grid, kMergeColumns, 0, stream>>>(
      x, t, sizes, slot.const_data_ptr<int64_t>(), keep, sums.mutable_data_ptr<acc_t>(),
      group_size.mutable_data_ptr<acc_t>(), members.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_groups<scalar_t, acc_t><<<plan.rows_grid, kMergeColumns, 0, stream>>>(
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
  const MergePlan plan = plan_merge(batch, n, keep, tokens.size(2));
  if (sizes.defined() && batch * n > 0) {
    check_sizes_values<<<plan.check_blocks, kCheckThreads, 0, stream>>>(s, batch, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (batch * keep == 0) return {out, sizes_out};
  const at::Tensor index_c = index.contiguous(), slot_c = slot.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "evoprune_merge_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_impl<scalar_t, acc_t>(tokens, s, index_c, slot_c, merge, plan, out, sizes_out);
  });
  return {out, sizes_out};
}

TORCH_LIBRARY_IMPL(evoprune, CUDA, m) { m.impl("merge", &merge_cuda); }

}  // namespace evoprune::cuda
