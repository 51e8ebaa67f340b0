#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace evoprune {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const at::Tensor& t, const at::Tensor& tokens, const char* name) {
  TORCH_CHECK(t.device() == tokens.device(), name, " must be on the device of tokens (", tokens.device(),
              "), got ", t.device());
}

}  // namespace

void check_hidden(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must have shape [B, N, D] (3 dimensions), got ", t.dim(), " dimensions with shape ",
              t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_metric(const at::Tensor& metric, const at::Tensor& tokens) {
  check_hidden(metric, "metric");
  TORCH_CHECK(metric.size(0) == tokens.size(0) && metric.size(1) == tokens.size(1),
              "metric must have shape [B, N, Dm] with B, N of tokens (", tokens.size(0), ", ", tokens.size(1),
              "), got ", metric.sizes());
  TORCH_CHECK(metric.scalar_type() == tokens.scalar_type(), "metric must have the dtype of tokens (",
              tokens.scalar_type(), "), got ", metric.scalar_type());
  check_same_device(metric, tokens, "metric");
}

void check_attn(const at::Tensor& attn, const at::Tensor& tokens, const char* name, bool allow_4d) {
  const int64_t b = tokens.size(0), n = tokens.size(1);
  if (allow_4d && attn.dim() == 4) {
    TORCH_CHECK(attn.size(0) == b && attn.size(3) == n, name, " as attention must have shape [B, H, Q, N] = [", b,
                ", H, Q, ", n, "], got ", attn.sizes());
  } else {
    TORCH_CHECK(attn.dim() == 2, name, " must have shape ", allow_4d ? "[B, H, Q, N] or " : "", "[B, N] = [", b, ", ",
                n, "], got ", attn.dim(), " dimensions with shape ", attn.sizes());
    TORCH_CHECK(attn.size(0) == b && attn.size(1) == n, name, " must have shape [B, N] = [", b, ", ", n, "], got ",
                attn.sizes());
  }
  TORCH_CHECK(attn.scalar_type() == at::kFloat || attn.scalar_type() == tokens.scalar_type(), name,
              " must be float32 or the dtype of tokens (", tokens.scalar_type(), "), got ", attn.scalar_type());
  check_same_device(attn, tokens, name);
}

void check_sizes(const at::Tensor& sizes, const at::Tensor& tokens) {
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == tokens.size(0) && sizes.size(1) == tokens.size(1),
              "sizes must have shape [B, N] = [", tokens.size(0), ", ", tokens.size(1), "], got ", sizes.sizes());
  TORCH_CHECK(sizes.scalar_type() == at::kFloat, "sizes must be float32, got ", sizes.scalar_type());
  check_same_device(sizes, tokens, "sizes");
}

void check_selection_args(int64_t n, int64_t keep, int64_t protect, double alpha) {
  TORCH_CHECK_VALUE(protect >= 0 && protect <= n, "protect must be in [0, N] = [0, ", n, "], got ", protect);
  TORCH_CHECK_VALUE(keep >= protect && keep <= n, "keep must be in [protect, N] = [", protect, ", ", n, "], got ",
                    keep);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
}

