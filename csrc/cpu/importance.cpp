// CPU kernels of `importance` and `importance_from_qk` (SPEC.md sections 1 and 6).
//
// importance: one streaming pass over attn [B,H,Q,N], O(B*H*Q*N) reads, as fast as a sum over attn
// ([1,16,577,577] float32, one thread: 0.95 ms against 0.94 ms for attn.sum()). The (head, query) rows of
// each sample are split into ranges of kRowsPerSplit; threads take (sample, range) units, each
// summing its rows into its own N sums, which are then added in range order (deterministic).
// Extra memory: B * ceil(H*Q / kRowsPerSplit) * N accumulation values.
// importance_from_qk: per (sample, head, block of query rows), one GEMM of the block's scaled
// logits into per-thread scratch that stays in cache (kLogitValues), then the row softmax in place
// (max, exp, sum: ATen's vectorized kernels) and its column sums weighted by the rows' 1/sum, rows in
// order (add_weighted_rows). Threads take the (sample, head, block) units, each with its own column
// sums, added in unit order (deterministic). At SigLIP's shape ([1,16,729,72], one thread) 16 ms against 56 ms for
// materializing the softmax whole (csrc/composite.cpp, which CUDA keeps) and 24 ms for the
// attention itself (SDPA).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../composite.h"
#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "vectorize.h"

namespace evoprune::cpu {
namespace {

// Attention rows (head, query pairs) per work unit of `importance`.
constexpr int64_t kRowsPerSplit = 256;
// Logits per block of `importance_from_qk` (1 MiB in float32: a block stays in L2 from GEMM to sums).
constexpr int64_t kLogitValues = int64_t(1) << 18;

// sums[j] += sum over r of weight[r] * values[r][j], rows in order (not a BLAS GEMV: its splits
// depend on the threads it finds, and so would its rounding).
template <typename acc_t>
inline __attribute__((always_inline)) void add_weighted_rows_body(const acc_t* values, const acc_t* weight,
                                                                  int64_t rows, int64_t n, acc_t* __restrict__ sums) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* __restrict__ row = values + r * n;
    const acc_t w = weight[r];
    for (int64_t j = 0; j < n; ++j) sums[j] += w * row[j];
  }
}
EVOPRUNE_VECTOR_CLONES void add_weighted_rows(const float* values, const float* weight, int64_t rows, int64_t n,
                                              float* sums) {
  add_weighted_rows_body(values, weight, rows, n, sums);
}
EVOPRUNE_VECTOR_CLONES void add_weighted_rows(const double* values, const double* weight, int64_t rows, int64_t n,
                                              double* sums) {
  add_weighted_rows_body(values, weight, rows, n, sums);
}

// sum[j] += row[j] for float32 rows, the common case, compiled per instruction set: the loop reads
// the attention once and is bound by that read only when it runs at full vector width.
EVOPRUNE_VECTOR_CLONES void add_row(float* __restrict__ sum, const float* __restrict__ row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += row[j];
}

template <typename scalar_t>
void attention_importance_impl(const at::Tensor& attn, at::Tensor& importance) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), n = attn.size(3);
  const int64_t sb = attn.stride(0), sh = attn.stride(1), sq = attn.stride(2), sn = attn.stride(3);
  const int64_t rows = heads * queries;
  const int64_t splits = std::max<int64_t>(1, (rows + kRowsPerSplit - 1) / kRowsPerSplit);
  const scalar_t* a = attn.const_data_ptr<scalar_t>();
  std::vector<acc_t> partial(batch * splits * n);
  // Each (sample, row range) streams its rows into its own full-width sums: no shared output.
  at::parallel_for(0, batch * splits, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t b = unit / splits, r0 = (unit % splits) * kRowsPerSplit;
      acc_t* sum = partial.data() + unit * n;
      std::fill(sum, sum + n, acc_t(0));
      for (int64_t r = r0; r < std::min(rows, r0 + kRowsPerSplit); ++r) {
        const scalar_t* row = a + b * sb + (r / queries) * sh + (r % queries) * sq;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (sn == 1) {
            add_row(sum, row, n);
            continue;
          }
        }
        if (sn == 1) {  // the common layout: a loop the compiler vectorizes
          for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<acc_t>(row[j]);
        } else {
          for (int64_t j = 0; j < n; ++j) sum[j] += static_cast<acc_t>(row[j * sn]);
        }
      }
    }
  });
  // The row ranges are added in a fixed order, so the result does not depend on the threads.
  float* imp = importance.mutable_data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < n; ++j) {
      acc_t total = 0;
      for (int64_t split = 0; split < splits; ++split) total += partial[(b * splits + split) * n + j];
      imp[b * n + j] = static_cast<float>(total / static_cast<acc_t>(rows));
    }
  }
}

at::Tensor importance_cpu(const at::Tensor& attn) {
  check_attention(attn);
  return attention_importance(attn);
}

at::Tensor importance_from_qk_cpu(const at::Tensor& q, const at::Tensor& k, double scale) {
  check_qk(q, k, scale);
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), n = k.size(2);
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  at::Tensor importance = at::zeros({batch, n}, q.options().dtype(acc));
  if (batch == 0 || heads == 0 || queries == 0 || n == 0) return importance.to(at::kFloat);
  const at::Tensor queries_acc = q.to(acc), keys_acc = k.to(acc);
  const int64_t rows_per_block = std::clamp<int64_t>(kLogitValues / n, 1, queries);
  const int64_t blocks = (queries + rows_per_block - 1) / rows_per_block;
  const int64_t units = batch * heads * blocks;
  at::Tensor partial = at::zeros({units, n}, importance.options());
  parallel_for_as_caller(0, units, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t b = unit / (heads * blocks), h = unit / blocks % heads, r0 = unit % blocks * rows_per_block;
      const int64_t rows = std::min(rows_per_block, queries - r0);
      OwnedMemory own_logits;
      AT_DISPATCH_FLOATING_TYPES(acc, "evoprune_importance_from_qk", [&] {
        scalar_t* data = scratch<scalar_t>(ScratchSlot::kLogits, size_t(rows) * size_t(n), own_logits);
        at::Tensor logits = at::from_blob(data, {rows, n}, importance.options());
        // beta = 0: the scratch's old values are not read; the scale rides in the GEMM.
        at::addmm_out(logits, logits, queries_acc[b][h].narrow(0, r0, rows), keys_acc[b][h].t(), /*beta=*/0,
                      /*alpha=*/scale);
        logits.sub_(logits.amax(1, /*keepdim=*/true)).exp_();
        const at::Tensor inverse_sums = logits.sum(1).reciprocal_();
        add_weighted_rows(data, inverse_sums.const_data_ptr<scalar_t>(), rows, n,
                          partial.mutable_data_ptr<scalar_t>() + unit * n);
      });
    }
  });
  // The units are added one after another, so the result does not depend on the threads (ATen's sum
  // over them would split its reduction by the thread count).
  AT_DISPATCH_FLOATING_TYPES(acc, "evoprune_importance_from_qk_sum", [&] {
    const scalar_t* parts = partial.const_data_ptr<scalar_t>();
    scalar_t* total = importance.mutable_data_ptr<scalar_t>();
    for (int64_t unit = 0; unit < units; ++unit) {
      scalar_t* sample_total = total + unit / (heads * blocks) * n;
      for (int64_t j = 0; j < n; ++j) sample_total[j] += parts[unit * n + j];
    }
  });
  return importance.div_(static_cast<double>(heads * queries)).to(at::kFloat);
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
