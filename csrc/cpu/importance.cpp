// CPU kernels of `importance` and `importance_from_qk` (SPEC.md sections 1 and 6).
//
// importance: one streaming pass over attn [B,H,Q,N], O(B*H*Q*N) reads, O(B*N) memory. The
// columns of each sample are split into chunks whose sums stay in L1 while every (head, query)
// row streams past, so threads (over samples x column chunks) never share an output.
// importance_from_qk: the blocked ATen composition of csrc/composite.cpp, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../composite.h"
#include "kernels.h"

namespace evoprune::cpu {
namespace {

// Columns per output chunk of `importance`: 1 KiB of float sums, L1-resident.
constexpr int64_t kColumnsPerChunk = 256;

template <typename scalar_t>
void attention_importance_impl(const at::Tensor& attn, at::Tensor& importance) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), n = attn.size(3);
  const int64_t sb = attn.stride(0), sh = attn.stride(1), sq = attn.stride(2), sn = attn.stride(3);
  const scalar_t* a = attn.const_data_ptr<scalar_t>();
  float* imp = importance.mutable_data_ptr<float>();
  const int64_t chunks = (n + kColumnsPerChunk - 1) / kColumnsPerChunk;
  const acc_t rows = static_cast<acc_t>(heads * queries);
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> sum(kColumnsPerChunk);
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t b = unit / chunks, j0 = (unit % chunks) * kColumnsPerChunk;
      const int64_t width = std::min(kColumnsPerChunk, n - j0);
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t h = 0; h < heads; ++h) {
        for (int64_t q = 0; q < queries; ++q) {
          const scalar_t* row = a + b * sb + h * sh + q * sq + j0 * sn;
          for (int64_t c = 0; c < width; ++c) sum[c] += static_cast<acc_t>(row[c * sn]);
        }
      }
      for (int64_t c = 0; c < width; ++c) imp[b * n + j0 + c] = static_cast<float>(sum[c] / rows);
    }
  });
}

at::Tensor importance_cpu(const at::Tensor& attn) {
  check_attention(attn);
  return attention_importance(attn);
}

at::Tensor importance_from_qk_cpu(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_qk(q, k, scale);
  return importance_from_qk_blocked(q, k, scale);
}

}  // namespace

at::Tensor attention_importance(const at::Tensor& attn) {
  at::Tensor importance = at::empty({attn.size(0), attn.size(3)}, attn.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "evoprune_importance", [&] {
    attention_importance_impl<scalar_t>(attn, importance);
  });
  return importance;
}

TORCH_LIBRARY_IMPL(evoprune, CPU, m) {
  m.impl("importance", &importance_cpu);
  m.impl("importance_from_qk", &importance_from_qk_cpu);
}

}  // namespace evoprune::cpu
