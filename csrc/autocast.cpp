// The ops under torch.autocast (pytorch/vision's csrc/ops/autocast idiom): registered under the
// Autocast keys of CPU and CUDA, a kernel that turns autocast off for the op's whole body, then
// calls the op again, which now reaches Autograd and the backend kernel. Without it autocast stays
// on inside the kernels, so their at::mm/at::bmm/softmax return bf16/fp16: select and prune
// fail on a dtype mismatch and importance_from_qk loses float32 accuracy (issue 9). Unlike
// torchvision's ops, ours cast nothing: every dtype is supported and computed in float32 or float64
// already, so under autocast an op returns exactly what it returns without.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace evoprune {
namespace {

void without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_without_autocast(torch::Library& m) {
  for (const char* op : {"prune", "select", "merge", "importance", "importance_from_qk"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&without_autocast>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(evoprune, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(evoprune, AutocastCUDA, m) { register_without_autocast(m); }

}  // namespace evoprune
