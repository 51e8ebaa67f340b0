// CPU kernel of `select` and the greedy shared with `prune` (SPEC.md sections 1-3).
//
// Per sample: unit vectors u of the metric (O(N*Dm)), normalized importance (O(N)), then K'
// greedy steps. Each step is one pass over the tokens that both folds the new pick into red/owner
// and finds the next pick, so the greedy costs O(K'*N) on top of the similarities, never O(K'^2*N).
// Similarities come from GEMMs when an N x N matrix would fit kSimilarityMatrixBytes and many
// rows of it will be read (many picks), otherwise from dot products against the pick's unit vector,
// done inside the pass: O(K'*N*Dm) work and no memory beyond O(N*Dm). The greedy reads only the
// rows of its picks, so the GEMMs compute rows in blocks, when a pick's row is first needed, for
// that pick and the tokens most likely to be picked next (SimilarityRows).
// Threading: ops run samples in parallel; a pass over a large sample is split across threads
// (at::parallel_reduce), which is a no-op when already inside a parallel sample loop.
// Vectorization: the pass is compiled for AVX-512, AVX2 and the baseline (vectorize.h); all
// three compute bit for bit the same floats.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../composite.h"
#include "../math.h"
#include "kernels.h"
#include "parallel.h"
#include "scratch.h"
#include "vectorize.h"

namespace evoprune::cpu {
namespace {

// Largest N x N similarity matrix one sample may reserve (1 GiB: N = 16384 in float32). Past a
// few thousand tokens the dot products are bound by reading all unit vectors at every step, so
// GEMM rows win at any N whose matrix fits (K = N/4, one thread, full matrix: N = 9216 307 -> 195
// ms, N = 16384 1022 -> 593 ms; row blocks took the latter to 200 ms).
constexpr int64_t kSimilarityMatrixBytes = int64_t(1) << 30;
// A GEMM computes rows far faster per value than dot products do (BLAS runs ~20x more FLOP/s
// here), but guesses rows the greedy may never read; it pays off once the greedy will read at
// least one row in kColumnsPerGemmColumn: at K = N/16 both take the same time (one thread,
// N = 2304 to 9216, Dm = 64 and 1024).
constexpr int64_t kColumnsPerGemmColumn = 16;
// Tokens per thread chunk in a greedy pass: enough work to amortize waking a thread.
constexpr int64_t kPassWorkPerChunk = int64_t(1) << 16;

bool use_similarity_matrix(int64_t n, int64_t picks, size_t acc_bytes) {
  return n * n * int64_t(acc_bytes) <= kSimilarityMatrixBytes && picks * kColumnsPerGemmColumn >= n;
}

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t index;  // -1: none yet
};

template <typename acc_t>
Candidate<acc_t> better_of(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return beats(a.score, a.index, b.score, b.index) ? a : b;
}

// What one greedy pass reads and updates (all arrays indexed by token).
template <typename acc_t>
struct PassState {
  const acc_t* pick_row;    // similarities of the pick to every token, or nullptr: dot products
  const acc_t* unit;        // [N, dm] unit vectors
  int64_t n;
  int64_t dm;
  acc_t alpha;
  const acc_t* ti;           // normalized importance
  const int32_t* available;  // 1: may still be picked (int32, the width of float lanes)
  acc_t* red;                // redundancy: similarity to the owner, -1 for none
  int32_t* owner;
  acc_t* score;
};

template <typename acc_t>
inline __attribute__((always_inline)) acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  // Eight partial sums let the compiler vectorize without reassociating (no -ffast-math).
  acc_t partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += a[i + l] * b[i + l];
  }
  acc_t sum = 0;
  for (; i < len; ++i) sum += a[i] * b[i];
  for (int l = 0; l < 8; ++l) sum += partial[l];
  return sum;
}

