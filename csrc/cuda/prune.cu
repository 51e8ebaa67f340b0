// CUDA kernel of `prune` (SPEC.md section 8): importance (when attn is [B,H,Q,N]), then the
// one-launch greedy of select.cu, then the merge (or gather) of merge.cu, all queued on the
// current stream without a host synchronization, so a captured CUDA graph can replay the op.
// Cost: that of importance + select + merge (see their files); no extra memory beyond theirs.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../composite.h"
#include "kernels.cuh"

namespace evoprune::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_cuda(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attn, int64_t keep,
    const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes, double alpha, int64_t protect,
    bool merge) {
  check_prune_args(tokens, attn, metric, sizes, keep, protect, alpha);
  const c10::cuda::CUDAGuard guard(tokens.device());

  at::Tensor importance;
  if (attn.has_value()) {
    importance = attn->dim() == 4 ? attention_importance(*attn) : *attn;
    importance = importance.to(accumulate_type(tokens.scalar_type())).contiguous();
  }
  auto [index, slot] = select_tokens(metric.has_value() ? *metric : tokens, importance, keep, alpha, protect);
  auto [out, sizes_out] = merge_tokens(tokens, sizes.has_value() ? *sizes : at::Tensor(), index, slot, merge);
  return {out, index, sizes_out, slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(evoprune, CUDA, m) { m.impl("prune", &prune_cuda); }

}  // namespace evoprune::cuda