void check_index_slot(const at::Tensor& tokens, const at::Tensor& index, const at::Tensor& slot) {
  const int64_t b = tokens.size(0), n = tokens.size(1);
  TORCH_CHECK(index.dim() == 2 && index.size(0) == b && index.size(1) <= n, "index must have shape [B, K] = [", b,
              ", K <= ", n, "], got ", index.sizes());
  TORCH_CHECK(slot.dim() == 2 && slot.size(0) == b && slot.size(1) == n, "slot must have shape [B, N] = [", b, ", ", n,
              "], got ", slot.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK(slot.scalar_type() == at::kLong, "slot must be int64, got ", slot.scalar_type());
  check_same_device(index, tokens, "index");
  check_same_device(slot, tokens, "slot");
}

void check_prune_args(const at::Tensor& tokens, const std::optional<at::Tensor>& attn,
                      const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes, int64_t keep,
                      int64_t protect, double alpha) {
  check_hidden(tokens, "tokens");
  if (attn.has_value()) check_attn(*attn, tokens, "attn", /*allow_4d=*/true);
  if (metric.has_value()) check_metric(*metric, tokens);
  if (sizes.has_value()) check_sizes(*sizes, tokens);
  check_selection_args(tokens.size(1), keep, protect, alpha);
}

void check_attention(const at::Tensor& attn) {
  TORCH_CHECK(attn.dim() == 4, "attn must have shape [B, H, Q, N] (4 dimensions), got ", attn.dim(),
              " dimensions with shape ", attn.sizes());
  TORCH_CHECK(is_supported_float(attn.scalar_type()), "attn must be float32, float64, float16 or bfloat16, got ",
              attn.scalar_type());
}

void check_qk(const at::Tensor& q, const at::Tensor& k, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must have shape [B, H, Q, d] (4 dimensions), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must have shape [B, H, N, d] (4 dimensions), got shape ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "k must have shape [B, H, N, d] with B, H, d of q (", q.size(0), ", ", q.size(1), ", ", q.size(3),
              "), got ", k.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()), "q must be float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ", k.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

void check_packed_hidden(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [T, D] (2 dimensions), got ", t.dim(), " dimensions with shape ",
              t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_packed_lengths(at::IntArrayRef lengths, int64_t total, const char* name, const char* packed_name) {
  TORCH_CHECK_VALUE(!lengths.empty(), name, " must have at least one entry (one per sequence), got none");
  int64_t sum = 0;
  for (size_t i = 0; i < lengths.size(); ++i) {
    TORCH_CHECK_VALUE(lengths[i] >= 0, name, " must be >= 0, got ", name, "[", i, "] = ", lengths[i]);
    sum += lengths[i];
  }
  TORCH_CHECK_VALUE(sum == total, name, " must sum to the packed size of ", packed_name, " (", total, "), got ", sum);
}

void check_packed_select_args(const at::Tensor& hidden, const char* hidden_name,
                              const std::optional<at::Tensor>& importance, at::IntArrayRef lengths,
                              at::IntArrayRef keep, int64_t protect, double alpha) {
  check_packed_hidden(hidden, hidden_name);
  const int64_t t = hidden.size(0);
  if (importance.has_value()) {
    TORCH_CHECK(importance->dim() == 1 && importance->size(0) == t, "importance must have shape [T] = [", t,
                "], got ", importance->sizes());
    TORCH_CHECK(importance->scalar_type() == at::kFloat || importance->scalar_type() == hidden.scalar_type(),
                "importance must be float32 or the dtype of ", hidden_name, " (", hidden.scalar_type(), "), got ",
                importance->scalar_type());
    check_same_device(*importance, hidden, "importance");
  }
  check_packed_lengths(lengths, t, "lengths", hidden_name);
  TORCH_CHECK_VALUE(keep.size() == lengths.size(), "keep must have one entry per sequence (", lengths.size(),
                    "), got ", keep.size());
  TORCH_CHECK_VALUE(protect >= 0, "protect must be >= 0, got ", protect);
  for (size_t i = 0; i < lengths.size(); ++i) {
    TORCH_CHECK_VALUE(protect <= lengths[i], "protect must be <= every length, got protect = ", protect,
                      " > lengths[", i, "] = ", lengths[i]);
    TORCH_CHECK_VALUE(keep[i] >= protect && keep[i] <= lengths[i], "keep[", i, "] must be in [protect, lengths[", i,
                      "]] = [", protect, ", ", lengths[i], "], got ", keep[i]);
  }
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
}

void check_packed_prune_args(const at::Tensor& tokens, const std::optional<at::Tensor>& importance,
                             const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes,
                             at::IntArrayRef lengths, at::IntArrayRef keep, int64_t protect, double alpha) {
  check_packed_select_args(tokens, "tokens", importance, lengths, keep, protect, alpha);
  const int64_t t = tokens.size(0);
  if (metric.has_value()) {
    check_packed_hidden(*metric, "metric");
    TORCH_CHECK(metric->size(0) == t, "metric must have shape [T, Dm] with T of tokens (", t, "), got ",
                metric->sizes());
    TORCH_CHECK(metric->scalar_type() == tokens.scalar_type(), "metric must have the dtype of tokens (",
                tokens.scalar_type(), "), got ", metric->scalar_type());
    check_same_device(*metric, tokens, "metric");
  }
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 1 && sizes->size(0) == t, "sizes must have shape [T] = [", t, "], got ",
                sizes->sizes());
    TORCH_CHECK(sizes->scalar_type() == at::kFloat, "sizes must be float32, got ", sizes->scalar_type());
    check_same_device(*sizes, tokens, "sizes");
  }
}

