// CUDA kernel of `select` and the greedy shared with `prune` (SPEC.md sections 1-3).
//
// 1. unit_vectors: u = m / max(||m||, 1e-6) per token, the squared norm accumulated in float64
//    (math.h, unit_divisor). Warp per token, lanes stride along Dm (any strides of the metric).
// 2. Similarities: when the greedy will read at least one column in kColumnsPerGemmColumn and the
//    N x N matrices of a group of samples fit kSimilarityBudgetBytes, one at::bmm(u, u^T) per
//    group (cuBLAS, TF32 off: float32 as on CPU); otherwise each greedy step computes the dot
//    products of every token with the pick's unit vector inside the kernel (warp per token,
//    coalesced along Dm). Same policy as csrc/cpu/select.cpp, plus one rule: while the process
//    allows TF32 for float32 matmuls, the dot products are used (docs/CUDA.md, "TF32").
// 3. greedy_select: ONE launch runs the whole greedy of every sample of a group: one block of
//    kGreedyThreads per sample, red/owner in shared memory when N*(sizeof(acc)+4) bytes fit the
//    device's opt-in limit less the kernel's static shared memory, in a global workspace
//    otherwise. Each step is one pass over the tokens that folds the previous pick into red/owner
//    and scores the candidates, then a block-wide argmax on (score, index) with math.h's `beats`
//    (lowest index wins ties), exactly the CPU's pass. The picks are then ranked with a block scan
//    to give index (ascending) and slot.
// The kernels and the launch policy (plan_select) live in select_kernel.cuh, which the tests also
// execute on the CPU (make test-kernels); this file allocates, runs the GEMMs and launches.
// No host synchronization: every size is known from the shapes, so the op is graph-capturable.
// Cost per sample: O(N*Dm) + K' steps of O(N) (matrix) or O(N*Dm) (dot products); docs/CUDA.md.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>

#include "../checks.h"
#include "../composite.h"
#include "kernels.cuh"
#include "select_kernel.cuh"

namespace evoprune::cuda {
namespace {

// The most dynamic shared memory `kernel` may take on the current device: the opt-in limit less
// the kernel's static shared memory (argmax and scan storage). The first call per device also
// raises the kernel's dynamic shared memory limit to that, once: launches above 48 KiB need the
// opt-in, and setting it per call to the call's own size would let one host thread lower the
// limit between another thread's set and launch.
template <auto* kernel>
int64_t dynamic_shared_limit() {
  static std::array<std::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  static std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> limit;
  const c10::DeviceIndex device = c10::cuda::current_device();
  std::call_once(once[device], [&] {
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const int dynamic = current_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) -
                        static_cast<int>(attributes.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic));
    limit[device] = dynamic;
  });
  return limit[device];
}

