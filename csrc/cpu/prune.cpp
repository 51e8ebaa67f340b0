// CPU kernel of `prune` (SPEC.md section 8): importance (when attn is [B,H,Q,N]), then per
// sample, in one parallel loop over the batch, the greedy selection and the merge (or gather),
// so each sample's metric, state and tokens stay in one thread's cache from start to end.
// Cost: that of importance + select + merge (see their files); no extra memory beyond theirs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../composite.h"
#include "kernels.h"
#include "parallel.h"

namespace evoprune::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_cpu(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attn, int64_t keep,
    const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes, double alpha, int64_t protect,
    bool merge) {
  check_prune_args(tokens, attn, metric, sizes, keep, protect, alpha);
  if (sizes.has_value()) check_sizes_values_cpu(*sizes);
  const int64_t batch = tokens.size(0), n = tokens.size(1);

  at::Tensor importance;
  if (attn.has_value()) {
    importance = attn->dim() == 4 ? attention_importance(*attn) : *attn;
    importance = importance.to(accumulate_type(tokens.scalar_type())).contiguous();
  }
  const at::Tensor& similarity_metric = metric.has_value() ? *metric : tokens;
  const at::Tensor s = sizes.has_value() ? *sizes : at::Tensor();

  at::Tensor out = at::empty({batch, keep, tokens.size(2)}, tokens.options());
  at::Tensor index = at::empty({batch, keep}, tokens.options().dtype(at::kLong));
  at::Tensor sizes_out = at::empty({batch, keep}, tokens.options().dtype(at::kFloat));
  at::Tensor slot = at::empty({batch, n}, tokens.options().dtype(at::kLong));
  int64_t* index_data = index.mutable_data_ptr<int64_t>();
  int64_t* slot_data = slot.mutable_data_ptr<int64_t>();
  const Selection selection{keep, protect, alpha};
  parallel_for_as_caller(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      select_sample(similarity_metric, importance, b, selection, index_data + b * keep, slot_data + b * n);
      merge_sample(tokens, s, b, index_data + b * keep, slot_data + b * n, merge, out, sizes_out);
    }
  });
  return {out, index, sizes_out, slot};
}

}  // namespace

TORCH_LIBRARY_IMPL(evoprune, CPU, m) { m.impl("prune", &prune_cpu); }

}  // namespace evoprune::cpu
