// CPU kernel of `merge` and the merge/gather step shared with `prune` (SPEC.md section 4).
//
// Per sample: group sizes and member counts in one pass over slot (O(N)), then the size-weighted
// sums in one pass over the tokens (O(N*D)), summed in ascending token order so the result is
// deterministic; memory O(K*D) for the sums (per-thread scratch, scratch.h). Threading: ops run samples in parallel; within a
// large sample the feature dimension is split across threads (each column keeps its order).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../math.h"
#include "kernels.h"
#include "scratch.h"
#include "vectorize.h"

namespace evoprune::cpu {
namespace {

// Token-features per thread chunk: enough work to amortize waking a thread.
constexpr int64_t kMergeWorkPerChunk = int64_t(1) << 16;

// sums[c] += weight * x[c] for float32 tokens, the common case, compiled per instruction set (-ffp-contract=off:
// every clone rounds the product and the sum alike).
EVOPRUNE_VECTOR_CLONES void add_scaled(float* __restrict__ sums, const float* __restrict__ x, float weight,
                                       int64_t width) {
  for (int64_t c = 0; c < width; ++c) sums[c] += weight * x[c];
}

template <typename scalar_t, typename acc_t>
void merge_sample_impl(const at::Tensor& tokens, const at::Tensor& sizes, int64_t b, const int64_t* index,
                       const int64_t* slot, bool merge, at::Tensor& out, at::Tensor& sizes_out) {
  const int64_t n = tokens.size(1), d = tokens.size(2), keep = out.size(1);
  const int64_t sn = tokens.stride(1), sd = tokens.stride(2);
  const scalar_t* x = tokens.const_data_ptr<scalar_t>() + b * tokens.stride(0);
  const float* s = sizes.defined() ? sizes.const_data_ptr<float>() + b * sizes.stride(0) : nullptr;
  const int64_t ss = sizes.defined() ? sizes.stride(1) : 0;
  auto size_of = [&](int64_t j) { return s == nullptr ? acc_t(1) : static_cast<acc_t>(s[j * ss]); };
  scalar_t* y = out.mutable_data_ptr<scalar_t>() + b * keep * d;
  float* y_sizes = sizes_out.mutable_data_ptr<float>() + b * keep;

  auto copy_token = [&](int64_t p, int64_t j, int64_t d_lo, int64_t d_hi) {
    for (int64_t c = d_lo; c < d_hi; ++c) y[p * d + c] = x[j * sn + c * sd];
  };

  if (!merge) {
    for (int64_t p = 0; p < keep; ++p) y_sizes[p] = static_cast<float>(size_of(index[p]));
    at::parallel_for(0, d, std::max<int64_t>(1, kMergeWorkPerChunk / std::max<int64_t>(keep, 1)),
                     [&](int64_t lo, int64_t hi) {
                       for (int64_t p = 0; p < keep; ++p) copy_token(p, index[p], lo, hi);
                     });
    return;
  }

  std::vector<acc_t> group_size(keep, acc_t(0));
  std::vector<int64_t> members(keep, 0);
  for (int64_t j = 0; j < n; ++j) {
    if (slot[j] < 0) continue;
    group_size[slot[j]] += size_of(j);
    members[slot[j]] += 1;
  }
  for (int64_t p = 0; p < keep; ++p) y_sizes[p] = static_cast<float>(group_size[p]);

  at::parallel_for(0, d, std::max<int64_t>(1, kMergeWorkPerChunk / std::max<int64_t>(n, 1)),
                   [&](int64_t lo, int64_t hi) {
                     const int64_t width = hi - lo;
                     OwnedMemory own_sums;
                     acc_t* sums = scratch<acc_t>(ScratchSlot::kMergeSums, size_t(keep) * size_t(width), own_sums);
                     std::fill(sums, sums + keep * width, acc_t(0));
                     for (int64_t j = 0; j < n; ++j) {
                       const int64_t p = slot[j];
                       if (p < 0 || copies_kept_token(members[p], group_size[p])) continue;
                       const acc_t weight = size_of(j);
                       const scalar_t* xj = x + j * sn;
                       acc_t* row = sums + p * width;
                       if constexpr (std::is_same_v<scalar_t, float>) {
                         if (sd == 1) {
                           add_scaled(row, xj + lo, weight, width);
                           continue;
                         }
                       }
                       if (sd == 1) {  // the common layout: a loop the compiler vectorizes
                         for (int64_t c = 0; c < width; ++c) row[c] += weight * static_cast<acc_t>(xj[lo + c]);
                       } else {
                         for (int64_t c = 0; c < width; ++c) row[c] += weight * static_cast<acc_t>(xj[(lo + c) * sd]);
                       }
                     }
                     for (int64_t p = 0; p < keep; ++p) {
                       if (copies_kept_token(members[p], group_size[p])) {
                         copy_token(p, index[p], lo, hi);
                         continue;
                       }
                       const acc_t* row = sums + p * width;
                       for (int64_t c = 0; c < width; ++c) y[p * d + lo + c] = static_cast<scalar_t>(row[c] / group_size[p]);
                     }
                   });
}

std::tuple<at::Tensor, at::Tensor> merge_cpu(const at::Tensor& tokens, const at::Tensor& index, const at::Tensor& slot,
                                             const std::optional<at::Tensor>& sizes) {
  check_hidden(tokens, "tokens");
  check_index_slot(tokens, index, slot);
  if (sizes.has_value()) {
    check_sizes(*sizes, tokens);
    check_sizes_values_cpu(*sizes);
  }
  const at::Tensor index_c = index.contiguous(), slot_c = slot.contiguous();
  check_index_slot_values_cpu(index_c, slot_c);

  const int64_t batch = tokens.size(0), n = tokens.size(1), keep = index.size(1);
  at::Tensor out = at::empty({batch, keep, tokens.size(2)}, tokens.options());
  at::Tensor sizes_out = at::empty({batch, keep}, tokens.options().dtype(at::kFloat));
  const at::Tensor s = sizes.has_value() ? *sizes : at::Tensor();
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      merge_sample(tokens, s, b, index_c.const_data_ptr<int64_t>() + b * keep,
                   slot_c.const_data_ptr<int64_t>() + b * n, /*merge=*/true, out, sizes_out);
    }
  });
  return {out, sizes_out};
}

}  // namespace

void merge_sample(const at::Tensor& tokens, const at::Tensor& sizes, int64_t b, const int64_t* index,
                  const int64_t* slot, bool merge, at::Tensor& out, at::Tensor& sizes_out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "evoprune_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    merge_sample_impl<scalar_t, acc_t>(tokens, sizes, b, index, slot, merge, out, sizes_out);
  });
}

TORCH_LIBRARY_IMPL(evoprune, CPU, m) { m.impl("merge", &merge_cpu); }

}  // namespace evoprune::cpu
