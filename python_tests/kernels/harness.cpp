// Test-only torch extension (library `evoprune_sim`): the launchers of csrc/cuda/*.cu replayed on
// CPU tensors, launching the very kernels of csrc/cuda/*_kernel.cuh through cuda_sim.h, with the
// launch plans of those headers. Each op takes the device limits the plan depends on, and select
// lets a test force the branch the shapes would not pick. Built by sim.py (JIT, cached).
//
// Where a launcher here differs from its .cu: the CPU stand-ins of the cuBLAS GEMM (at::bmm on
// CPU, float32) and of cudaFuncGetAttributes (the greedy's static shared memory, counted from its
// declarations), and red zones around every buffer the kernels write (Guarded, below).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "csrc/cuda/importance_kernel.cuh"
#include "csrc/cuda/merge_kernel.cuh"
#include "csrc/cuda/select_kernel.cuh"
#include "cuda_sim.h"

namespace evoprune::cuda {
namespace {

void configure(int64_t order_seed, std::string skip_barrier_file, int64_t skip_barrier_line,
               std::string drop_shuffle_file, int64_t drop_shuffle_line, int64_t drop_shuffle_warp) {
  sim::Settings& s = sim::settings();
  s.order_seed = static_cast<uint64_t>(order_seed);
  s.skip_barrier_file = std::move(skip_barrier_file);
  s.skip_barrier_line = static_cast<int>(skip_barrier_line);
  s.drop_shuffle_file = std::move(drop_shuffle_file);
  s.drop_shuffle_line = static_cast<int>(drop_shuffle_line);
  s.drop_shuffle_warp = static_cast<int>(drop_shuffle_warp);
  sim::counters() = sim::Counters{};
}

// launches, blocks, barriers, skipped barriers, shuffles, dropped shuffles, failed device asserts.
std::vector<int64_t> counters() {
  const sim::Counters& c = sim::counters();
  return {c.launches, c.blocks, c.barriers, c.skipped_barriers, c.shuffles, c.dropped_shuffles, c.failed_asserts};
}

std::string first_assert() { return sim::counters().first_assert; }

at::ScalarType accumulation(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Every buffer a kernel writes comes with red zones: a kernel that writes out of bounds (a rank
// scan gone wrong, say) would corrupt the process's heap here, where a GPU would raise an illegal
// address. Checked after the launches: a clear error instead of a crash.
class Guarded {
 public:
  Guarded(at::IntArrayRef shape, const at::TensorOptions& options, const char* name) : name_(name) {
    element_ = static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
    int64_t numel = 1;
    for (int64_t extent : shape) numel *= extent;
    bytes_ = at::full({(numel + 2 * kZone) * element_}, kPattern, options.dtype(at::kByte));
    tensor_ = bytes_.view(c10::typeMetaToScalarType(options.dtype())).narrow(0, kZone, numel).view(shape);
  }
  at::Tensor& tensor() { return tensor_; }
  void check() const {
    const int64_t zone = kZone * element_;
    const bool intact = bytes_.narrow(0, 0, zone).eq(kPattern).all().item<bool>() &&
                        bytes_.narrow(0, bytes_.numel() - zone, zone).eq(kPattern).all().item<bool>();
    TORCH_CHECK(intact, "cuda_sim: a kernel wrote outside ", name_);
  }

 private:
  static constexpr int64_t kZone = 4096;  // elements on each side
  static constexpr int kPattern = 0xa5;
  const char* name_;
  int64_t element_;
  at::Tensor bytes_, tensor_;
};

// select_tokens / select_impl of select.cu. `matrix`: -1 the policy's choice (with `allow_tf32`),
// 0 or 1 forced. `optin_shared`: the device's opt-in shared memory per block (232,448 B on H200);
// `budget`: bytes of similarity matrices per launch (select.cu's kSimilarityBudgetBytes, or less to
// force several groups). Returns index, slot and the plan: matrix, shared state, group, dynamic
// shared bytes, unit-vector blocks.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> select(const at::Tensor& metric,
                                                                const std::optional<at::Tensor>& importance,
                                                                int64_t keep, double alpha, int64_t protect,
                                                                int64_t matrix, bool allow_tf32, int64_t optin_shared,
                                                                int64_t budget) {
  const int64_t batch = metric.size(0), n = metric.size(1), dm = metric.size(2), picks = keep - protect;
  const auto acc_options = metric.options().dtype(accumulation(metric.scalar_type()));
  const at::Tensor imp = importance.has_value() ? importance->to(acc_options).contiguous() : at::Tensor();
  Guarded index_buffer({batch, keep}, metric.options().dtype(at::kLong), "index");
  Guarded slot_buffer({batch, n}, metric.options().dtype(at::kLong), "slot");
  at::Tensor& index = index_buffer.tensor();
  at::Tensor& slot = slot_buffer.tensor();
  std::vector<int64_t> plan_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "evoprune_sim_select", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool use_matrix = matrix >= 0 ? matrix == 1
                                        : use_similarity_matrix(n, picks, sizeof(acc_t), allow_tf32, budget);
    // What cudaFuncGetAttributes reports as greedy_select's static shared memory.
    const int64_t static_shared = sizeof(ArgmaxStorage<acc_t>) + sizeof(int) * kGreedyWarps;
    const int64_t shared_limit = optin_shared - static_shared;
    sim::settings().max_dynamic_shared = shared_limit;
    const SelectPlan plan = plan_select(batch, n, sizeof(acc_t), use_matrix, shared_limit, budget);
    plan_out = {use_matrix, plan.shared_state, plan.group, static_cast<int64_t>(plan.dynamic_shared),
                plan.unit_blocks};
    if (batch == 0) return;

    Guarded unit_buffer({batch, n, dm}, acc_options, "the unit vectors");
    at::Tensor& unit = unit_buffer.tensor();
    if (plan.unit_blocks > 0) {
      sim::launch(dim3(plan.unit_blocks), dim3(kUnitWarpsPerBlock * kWarpSize), 0, unit_vectors<scalar_t, acc_t>,
                  metric.const_data_ptr<scalar_t>(), batch * n, n, dm, metric.stride(0), metric.stride(1),
                  metric.stride(2), unit.mutable_data_ptr<acc_t>());
    }
    // Allocated in both cases so that the red zones are checked alike; unused with shared state.
    Guarded red_buffer({batch, n}, acc_options, "red");
    Guarded owner_buffer({batch, n}, metric.options().dtype(at::kInt), "owner");
    at::Tensor& red = red_buffer.tensor();
    at::Tensor& owner = owner_buffer.tensor();
    const auto kernel = use_matrix ? greedy_select<acc_t, true> : greedy_select<acc_t, false>;
    for (int64_t b0 = 0; b0 < batch; b0 += plan.group) {
      const int64_t samples = std::min(plan.group, batch - b0);
      at::Tensor similarity;
      if (use_matrix) {
        const at::Tensor u = unit.narrow(0, b0, samples);
        similarity = at::bmm(u, u.transpose(1, 2));
      }
      GreedyArgs<acc_t> args{};
      args.unit = unit.const_data_ptr<acc_t>() + b0 * n * dm;
      args.similarity = use_matrix ? similarity.const_data_ptr<acc_t>() : nullptr;
      args.importance = imp.defined() ? imp.const_data_ptr<acc_t>() + b0 * n : nullptr;
      args.red = plan.shared_state ? nullptr : red.mutable_data_ptr<acc_t>() + b0 * n;
      args.owner = plan.shared_state ? nullptr : owner.mutable_data_ptr<int32_t>() + b0 * n;
      args.index = index.mutable_data_ptr<int64_t>() + b0 * keep;
      args.slot = slot.mutable_data_ptr<int64_t>() + b0 * n;
      args.n = n;
      args.dm = dm;
      args.keep = keep;
      args.protect = protect;
      args.alpha = static_cast<acc_t>(alpha);
      sim::launch(dim3(static_cast<unsigned>(samples)), dim3(kGreedyThreads), plan.dynamic_shared, kernel, args);
    }
    for (const Guarded* buffer : {&unit_buffer, &red_buffer, &owner_buffer}) buffer->check();
  });
  index_buffer.check();
  slot_buffer.check();
  return {index, slot, plan_out};
}

// merge_tokens / merge_impl of merge.cu.
std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& tokens, const std::optional<at::Tensor>& sizes,
                                         const at::Tensor& index, const at::Tensor& slot, bool merge) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), keep = index.size(1);
  Guarded out_buffer({batch, keep, tokens.size(2)}, tokens.options(), "out");
  Guarded sizes_out_buffer({batch, keep}, tokens.options().dtype(at::kFloat), "sizes_out");
  at::Tensor& out = out_buffer.tensor();
  at::Tensor& sizes_out = sizes_out_buffer.tensor();
  const Sizes s{sizes.has_value() ? sizes->const_data_ptr<float>() : nullptr, sizes.has_value() ? sizes->stride(0) : 0,
                sizes.has_value() ? sizes->stride(1) : 0};
  const MergePlan plan = plan_merge(batch, n, keep, tokens.size(2));
  sim::settings().max_dynamic_shared = 0;
  if (sizes.has_value() && batch * n > 0) {
    sim::launch(dim3(plan.check_blocks), dim3(kCheckThreads), 0, check_sizes_values, s, batch, n);
  }
  if (batch * keep == 0) return {out, sizes_out};
  const at::Tensor index_c = index.contiguous(), slot_c = slot.contiguous();
  const Tokens t{n, tokens.size(2), tokens.stride(0), tokens.stride(1), tokens.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "evoprune_sim_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = tokens.const_data_ptr<scalar_t>();
    if (!merge) {
      sim::launch(plan.rows_grid, dim3(kMergeColumns), 0, gather_kept<scalar_t>, x, t, s,
                  index_c.const_data_ptr<int64_t>(), keep, out.mutable_data_ptr<scalar_t>(),
                  sizes_out.mutable_data_ptr<float>());
      return;
    }
    const auto acc_options = tokens.options().dtype(accumulation(tokens.scalar_type()));
    Guarded sums_buffer({batch, keep, t.d}, acc_options, "sums");
    Guarded group_size_buffer({batch, keep}, acc_options, "group_size");
    Guarded members_buffer({batch, keep}, tokens.options().dtype(at::kInt), "members");
    at::Tensor& sums = sums_buffer.tensor().zero_();
    at::Tensor& group_size = group_size_buffer.tensor().zero_();
    at::Tensor& members = members_buffer.tensor().zero_();
    sim::launch(plan.accumulate_grid, dim3(kMergeColumns), 0, accumulate_groups<scalar_t, acc_t>, x, t, s,
                slot_c.const_data_ptr<int64_t>(), keep, sums.mutable_data_ptr<acc_t>(),
                group_size.mutable_data_ptr<acc_t>(), members.mutable_data_ptr<int32_t>());
    sim::launch(plan.rows_grid, dim3(kMergeColumns), 0, finish_groups<scalar_t, acc_t>, x, t,
                index_c.const_data_ptr<int64_t>(), slot_c.const_data_ptr<int64_t>(), keep,
                sums.const_data_ptr<acc_t>(), group_size.const_data_ptr<acc_t>(), members.const_data_ptr<int32_t>(),
                out.mutable_data_ptr<scalar_t>(), sizes_out.mutable_data_ptr<float>());
    for (const Guarded* buffer : {&sums_buffer, &group_size_buffer, &members_buffer}) buffer->check();
  });
  out_buffer.check();
  sizes_out_buffer.check();
  return {out, sizes_out};
}

