// at::parallel_for for loop bodies that call ATen ops.
//
// ATen's own kernels touch only raw memory inside at::parallel_for, so it hands its worker threads
// no thread-local state: a worker runs ops with the defaults (grad mode on, no inference mode, no
// excluded dispatch keys), whatever the caller set. Where a body calls ops (GEMMs into scratch, the
// softmax of a block), each worker first takes the caller's state, as if the caller's thread ran
// it; without that, an op called under torch.inference_mode fails in a worker ("Inplace update to
// inference tensor outside InferenceMode").
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace evoprune::cpu {

template <class F>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain_size, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard guard(caller);
    f(lo, hi);
  });
}

}  // namespace evoprune::cpu
