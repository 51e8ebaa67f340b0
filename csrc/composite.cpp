// importance_from_qk (SPEC.md section 6) without storing softmax(scale * q k^T) whole.
//
// Samples go through in groups whose keys, converted to the accumulation dtype, take at most
// kBlockValues values; within a group, query rows go through in blocks of at most kBlockValues
// logits. Each block is one batched GEMM, a row softmax (row max and sum, then exp) and a column
// sum added into the [B,N] importance. Extra memory: O(kBlockValues + H*N*d) values, whatever B
// and Q are (H*N*d only when one sample's keys alone exceed the budget). GEMMs run in true
// float32 (no TF32 on CUDA), as the reference does.
#include "composite.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>

namespace evoprune {
namespace {

// Values per block of keys or logits: 8M (32 MiB in float32).
constexpr int64_t kBlockValues = int64_t(8) << 20;

}  // namespace

at::Tensor importance_from_qk_blocked(const at::Tensor& q, const at::Tensor& k, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), d = q.size(3), n = k.size(2);
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  const at::NoTF32Guard float32_products;
  at::Tensor importance = at::zeros({batch, n}, q.options().dtype(acc));
  const int64_t group = std::clamp<int64_t>(kBlockValues / std::max<int64_t>(heads * n * d, 1), 1,
                                            std::max<int64_t>(batch, 1));
  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const int64_t samples = std::min(group, batch - b0);
    const int64_t pairs = samples * heads;
    const at::Tensor keys_t = k.narrow(0, b0, samples).to(acc).reshape({pairs, n, d}).transpose(1, 2);
    const int64_t block = std::clamp<int64_t>(kBlockValues / std::max<int64_t>(pairs * n, 1), 1,
                                              std::max<int64_t>(queries, 1));
    at::Tensor group_importance = importance.narrow(0, b0, samples);
    for (int64_t r0 = 0; r0 < queries; r0 += block) {
      const int64_t rows = std::min(block, queries - r0);
      const at::Tensor q_rows = q.narrow(0, b0, samples).narrow(2, r0, rows).to(acc).reshape({pairs, rows, d});
      const at::Tensor logits = at::bmm(q_rows, keys_t).mul_(scale);
      group_importance.add_(at::softmax(logits, -1).sum(1).view({samples, heads, n}).sum(1));
    }
  }
  return importance.div_(static_cast<double>(heads * queries)).to(at::kFloat);
}

}  // namespace evoprune
