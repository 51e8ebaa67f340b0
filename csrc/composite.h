// Host code both backends share: the accumulation dtype, and `importance_from_qk` as a
// composition of ATen ops (batched GEMM, softmax, sums), which csrc/cuda/importance.cu registers
// (the CPU has a kernel of its own that keeps each block of logits in cache: cpu/importance.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace evoprune {

// float64 inputs are computed in float64, everything else in float32 (SPEC.md sections 1-2).
inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// SPEC.md section 6: importance[B,N] float32 = mean over heads and query rows of
// softmax(scale * q k^T), q [B,H,Q,d], k [B,H,N,d] (arguments already checked).
at::Tensor importance_from_qk_blocked(const at::Tensor& q, const at::Tensor& k, double scale);

}  // namespace evoprune