template <typename scalar_t, typename acc_t>
void select_impl(const at::Tensor& metric, const at::Tensor& importance, int64_t keep, double alpha, int64_t protect,
                 at::Tensor& index, at::Tensor& slot) {
  const int64_t batch = metric.size(0), n = metric.size(1), dm = metric.size(2), picks = keep - protect;
  const auto acc_options = metric.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // at::NoTF32Guard keeps cuBLAS in float32, but cuBLASLt and TunableOp follow the process-wide
  // setting: while it allows TF32 (torch.backends.cuda.matmul.allow_tf32, or
  // set_float32_matmul_precision("high")), a GEMM could round the similarities to about 1e-3, so
  // the greedy computes its dot products itself. Reading the flag is race-free; writing it is not.
  const bool matrix = use_similarity_matrix(n, picks, sizeof(acc_t), at::globalContext().allowTF32CuBLAS());
  const auto kernel = matrix ? greedy_select<acc_t, true> : greedy_select<acc_t, false>;
  const int64_t shared_limit = matrix ? dynamic_shared_limit<&greedy_select<acc_t, true>>()
                                      : dynamic_shared_limit<&greedy_select<acc_t, false>>();
  const SelectPlan plan = plan_select(batch, n, sizeof(acc_t), matrix, shared_limit);

  at::Tensor unit = at::empty({batch, n, dm}, acc_options);
  if (plan.unit_blocks > 0) {
    unit_vectors<scalar_t, acc_t><<<plan.unit_blocks, kUnitWarpsPerBlock * kWarpSize, 0, stream>>>(
        metric.const_data_ptr<scalar_t>(), batch * n, n, dm, metric.stride(0), metric.stride(1), metric.stride(2),
        unit.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor red, owner;
  if (!plan.shared_state) {
    red = at::empty({batch, n}, acc_options);
    owner = at::empty({batch, n}, metric.options().dtype(at::kInt));
  }

  for (int64_t b0 = 0; b0 < batch; b0 += plan.group) {
    const int64_t samples = std::min(plan.group, batch - b0);
    at::Tensor similarity;
    if (matrix) {
      const at::NoTF32Guard float32_products;  // cuBLAS; cuBLASLt and TunableOp: see above
      const at::Tensor u = unit.narrow(0, b0, samples);
      similarity = at::bmm(u, u.transpose(1, 2));
    }
    GreedyArgs<acc_t> args{};
    args.unit = unit.const_data_ptr<acc_t>() + b0 * n * dm;
    args.similarity = matrix ? similarity.const_data_ptr<acc_t>() : nullptr;
    args.importance = importance.defined() ? importance.const_data_ptr<acc_t>() + b0 * n : nullptr;
    args.red = plan.shared_state ? nullptr : red.mutable_data_ptr<acc_t>() + b0 * n;
    args.owner = plan.shared_state ? nullptr : owner.mutable_data_ptr<int32_t>() + b0 * n;
    args.index = index.mutable_data_ptr<int64_t>() + b0 * keep;
    args.slot = slot.mutable_data_ptr<int64_t>() + b0 * n;
    args.n = n;
    args.dm = dm;
    args.keep = keep;
    args.protect = protect;
    args.alpha = static_cast<acc_t>(alpha);
    kernel<<<static_cast<unsigned>(samples), kGreedyThreads, plan.dynamic_shared, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> select_cuda(const at::Tensor& metric, const std::optional<at::Tensor>& importance,
                                               int64_t keep, double alpha, int64_t protect) {
  check_hidden(metric, "metric");
  if (importance.has_value()) check_attn(*importance, metric, "importance", /*allow_4d=*/false);
  check_selection_args(metric.size(1), keep, protect, alpha);
  const c10::cuda::CUDAGuard guard(metric.device());
  const at::Tensor imp =
      importance.has_value() ? importance->to(accumulate_type(metric.scalar_type())).contiguous() : at::Tensor();
  return select_tokens(metric, imp, keep, alpha, protect);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_tokens(const at::Tensor& metric, const at::Tensor& importance, int64_t keep,
                                                 double alpha, int64_t protect) {
  const c10::cuda::CUDAGuard guard(metric.device());
  const int64_t batch = metric.size(0), n = metric.size(1);
  TORCH_CHECK(n < (int64_t(1) << 30), "select on CUDA supports N < 2^30 tokens, got ", n);
  TORCH_CHECK(batch < (int64_t(1) << 31), "select on CUDA supports B < 2^31 samples, got ", batch);
  at::Tensor index = at::empty({batch, keep}, metric.options().dtype(at::kLong));
  at::Tensor slot = at::empty({batch, n}, metric.options().dtype(at::kLong));
  if (batch == 0) return {index, slot};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "evoprune_select_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    select_impl<scalar_t, acc_t>(metric, importance, keep, alpha, protect, index, slot);
  });
  return {index, slot};
}

TORCH_LIBRARY_IMPL(evoprune, CUDA, m) { m.impl("select", &select_cuda); }

}  // namespace evoprune::cuda
