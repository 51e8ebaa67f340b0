// The per-element math of EvoPrune, shared by the CPU kernels (csrc/cpu/) and the CUDA
// kernels (csrc/cuda/): every formula that decides which token is kept, who owns a dropped
// token and how merged tokens are weighted lives here once, so the backends cannot drift.
// Section numbers refer to ../shared/SPEC.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define EVOPRUNE_HD __host__ __device__ __forceinline__
#else
#define EVOPRUNE_HD inline
#endif

namespace evoprune {

// Lower bound of a metric row's norm (section 2): a zero row gets a zero unit vector.
constexpr double kMinNorm = 1e-6;

template <typename acc_t>
EVOPRUNE_HD acc_t minus_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
EVOPRUNE_HD bool is_finite(acc_t x) {
#if defined(__CUDA_ARCH__)
  return isfinite(x);
#else
  return std::isfinite(x);
#endif
}

// Divisor that turns a metric row into a unit vector, from its squared norm (section 2).
// Squared norms are accumulated in double so that rows of magnitude 1e30 do not overflow.
EVOPRUNE_HD double unit_divisor(double squared_norm) {
  const double norm = sqrt(squared_norm);
  return norm > kMinNorm ? norm : kMinNorm;
}

// Normalized importance ti (section 1). `max_importance` is the largest finite importance
// among the candidates, or any value <= 0 when there is none.
template <typename acc_t>
EVOPRUNE_HD acc_t normalized_importance(acc_t importance, acc_t max_importance) {
  if (!is_finite(importance)) return minus_infinity<acc_t>();
  return max_importance > acc_t(0) ? importance / max_importance : acc_t(0);
}

// Greedy score of an available candidate (section 3, step 1); NaN counts as -inf.
template <typename acc_t>
EVOPRUNE_HD acc_t greedy_score(acc_t alpha, acc_t ti, acc_t redundancy) {
  const acc_t score = alpha * ti + (acc_t(1) - alpha) * (acc_t(1) - redundancy) / acc_t(2);
  return score != score ? minus_infinity<acc_t>() : score;
}

// Argmax order of the greedy (section 3, step 2): the higher score wins, ties go to the lower
// index. `index < 0` marks "no candidate yet", so any real candidate beats it, even at -inf;
// this is what makes an all -inf step take the smallest available index.
template <typename acc_t>
EVOPRUNE_HD bool beats(acc_t score, int64_t index, acc_t best_score, int64_t best_index) {
  if (best_index < 0) return index >= 0;
  if (index < 0) return false;
  return score > best_score || (score == best_score && index < best_index);
}

// Whether the newly chosen token takes over ownership of a token (section 3, step 4): any
// number when the token has no owner yet (even -1, or just below it after rounding: whether a
// similarity rounds to exactly -1 must not decide whether a token is dropped), else strictly
// more similar than its current owner. NaN never wins; the earlier pick wins ties.
template <typename acc_t>
EVOPRUNE_HD bool takes_ownership(acc_t similarity, acc_t redundancy, bool owned) {
  return similarity > redundancy || (!owned && similarity == similarity);
}

// Size-weighted merge (section 4): an output position p carries the group of tokens j with
// slot[j] = p, kept token included. A kept token that received nothing is copied bit for bit, and
// so is one whose group's sizes add up to zero (there is no weighted mean to take; see
// docs/ALGORITHM.md). Otherwise out[p] = (sum_j s_j x_j) / (sum_j s_j), accumulated in acc_t.
template <typename acc_t>
EVOPRUNE_HD bool copies_kept_token(int64_t group_members, acc_t group_size) {
  return group_members <= 1 || !(group_size > acc_t(0));
}

}  // namespace evoprune
