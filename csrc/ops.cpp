// The schemas of the evoprune ops (SPEC.md section 8). Kernels register per backend beside
// their code: csrc/cpu/*.cpp under CPU, csrc/cuda/*.cu under CUDA; fake kernels and autograd
// live in evoprune_ext/ops.py. The `alpha` default must equal evoprune_ext/defaults.py.
// The *_packed ops (several sequences packed in one tensor, docs/ALGORITHM.md "Packed
// sequences") have one CompositeImplicitAutograd implementation over the batched ops in
// csrc/packed.cpp, which also gives them autograd and fake kernels.
#include <torch/library.h>

TORCH_LIBRARY(evoprune, m) {
  m.def(
      "prune(Tensor tokens, Tensor? attn, *, int keep, Tensor? metric=None, Tensor? sizes=None, "
      "float alpha=0.1, int protect=0, bool merge=True) "
      "-> (Tensor out, Tensor index, Tensor sizes, Tensor slot)");
  m.def(
      "select(Tensor metric, Tensor? importance, *, int keep, float alpha=0.1, int protect=0) "
      "-> (Tensor index, Tensor slot)");
  m.def("merge(Tensor tokens, Tensor index, Tensor slot, Tensor? sizes=None) -> (Tensor out, Tensor sizes)");
  m.def("importance(Tensor attn) -> Tensor");
  m.def("importance_from_qk(Tensor q, Tensor k, float scale) -> Tensor");
  m.def(
      "prune_packed(Tensor tokens, Tensor? importance, *, SymInt[] lengths, SymInt[] keep, Tensor? metric=None, "
      "Tensor? sizes=None, float alpha=0.1, int protect=0, bool merge=True) "
      "-> (Tensor out, Tensor index, Tensor sizes, Tensor slot)");
  m.def(
      "select_packed(Tensor metric, Tensor? importance, *, SymInt[] lengths, SymInt[] keep, float alpha=0.1, "
      "int protect=0) -> (Tensor index, Tensor slot)");
  m.def(
      "importance_from_qk_packed(Tensor q, Tensor k, float scale, *, SymInt[] q_lengths, SymInt[] k_lengths) "
      "-> Tensor");
}
