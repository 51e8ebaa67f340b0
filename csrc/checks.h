// Argument validation shared by the CPU and CUDA entry points (SPEC.md section 5): every
// invalid argument raises with a message that names it and says what was expected.
// Shape, dtype and device checks only; value checks that need to read tensor data
// (sizes, index, slot) are done by each backend's kernels (see check_sizes_values) or by
// check_merge_values.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace evoprune {

// tokens or metric: [B,N,D], float32/float64/float16/bfloat16.
void check_hidden(const at::Tensor& t, const char* name);
// metric beside tokens: same B, N, dtype and device.
void check_metric(const at::Tensor& metric, const at::Tensor& tokens);
// attn of prune: [B,H,Q,N] probabilities or [B,N] importance; float32 or the tokens' dtype.
void check_attn(const at::Tensor& attn, const at::Tensor& tokens, const char* name, bool allow_4d);
// sizes: [B,N] float32 on the tokens' device.
void check_sizes(const at::Tensor& sizes, const at::Tensor& tokens);
// keep in [protect, N], protect in [0, N], alpha in [0, 1].
void check_selection_args(int64_t n, int64_t keep, int64_t protect, double alpha);
// index [B,K] and slot [B,N], int64, on the tokens' device.
void check_index_slot(const at::Tensor& tokens, const at::Tensor& index, const at::Tensor& slot);
// Every argument of prune (shapes, dtypes, devices, keep/protect/alpha).
void check_prune_args(const at::Tensor& tokens, const std::optional<at::Tensor>& attn,
                      const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes, int64_t keep,
                      int64_t protect, double alpha);
// attn of importance: [B,H,Q,N] floating.
void check_attention(const at::Tensor& attn);
// q [B,H,Q,d] and k [B,H,N,d]: same B, H, d, dtype and device; finite scale.
void check_qk(const at::Tensor& q, const at::Tensor& k, double scale);

// The packed form (csrc/packed.cpp): T tokens of several sequences in one tensor, lengths and
// keep counts given per sequence.
// tokens or metric: [T, D], float32/float64/float16/bfloat16.
void check_packed_hidden(const at::Tensor& t, const char* name);
// lengths: at least one entry, each >= 0, summing to total (the packed size of `packed_name`).
void check_packed_lengths(at::IntArrayRef lengths, int64_t total, const char* name, const char* packed_name);
// Every argument of select_packed (hidden = metric) or, with hidden = tokens, the ones prune_packed shares with it.
void check_packed_select_args(const at::Tensor& hidden, const char* hidden_name,
                              const std::optional<at::Tensor>& importance, at::IntArrayRef lengths,
                              at::IntArrayRef keep, int64_t protect, double alpha);
// Every argument of prune_packed.
void check_packed_prune_args(const at::Tensor& tokens, const std::optional<at::Tensor>& importance,
                             const std::optional<at::Tensor>& metric, const std::optional<at::Tensor>& sizes,
                             at::IntArrayRef lengths, at::IntArrayRef keep, int64_t protect, double alpha);
// q [H, Tq, d] and k [H, T, d] with their lengths: same H, d, dtype, device, number of sequences; finite scale.
void check_packed_qk(const at::Tensor& q, const at::Tensor& k, double scale, at::IntArrayRef q_lengths,
                     at::IntArrayRef k_lengths);

// Reads sizes (CPU only): every entry finite and >= 0.
void check_sizes_values_cpu(const at::Tensor& sizes);
// Reads index and slot (CPU only): index in [0,N), slot in [-1,K), slot[b, index[b,p]] == p.
void check_index_slot_values_cpu(const at::Tensor& index, const at::Tensor& slot);
// Both of the above on any device, with one host synchronization (CUDA merge: docs/CUDA.md);
// sizes may be undefined (all ones).
void check_merge_values(const at::Tensor& index, const at::Tensor& slot, const at::Tensor& sizes);

}  // namespace evoprune
