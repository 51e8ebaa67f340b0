// Autograd of `prune` and `merge` (SPEC.md section 8): `out` is differentiable with respect to
// `tokens`; the selection (index, slot) and the sizes are not. Registered under the Autograd
// key for every backend: the backward is plain ATen, so it runs wherever the forward ran.
// (torch.library.register_autograd cannot serve here: the schemas have keyword-only tensors.)
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace evoprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// d out / d tokens of the size-weighted merge (math.h, copies_kept_token): token j receives
// grad_out[slot[j]] times s_j / S_p, or 1 if it is the kept token of a group whose sizes add up
// to zero; a dropped token without owner receives nothing.
at::Tensor merge_backward(const at::Tensor& grad_out, const at::Tensor& tokens, const at::Tensor& index,
                          const at::Tensor& slot, const at::Tensor& sizes) {
  const at::ScalarType acc = tokens.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = slot.options().dtype(acc);
  const at::Tensor s = sizes.defined() ? sizes.to(acc) : at::ones(slot.sizes(), options);
  const at::Tensor owned = slot.ge(0);
  const at::Tensor position = slot.clamp_min(0);
  const at::Tensor group = at::zeros(index.sizes(), options).scatter_add_(1, position, s * owned);
  const at::Tensor group_of_token = group.gather(1, position);
  const at::Tensor is_kept = index.gather(1, position).eq(at::arange(slot.size(1), slot.options()).unsqueeze(0));
  const at::Tensor weight =
      at::where(group_of_token.gt(0), s / group_of_token, is_kept.to(acc)).mul_(owned);
  const at::Tensor grad = grad_out.gather(1, position.unsqueeze(-1).expand({-1, -1, grad_out.size(2)}));
  return (grad.to(acc) * weight.unsqueeze(-1)).to(tokens.scalar_type());
}

// d out / d tokens of merge=False: each kept token receives its row of grad_out.
at::Tensor gather_backward(const at::Tensor& grad_out, const at::Tensor& tokens, const at::Tensor& index) {
  return at::zeros(tokens.sizes(), grad_out.options())
      .scatter_(1, index.unsqueeze(-1).expand({-1, -1, tokens.size(2)}), grad_out);
}

class PruneFunction : public torch::autograd::Function<PruneFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const std::optional<at::Tensor>& attn,
                               int64_t keep, const std::optional<at::Tensor>& metric,
                               const std::optional<at::Tensor>& sizes, double alpha, int64_t protect, bool merge) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("evoprune::prune", "").typed<decltype(prune_op)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, index, sizes_out, slot] = op.call(tokens, attn, keep, metric, sizes, alpha, protect, merge);
    ctx->saved_data["merge"] = merge;
    ctx->save_for_backward({tokens, index, slot, sizes.value_or(at::Tensor())});
    ctx->mark_non_differentiable({index, sizes_out, slot});
    return {out, index, sizes_out, slot};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &tokens = saved[0], &index = saved[1], &slot = saved[2], &sizes = saved[3];
    const at::Tensor grad_tokens = ctx->saved_data["merge"].toBool()
                                       ? merge_backward(grads[0], tokens, index, slot, sizes)
                                       : gather_backward(grads[0], tokens, index);
    return {grad_tokens, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }

  // The op's C++ signature, for the typed dispatcher handle.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_op(
      const at::Tensor&, const std::optional<at::Tensor>&, int64_t, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double, int64_t, bool);
};

class MergeFunction : public torch::autograd::Function<MergeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& index,
                               const at::Tensor& slot, const std::optional<at::Tensor>& sizes) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("evoprune::merge", "").typed<decltype(merge_op)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, sizes_out] = op.call(tokens, index, slot, sizes);
    ctx->save_for_backward({tokens, index, slot, sizes.value_or(at::Tensor())});
    ctx->mark_non_differentiable({sizes_out});
    return {out, sizes_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {merge_backward(grads[0], saved[0], saved[1], saved[2], saved[3]), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }

  static std::tuple<at::Tensor, at::Tensor> merge_op(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_autograd(
    const at::Tensor& tokens, const std::optional<at::Tensor>& attn, int64_t keep,
    const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes, double alpha, int64_t protect,
    bool merge) {
  const auto result = PruneFunction::apply(tokens, attn, keep, metric, sizes, alpha, protect, merge);
  return {result[0], result[1], result[2], result[3]};
}

std::tuple<at::Tensor, at::Tensor> merge_autograd(const at::Tensor& tokens, const at::Tensor& index,
                                                  const at::Tensor& slot, const std::optional<at::Tensor>& sizes) {
  const auto result = MergeFunction::apply(tokens, index, slot, sizes);
  return {result[0], result[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(evoprune, Autograd, m) {
  m.impl("prune", &prune_autograd);
  m.impl("merge", &merge_autograd);
}

}  // namespace evoprune