// attention_importance of importance.cu on a device with `sms` SMs. Returns importance and the
// plan: splits, rows per split.
std::tuple<at::Tensor, std::vector<int64_t>> importance(const at::Tensor& attn, int64_t sms) {
  const int64_t batch = attn.size(0), heads = attn.size(1), queries = attn.size(2), n = attn.size(3);
  Guarded result_buffer({batch, n}, attn.options().dtype(at::kFloat), "importance");
  at::Tensor& result = result_buffer.tensor();
  const int64_t rows = heads * queries;
  if (batch == 0 || n == 0) return {result, {}};
  if (rows == 0) return {result.fill_(std::numeric_limits<float>::quiet_NaN()), {}};
  const ImportancePlan plan = plan_importance(batch, n, rows, sms);
  sim::settings().max_dynamic_shared = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "evoprune_sim_importance", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Guarded partial_buffer({plan.splits, batch, n}, attn.options().dtype(accumulation(attn.scalar_type())), "partial");
    at::Tensor& partial = partial_buffer.tensor();
    sim::launch(plan.grid, plan.block, 0, column_partial_sums<scalar_t, acc_t>, attn.const_data_ptr<scalar_t>(), n,
                queries, rows, plan.rows_per_split, attn.stride(0), attn.stride(1), attn.stride(2), attn.stride(3),
                partial.mutable_data_ptr<acc_t>());
    sim::launch(dim3(plan.finish_blocks), dim3(kFinishThreads), 0, finish_importance<acc_t>,
                partial.const_data_ptr<acc_t>(), plan.splits, batch * n, static_cast<acc_t>(rows),
                result.mutable_data_ptr<float>());
    partial_buffer.check();
  });
  result_buffer.check();
  return {result, {plan.splits, plan.rows_per_split}};
}

