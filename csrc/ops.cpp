// The schemas of the evoprune ops (SPEC.md section 8). Kernels register per backend beside
// their code: csrc/cpu/*.cpp under CPU, csrc/cuda/*.cu under CUDA; fake kernels and autograd
// live in evoprune_ext/ops.py. The `alpha` default must equal evoprune_ext/defaults.py.
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
}
