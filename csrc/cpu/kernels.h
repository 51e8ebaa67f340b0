// Per-sample building blocks of the CPU kernels, shared by the op entry points in this folder
// (importance.cpp, select.cpp, merge.cpp, prune.cpp). Each works on sample b of a batch, so an
// op can run them for all samples in one at::parallel_for and keep a sample's data in cache
// from selection to merge.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace evoprune::cpu {

// Section 1: importance[B,N] float32 = mean over heads and query rows of attn[B,H,Q,N].
at::Tensor attention_importance(const at::Tensor& attn);

struct Selection {
  int64_t keep;
  int64_t protect;
  double alpha;
};

// Sections 1-3 for sample b: the greedy picks keep - protect tokens of metric[b] ([B,N,Dm], any
// strides), guided by importance[b] ([B,N] contiguous in the accumulation dtype, or undefined
// for none). Writes index[keep] (ascending) and slot[N].
void select_sample(const at::Tensor& metric, const at::Tensor& importance, int64_t b, const Selection& selection,
                   int64_t* index, int64_t* slot);

// Section 4 for sample b: out[b] ([B,K,D] contiguous) and sizes_out[b] ([B,K] float32) from
// tokens[b] (any strides) and sizes[b] (float32, or undefined for all ones).
// merge = true: size-weighted merge of every token into its slot; false: gather at index.
void merge_sample(const at::Tensor& tokens, const at::Tensor& sizes, int64_t b, const int64_t* index,
                  const int64_t* slot, bool merge, at::Tensor& out, at::Tensor& sizes_out);

}  // namespace evoprune::cpu
