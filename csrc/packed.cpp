// The packed (ragged) form of the ops: several sequences of different lengths in one tensor, as
// Qwen-VL towers pack every image and video frame of a request into one [T, D] sequence
// (docs/ALGORITHM.md, "Packed sequences"; SPEC.md applies to each sequence unchanged).
//
// One implementation for every backend, registered as CompositeImplicitAutograd: the sequences
// are grouped into buckets of equal shape ((length, keep), or (q length, k length)), each bucket
// is gathered into one batch and goes through the batched op once (the frames of a video take
// one call: one kernel launch per batched op on CUDA, threads over the frames on CPU), and the
// results are concatenated back in sequence order, index and slot shifted to packed positions.
// Being a composition of dispatched ops, it inherits autograd, fake tensors, torch.compile and
// every backend from the batched ops, and needs no fake kernel or autograd of its own.
//
// The buckets depend on the lengths' values, so those are read as integers (torch.compile
// specializes on them). Gathers and scatters are views joined by stack and cat, and offsets are
// views of one arange: index tensors built from host integers would not trace under fake
// tensors. Cost: the batched ops' plus one copy of the inputs and of the outputs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <map>
#include <numeric>
#include <utility>
#include <vector>

#include "checks.h"

namespace evoprune {
namespace {

using Ints = std::vector<int64_t>;

Ints as_ints(c10::SymIntArrayRef values) {
  Ints ints;
  ints.reserve(values.size());
  for (const c10::SymInt& v : values) ints.push_back(v.guard_int(__FILE__, __LINE__));
  return ints;
}

// Where each sequence starts: exclusive prefix sums of its lengths.
Ints starts_of(const Ints& lengths) {
  Ints starts(lengths.size(), 0);
  std::exclusive_scan(lengths.begin(), lengths.end(), starts.begin(), int64_t{0});
  return starts;
}

// The sequences sharing one (first, second) shape, in sequence order.
struct Bucket {
  int64_t first, second;
  std::vector<size_t> members;
};

// Buckets in order of their first sequence.
std::vector<Bucket> buckets_of(const Ints& first, const Ints& second) {
  std::vector<Bucket> buckets;
  std::map<std::pair<int64_t, int64_t>, size_t> bucket_of_shape;
  for (size_t i = 0; i < first.size(); ++i) {
    const auto [it, is_new] = bucket_of_shape.try_emplace({first[i], second[i]}, buckets.size());
    if (is_new) buckets.push_back({first[i], second[i], {}});
    buckets[it->second].members.push_back(i);
  }
  return buckets;
}

// The bucket's sequences of the packed dimension `dim` of t, stacked into a new leading batch dimension.
at::Tensor gather(const at::Tensor& t, int64_t dim, const Ints& starts, int64_t length, const Bucket& bucket) {
  std::vector<at::Tensor> sequences;
  sequences.reserve(bucket.members.size());
  for (const size_t i : bucket.members) sequences.push_back(t.narrow(dim, starts[i], length));
  return at::stack(sequences);
}

std::optional<at::Tensor> gather(const std::optional<at::Tensor>& t, const Ints& starts, int64_t length,
                                 const Bucket& bucket) {
  if (!t.has_value()) return std::nullopt;
  return gather(*t, 0, starts, length, bucket);
}

// Inverse of gather for results: row j of each bucket's batch belongs to its j-th sequence;
// the rows are concatenated in sequence order.
at::Tensor scatter(const std::vector<Bucket>& buckets, const std::vector<at::Tensor>& batches, size_t sequences) {
  std::vector<at::Tensor> rows(sequences);
  for (size_t b = 0; b < buckets.size(); ++b) {
    for (size_t j = 0; j < buckets[b].members.size(); ++j) rows[buckets[b].members[j]] = batches[b].select(0, j);
  }
  return at::cat(rows);
}

// offsets[i] repeated counts[i] times, for every sequence i in order (offsets are ascending).
at::Tensor repeat_offsets(const Ints& offsets, const Ints& counts, const at::TensorOptions& options) {
  const at::Tensor values = at::arange(offsets.back() + 1, options);
  std::vector<at::Tensor> pieces;
  pieces.reserve(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) pieces.push_back(values.narrow(0, offsets[i], 1).expand({counts[i]}));
  return at::cat(pieces);
}

// Per-sequence index (positions in the sequence) and slot (output positions in the sequence, -1
// if dropped), concatenated in sequence order, shifted to positions in the packed input and output.
std::pair<at::Tensor, at::Tensor> to_packed(const at::Tensor& index, const at::Tensor& slot, const Ints& lengths,
                                            const Ints& keep) {
  const Ints input_starts = starts_of(lengths), output_starts = starts_of(keep);
  const at::Tensor packed_index = index + repeat_offsets(input_starts, keep, index.options());
  const at::Tensor packed_slot =
      at::where(slot.ge(0), slot + repeat_offsets(output_starts, lengths, slot.options()), slot);
  return {packed_index, packed_slot};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> prune_packed(
    const at::Tensor& tokens, const std::optional<at::Tensor>& importance, c10::SymIntArrayRef lengths_arg,
    c10::SymIntArrayRef keep_arg, const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes,
    double alpha, int64_t protect, bool merge) {
  static auto prune = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("evoprune::prune", "")
                          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                              const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t,
                              bool)>();
  const Ints lengths = as_ints(lengths_arg), keep = as_ints(keep_arg);
  check_packed_prune_args(tokens, importance, metric, sizes, lengths, keep, protect, alpha);
  const Ints starts = starts_of(lengths);
  const std::vector<Bucket> buckets = buckets_of(lengths, keep);
  std::vector<at::Tensor> outs, indexes, sizes_outs, slots;
  for (const Bucket& bucket : buckets) {
    const int64_t length = bucket.first;
    auto [out, index, sizes_out, slot] =
        prune.call(gather(tokens, 0, starts, length, bucket), gather(importance, starts, length, bucket),
                   bucket.second, gather(metric, starts, length, bucket), gather(sizes, starts, length, bucket), alpha,
                   protect, merge);
    outs.push_back(out);
    indexes.push_back(index);
    sizes_outs.push_back(sizes_out);
    slots.push_back(slot);
  }
  auto [index, slot] = to_packed(scatter(buckets, indexes, lengths.size()), scatter(buckets, slots, lengths.size()),
                                 lengths, keep);
  return {scatter(buckets, outs, lengths.size()), index, scatter(buckets, sizes_outs, lengths.size()), slot};
}

std::tuple<at::Tensor, at::Tensor> select_packed(const at::Tensor& metric, const std::optional<at::Tensor>& importance,
                                                 c10::SymIntArrayRef lengths_arg, c10::SymIntArrayRef keep_arg,
                                                 double alpha, int64_t protect) {
  static auto select = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("evoprune::select", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(
                               const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, int64_t)>();
  const Ints lengths = as_ints(lengths_arg), keep = as_ints(keep_arg);
  check_packed_select_args(metric, "metric", importance, lengths, keep, protect, alpha);
  const Ints starts = starts_of(lengths);
  const std::vector<Bucket> buckets = buckets_of(lengths, keep);
  std::vector<at::Tensor> indexes, slots;
  for (const Bucket& bucket : buckets) {
    auto [index, slot] = select.call(gather(metric, 0, starts, bucket.first, bucket),
                                     gather(importance, starts, bucket.first, bucket), bucket.second, alpha, protect);
    indexes.push_back(index);
    slots.push_back(slot);
  }
  return to_packed(scatter(buckets, indexes, lengths.size()), scatter(buckets, slots, lengths.size()), lengths, keep);
}

at::Tensor importance_from_qk_packed(const at::Tensor& q, const at::Tensor& k, double scale,
                                     c10::SymIntArrayRef q_lengths_arg, c10::SymIntArrayRef k_lengths_arg) {
  static auto importance_from_qk = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("evoprune::importance_from_qk", "")
                                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  const Ints q_lengths = as_ints(q_lengths_arg), k_lengths = as_ints(k_lengths_arg);
  check_packed_qk(q, k, scale, q_lengths, k_lengths);
  const Ints q_starts = starts_of(q_lengths), k_starts = starts_of(k_lengths);
  const std::vector<Bucket> buckets = buckets_of(q_lengths, k_lengths);
  std::vector<at::Tensor> importances;
  for (const Bucket& bucket : buckets) {
    importances.push_back(importance_from_qk.call(gather(q, 1, q_starts, bucket.first, bucket),
                                                  gather(k, 1, k_starts, bucket.second, bucket), scale));
  }
  return scatter(buckets, importances, k_lengths.size());
}

}  // namespace

TORCH_LIBRARY_IMPL(evoprune, CompositeImplicitAutograd, m) {
  m.impl("prune_packed", &prune_packed);
  m.impl("select_packed", &select_packed);
  m.impl("importance_from_qk_packed", &importance_from_qk_packed);
}

}  // namespace evoprune