// Kernels that probe the model's own rules (test_kernels.py, "the simulator's rules").
// Warp 1 returns before the barriers: the other warps must not wait for it (Volta and later).
__global__ void barrier_after_early_return(int* out) {
  if (threadIdx.x / kWarpSize == 1) return;
  EVOPRUNE_SHARED(int, total);
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) total += 1;  // one writer at a time: fibers never interleave here
  __syncthreads();
  out[threadIdx.x] = total;
}

// Lanes 0-15 and 16-31 call different shuffles: undefined on a GPU, an error here.
__global__ void divergent_shuffles(int* out) {
  const int lane = threadIdx.x % kWarpSize;
  out[threadIdx.x] = lane < 16 ? __shfl_sync(kFullMask, lane, 0) : __shfl_xor_sync(kFullMask, lane, 1);
}

// Lane 0 returns, then the others shuffle with a full mask: a hang on a GPU, an error here.
__global__ void shuffle_after_early_return(int* out) {
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) return;
  out[threadIdx.x] = __shfl_down_sync(kFullMask, lane, 1);
}

// Runs one of the probes on a block of 96 threads; returns what each thread wrote (-1: nothing).
std::vector<int64_t> probe(const std::string& name) {
  std::vector<int> out(96, -1);
  sim::settings().max_dynamic_shared = 0;
  const auto kernel = name == "barrier_after_early_return" ? barrier_after_early_return
                      : name == "divergent_shuffles"       ? divergent_shuffles
                      : name == "shuffle_after_early_return"
                          ? shuffle_after_early_return
                          : nullptr;
  TORCH_CHECK(kernel != nullptr, "unknown probe ", name);
  sim::launch(dim3(1), dim3(96), 0, kernel, out.data());
  return std::vector<int64_t>(out.begin(), out.end());
}

}  // namespace

TORCH_LIBRARY(evoprune_sim, m) {
  m.def("probe(str name) -> int[]", &probe);
  m.def("configure(int order_seed, str skip_barrier_file, int skip_barrier_line, str drop_shuffle_file, "
        "int drop_shuffle_line, int drop_shuffle_warp) -> ()", &configure);
  m.def("counters() -> int[]", &counters);
  m.def("first_assert() -> str", &first_assert);
  m.def("select(Tensor metric, Tensor? importance, int keep, float alpha, int protect, int matrix, bool allow_tf32, "
        "int optin_shared, int budget) -> (Tensor, Tensor, int[])", &select);
  m.def("merge(Tensor tokens, Tensor? sizes, Tensor index, Tensor slot, bool merge) -> (Tensor, Tensor)", &merge);
  m.def("importance(Tensor attn, int sms) -> (Tensor, int[])", &importance);
}

}  // namespace evoprune::cuda