// One greedy pass over tokens [lo, hi): fold `pick` (if >= 0) into red/owner and score every
// token, then return the best available candidate of the range: the highest score, the lowest
// index among equals (math.h's `beats` order). Branch-free, so the compiler vectorizes it; the
// maximum is kept per lane (kLanes of them) so that it vectorizes without reassociating.
template <typename acc_t>
inline __attribute__((always_inline)) Candidate<acc_t> greedy_pass_body(const PassState<acc_t>& st, int64_t pick,
                                                                         int64_t lo, int64_t hi) {
  acc_t* __restrict__ red = st.red;
  int32_t* __restrict__ owner = st.owner;
  acc_t* __restrict__ score = st.score;
  const acc_t* __restrict__ ti = st.ti;
  const int32_t* __restrict__ available = st.available;
  if (pick >= 0) {  // not "row != nullptr": an empty metric (Dm = 0) has no data pointer
    const int32_t picked = static_cast<int32_t>(pick);
    if (st.pick_row != nullptr) {
      const acc_t* __restrict__ row = st.pick_row;
      for (int64_t j = lo; j < hi; ++j) {
        const bool take = takes_ownership(row[j], red[j], owner[j] >= 0);
        red[j] = take ? row[j] : red[j];
        owner[j] = take ? picked : owner[j];
      }
    } else {
      const acc_t* pick_unit = st.unit + pick * st.dm;
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t s = dot(st.unit + j * st.dm, pick_unit, st.dm);
        const bool take = takes_ownership(s, red[j], owner[j] >= 0);
        red[j] = take ? s : red[j];
        owner[j] = take ? picked : owner[j];
      }
    }
  }
  constexpr int kLanes = 16;
  acc_t lane_best[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_best[l] = minus_infinity<acc_t>();
  const acc_t alpha = st.alpha;
  int64_t j = lo;
  for (; j + kLanes <= hi; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t s = greedy_score(alpha, ti[j + l], red[j + l]);
      score[j + l] = s;
      const acc_t candidate = available[j + l] ? s : minus_infinity<acc_t>();
      lane_best[l] = candidate > lane_best[l] ? candidate : lane_best[l];
    }
  }
  for (; j < hi; ++j) {
    const acc_t s = greedy_score(alpha, ti[j], red[j]);
    score[j] = s;
    const acc_t candidate = available[j] ? s : minus_infinity<acc_t>();
    lane_best[0] = candidate > lane_best[0] ? candidate : lane_best[0];
  }
  acc_t best_score = lane_best[0];
  for (int l = 1; l < kLanes; ++l) best_score = lane_best[l] > best_score ? lane_best[l] : best_score;
  for (int64_t k = lo; k < hi; ++k) {
    if (available[k] && score[k] == best_score) return Candidate<acc_t>{best_score, k};
  }
  return Candidate<acc_t>{minus_infinity<acc_t>(), -1};
}

// The pass, once per accumulation type, each compiled for several instruction sets.
EVOPRUNE_VECTOR_CLONES Candidate<float> greedy_pass(const PassState<float>& st, int64_t pick, int64_t lo, int64_t hi) {
  return greedy_pass_body(st, pick, lo, hi);
}
EVOPRUNE_VECTOR_CLONES Candidate<double> greedy_pass(const PassState<double>& st, int64_t pick, int64_t lo,
                                                     int64_t hi) {
  return greedy_pass_body(st, pick, lo, hi);
}

