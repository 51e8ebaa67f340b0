// CPU kernels of `importance` and `importance_from_qk` (SPEC.md sections 1 and 6).
//
// importance: one streaming pass over attn [B,H,Q,N], O(B*H*Q*N) reads, O(B*N) memory. The
// columns of each sample are split into chunks whose sums stay in L1 while every (head, query)
// row streams past, so threads (over samples x column chunks) never share an output.
// importance_from_qk: softmax(scale * q k^T) is never stored whole: query rows go through in
// blocks of at most kLogitsBudget logits over all (sample, head) pairs; each block is one batched
// GEMM, a row softmax (row max and sum, then exp) and a column sum into O(B*H*N) accumulators.
// Extra memory: max(kLogitsBudget, B*H*N) accumulation-dtype values plus k in that dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace evoprune::cpu {
namespace {

// Columns per output chunk of `importance`: 1 KiB of float sums, L1-resident.
constexpr int64_t kColumnsPerChunk = 256;
// Logits computed at once by importance_from_qk: 8M values (32 MiB in float32).
constexpr int64_t kLogitsBudget = int64_t(8) << 20;

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
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), d = q.size(3), n = k.size(2);
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  const int64_t pairs = batch * heads;
  const at::Tensor keys_t = k.reshape({pairs, n, d}).to(acc).transpose(1, 2);
  const at::Tensor queries_all = q.reshape({pairs, queries, d});
  at::Tensor column_sums = at::zeros({pairs, n}, q.options().dtype(acc));
  const int64_t block = std::clamp<int64_t>(kLogitsBudget / std::max<int64_t>(pairs * n, 1), 1, std::max<int64_t>(queries, 1));
  for (int64_t r0 = 0; r0 < queries; r0 += block) {
    const at::Tensor rows = queries_all.narrow(1, r0, std::min(block, queries - r0)).to(acc);
    at::Tensor logits = at::bmm(rows, keys_t).mul_(scale);
    column_sums.add_(at::softmax(logits, -1).sum(1));
  }
  return column_sums.view({batch, heads, n}).sum(1).div_(static_cast<double>(heads * queries)).to(at::kFloat);
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