void check_packed_qk(const at::Tensor& q, const at::Tensor& k, double scale, at::IntArrayRef q_lengths,
                     at::IntArrayRef k_lengths) {
  TORCH_CHECK(q.dim() == 3, "q must have shape [H, Tq, d] (3 dimensions), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k must have shape [H, T, d] (3 dimensions), got shape ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "k must have shape [H, T, d] with H, d of q (",
              q.size(0), ", ", q.size(2), "), got ", k.sizes());
  TORCH_CHECK(is_supported_float(q.scalar_type()), "q must be float32, float64, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k must be on the device of q (", q.device(), "), got ", k.device());
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  check_packed_lengths(q_lengths, q.size(1), "q_lengths", "q");
  check_packed_lengths(k_lengths, k.size(1), "k_lengths", "k");
  TORCH_CHECK_VALUE(q_lengths.size() == k_lengths.size(), "k_lengths must have one entry per sequence of q_lengths (",
                    q_lengths.size(), "), got ", k_lengths.size());
}

void check_sizes_values_cpu(const at::Tensor& sizes) {
  // One pass over B*N floats; reductions stay quiet for NaN, so test each condition explicitly.
  const bool all_finite = at::isfinite(sizes).all().item<bool>();
  TORCH_CHECK_VALUE(all_finite, "sizes must be finite, got a NaN or infinite entry");
  const bool any_negative = (sizes < 0).any().item<bool>();
  TORCH_CHECK_VALUE(!any_negative, "sizes must be >= 0, got a negative entry (min ", sizes.min().item<float>(), ")");
}

void check_index_slot_values_cpu(const at::Tensor& index, const at::Tensor& slot) {
  const int64_t batch = index.size(0), k = index.size(1), n = slot.size(1);
  const auto idx = index.accessor<int64_t, 2>();
  const auto slt = slot.accessor<int64_t, 2>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < n; ++j) {
      TORCH_CHECK_VALUE(slt[b][j] >= -1 && slt[b][j] < k, "slot must be in [-1, K) = [-1, ", k, "), got slot[", b,
                        ", ", j, "] = ", slt[b][j]);
    }
    for (int64_t p = 0; p < k; ++p) {
      const int64_t kept = idx[b][p];
      TORCH_CHECK_VALUE(kept >= 0 && kept < n, "index must be in [0, N) = [0, ", n, "), got index[", b, ", ", p,
                        "] = ", kept);
      TORCH_CHECK_VALUE(slt[b][kept] == p, "slot must map each kept token to its own position: expected slot[", b,
                        ", ", kept, "] = ", p, " (index[", b, ", ", p, "] = ", kept, "), got ", slt[b][kept]);
    }
  }
}

void check_merge_values(const at::Tensor& index, const at::Tensor& slot, const at::Tensor& sizes) {
  // One flag computed where the tensors live, one read of it; the CPU checkers run only on failure,
  // on copies, so that every backend raises the CPU's message for the first bad entry.
  const int64_t n = slot.size(1), keep = index.size(1);
  at::Tensor bad = slot.lt(-1).logical_or_(slot.ge(keep)).any().logical_or_(
      index.lt(0).logical_or_(index.ge(n)).any());
  if (index.numel() > 0) {
    const at::Tensor kept_slot = slot.gather(1, index.clamp(0, n - 1));
    bad.logical_or_(kept_slot.ne(at::arange(keep, index.options()).unsqueeze(0)).any());
  }
  if (sizes.defined()) bad.logical_or_(at::isfinite(sizes).logical_not_().logical_or_(sizes.lt(0)).any());
  if (!bad.item<bool>()) return;
  if (sizes.defined()) check_sizes_values_cpu(sizes.cpu());
  check_index_slot_values_cpu(index.cpu(), slot.cpu());
}

}  // namespace evoprune