// u[i] = m[i] / max(||m[i]||, 1e-6), the norm taken in float64 (section 2).
template <typename scalar_t, typename acc_t>
at::Tensor unit_vectors(const at::Tensor& metric, int64_t b) {
  const int64_t n = metric.size(1), dm = metric.size(2);
  const int64_t sn = metric.stride(1), sd = metric.stride(2);
  const scalar_t* m = metric.const_data_ptr<scalar_t>() + b * metric.stride(0);
  at::Tensor unit = at::empty({n, dm}, metric.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* u = unit.mutable_data_ptr<acc_t>();
  at::parallel_for(0, n, std::max<int64_t>(1, kPassWorkPerChunk / std::max<int64_t>(dm, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      double squared_norm = 0;
      for (int64_t d = 0; d < dm; ++d) {
        const double v = static_cast<double>(m[i * sn + d * sd]);
        squared_norm += v * v;
      }
      const double divisor = unit_divisor(squared_norm);
      for (int64_t d = 0; d < dm; ++d) u[i * dm + d] = static_cast<acc_t>(static_cast<double>(m[i * sn + d * sd]) / divisor);
    }
  });
  return unit;
}

// ti over the candidates j >= protect (section 1); all zero without importance.
template <typename acc_t>
std::vector<acc_t> normalized_importances(const at::Tensor& importance, int64_t b, int64_t n, int64_t protect) {
  std::vector<acc_t> ti(n, acc_t(0));
  if (!importance.defined()) return ti;
  const acc_t* imp = importance.const_data_ptr<acc_t>() + b * n;
  acc_t max_importance = 0;
  bool found = false;
  for (int64_t j = protect; j < n; ++j) {
    if (is_finite(imp[j]) && (!found || imp[j] > max_importance)) {
      max_importance = imp[j];
      found = true;
    }
  }
  for (int64_t j = protect; j < n; ++j) ti[j] = normalized_importance(imp[j], max_importance);
  return ti;
}

// Rows of the similarity matrix U U^T, computed by GEMM in blocks of up to kRowsPerBlock when the
// greedy first needs one. The greedy reads the row of each pick only (K' of N rows): a block holds
// the pick and the available tokens that score highest now, the likeliest next picks. Against the
// full N x N GEMM, one thread, same picks: S4 (N = 4096, Dm = 1024, K = 1024) 240 -> 86 ms, and
// 256 -> 138 ms on clustered tokens at alpha = 0 (where fewer guesses hit); N = 16384, K = N/4
// 548 -> 200 ms; S2 0.83 -> 0.56 ms. Storage for every row is reserved (N x N at most,
// kSimilarityMatrixBytes); only computed rows are touched.
template <typename acc_t>
class SimilarityRows {
 public:
  SimilarityRows(const at::Tensor& unit, acc_t* storage, int64_t picks)
      : unit_(unit),
        n_(unit.size(0)),
        storage_(storage),
        block_(std::clamp<int64_t>(picks / 8, 8, kRowsPerBlock)),
        row_of_(n_, -1) {}

  // The similarities of `token` to every token. `score` and `available`: the greedy's state, to
  // choose which other rows to compute alongside.
  const acc_t* row(int64_t token, const acc_t* score, const int32_t* available) {
    if (row_of_[token] < 0) compute_block(token, score, available);
    return storage_ + row_of_[token] * n_;
  }

 private:
  static constexpr int64_t kRowsPerBlock = 128;

  void compute_block(int64_t token, const acc_t* score, const int32_t* available) {
    std::vector<int64_t> tokens{token};
    std::vector<int64_t> candidates;
    for (int64_t j = 0; j < n_; ++j) {
      if (available[j] && row_of_[j] < 0 && j != token) candidates.push_back(j);
    }
    // Each token's row is computed once, so the rows never outgrow the storage's N.
    const int64_t extra = std::min<int64_t>(block_ - 1, candidates.size());
    // Highest score first, lowest index among equals: the greedy's own order (math.h's `beats`).
    auto first = [&](int64_t a, int64_t b) { return beats(score[a], a, score[b], b); };
    std::partial_sort(candidates.begin(), candidates.begin() + extra, candidates.end(), first);
    tokens.insert(tokens.end(), candidates.begin(), candidates.begin() + extra);
    const int64_t rows = static_cast<int64_t>(tokens.size());
    const at::Tensor which = at::from_blob(tokens.data(), {rows}, at::TensorOptions().dtype(at::kLong));
    at::Tensor out = at::from_blob(storage_ + computed_ * n_, {rows, n_}, unit_.options());
    at::mm_out(out, unit_.index_select(0, which), unit_.t());
    for (int64_t r = 0; r < rows; ++r) row_of_[tokens[r]] = computed_ + r;
    computed_ += rows;
  }

  const at::Tensor& unit_;
  int64_t n_;
  acc_t* storage_;
  int64_t block_;
  std::vector<int64_t> row_of_;  // token -> row in storage_, -1: not computed
  int64_t computed_ = 0;
};

template <typename scalar_t, typename acc_t>
void select_sample_impl(const at::Tensor& metric, const at::Tensor& importance, int64_t b, const Selection& selection,
                        int64_t* index, int64_t* slot) {
  const int64_t n = metric.size(1), dm = metric.size(2);
  const int64_t protect = selection.protect, picks = selection.keep - selection.protect;
  const acc_t alpha = static_cast<acc_t>(selection.alpha);

  const at::Tensor unit = unit_vectors<scalar_t, acc_t>(metric, b);
  const acc_t* u = unit.const_data_ptr<acc_t>();
  const std::vector<acc_t> ti = normalized_importances<acc_t>(importance, b, n, protect);

  const bool matrix = picks > 0 && use_similarity_matrix(n, picks, sizeof(acc_t));
  OwnedMemory own_matrix;
  std::optional<SimilarityRows<acc_t>> rows;
  if (matrix) rows.emplace(unit, scratch<acc_t>(ScratchSlot::kSimilarity, size_t(n) * size_t(n), own_matrix), picks);

  std::vector<acc_t> red(n, acc_t(-1));
  std::vector<int32_t> owner(n, -1);  // N < 2^31 is checked by select_sample
  std::vector<acc_t> score(n);
  std::vector<int32_t> available(n, 0);
  std::fill(available.begin() + protect, available.end(), 1);
  // Protected tokens are skipped by every pass: they own nothing and are never picked.
  PassState<acc_t> state{nullptr, u, n, dm, alpha, ti.data(), available.data(), red.data(), owner.data(), score.data()};
  auto pass = [&](int64_t pick, int64_t lo, int64_t hi) { return greedy_pass(state, pick, lo, hi); };
  const int64_t grain = std::max<int64_t>(1, kPassWorkPerChunk / (matrix ? 1 : std::max<int64_t>(dm, 1)));
  auto parallel_pass = [&](int64_t pick) {
    return at::parallel_reduce(protect, n, grain, Candidate<acc_t>{minus_infinity<acc_t>(), -1},
                               [&](int64_t lo, int64_t hi, Candidate<acc_t> identity) {
                                 return better_of(pass(pick, lo, hi), identity);
                               },
                               better_of<acc_t>);
  };

  std::vector<int64_t> chosen;
  chosen.reserve(picks);
  Candidate<acc_t> next = picks > 0 ? parallel_pass(-1) : Candidate<acc_t>{0, -1};
  for (int64_t step = 0; step < picks; ++step) {
    const int64_t pick = next.index;  // valid: picks <= number of candidates, all available at the start
    chosen.push_back(pick);
    available[pick] = 0;
    if (rows) state.pick_row = rows->row(pick, score.data(), available.data());
    next = parallel_pass(pick);
  }

  std::sort(chosen.begin(), chosen.end());
  std::vector<int64_t> position(n, -1);
  for (int64_t p = 0; p < protect; ++p) position[p] = p;
  for (int64_t t = 0; t < picks; ++t) position[chosen[t]] = protect + t;
  for (int64_t p = 0; p < selection.keep; ++p) index[p] = p < protect ? p : chosen[p - protect];
  for (int64_t j = 0; j < n; ++j) {
    slot[j] = position[j] >= 0 ? position[j] : (owner[j] >= 0 ? position[owner[j]] : -1);
  }
}

std::tuple<at::Tensor, at::Tensor> select_cpu(const at::Tensor& metric, const std::optional<at::Tensor>& importance,
                                              int64_t keep, double alpha, int64_t protect) {
  check_hidden(metric, "metric");
  if (importance.has_value()) check_attn(*importance, metric, "importance", /*allow_4d=*/false);
  const int64_t batch = metric.size(0), n = metric.size(1);
  check_selection_args(n, keep, protect, alpha);

  const at::Tensor imp =
      importance.has_value() ? importance->to(accumulate_type(metric.scalar_type())).contiguous() : at::Tensor();
  at::Tensor index = at::empty({batch, keep}, metric.options().dtype(at::kLong));
  at::Tensor slot = at::empty({batch, n}, metric.options().dtype(at::kLong));
  int64_t* index_data = index.mutable_data_ptr<int64_t>();
  int64_t* slot_data = slot.mutable_data_ptr<int64_t>();
  const Selection selection{keep, protect, alpha};
  parallel_for_as_caller(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      select_sample(metric, imp, b, selection, index_data + b * keep, slot_data + b * n);
    }
  });
  return {index, slot};
}

}  // namespace

void select_sample(const at::Tensor& metric, const at::Tensor& importance, int64_t b, const Selection& selection,
                   int64_t* index, int64_t* slot) {
  TORCH_CHECK(metric.size(1) < (int64_t(1) << 31), "select supports N < 2^31 tokens, got ", metric.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "evoprune_select", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    select_sample_impl<scalar_t, acc_t>(metric, importance, b, selection, index, slot);
  });
}

TORCH_LIBRARY_IMPL(evoprune, CPU, m) { m.impl("select", &select_cpu); }

}  // namespace evoprune::cpu
