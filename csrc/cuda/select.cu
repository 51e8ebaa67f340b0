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
//    device's opt-in limit less the kernel's static shared memory, in a global workspace otherwise. Each step is one pass over the tokens
//    that folds the previous pick into red/owner and scores the candidates, then a block-wide argmax
//    on (score, index) with math.h's `beats` (lowest index wins ties), exactly the CPU's pass. The
//    picks are then ranked with a block scan to give index (ascending) and slot.
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
#include <cub/block/block_scan.cuh>
#include <mutex>

#include "../checks.h"
#include "../composite.h"
#include "../math.h"
#include "kernels.cuh"

namespace evoprune::cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Threads of a greedy block: 16 warps hide the latency of one pass over N <= a few thousand tokens.
constexpr int kGreedyThreads = 512;
constexpr int kGreedyWarps = kGreedyThreads / kWarpSize;
constexpr int kUnitWarpsPerBlock = 8;
// Largest similarity matrices one launch may allocate, all samples of the group together
// (256 MiB: 16 samples at N = 2048, 4 at N = 4096, none at N >= 8192 in float32).
constexpr int64_t kSimilarityBudgetBytes = int64_t(256) << 20;
// The GEMM pays off once the greedy reads at least one similarity column in this many (as on CPU).
constexpr int64_t kColumnsPerGemmColumn = 16;
// owner[j] values besides the index of the pick that owns j.
constexpr int32_t kNoOwner = -1;
constexpr int32_t kPicked = -2;  // after ranking, a pick at output position p holds kPicked - p

__device__ __forceinline__ int64_t decode_position(int32_t code) { return int64_t(kPicked) - code; }

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  // Butterfly: every lane adds the same pairs (a + b == b + a), so all lanes end bit-identical.
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

template <typename acc_t>
struct Candidate {
  acc_t score;
  int64_t index;  // -1: none
};

template <typename acc_t>
__device__ __forceinline__ Candidate<acc_t> better_of(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return beats(a.score, a.index, b.score, b.index) ? a : b;
}

// `beats` is a strict total order on candidates (score, then lower index; "none" last), so any
// reduction tree finds the same winner as the CPU's sequential scan.
template <typename acc_t>
__device__ __forceinline__ Candidate<acc_t> warp_best(Candidate<acc_t> c) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate<acc_t> other{
        __shfl_down_sync(kFullMask, c.score, offset),
        static_cast<int64_t>(__shfl_down_sync(kFullMask, static_cast<long long>(c.index), offset))};
    c = better_of(c, other);
  }
  return c;  // lane 0 holds the warp's best
}

template <typename acc_t>
struct ArgmaxStorage {
  Candidate<acc_t> warps[kGreedyWarps];
  Candidate<acc_t> best;
};

// Block-wide argmax; every thread must call it. Two barriers: the warps' results are complete
// before warp 0 reads them, and the broadcast is complete before anyone reads it. The next call
// cannot overwrite `best` before all threads read it: that write follows the next call's first barrier.
template <typename acc_t>
__device__ Candidate<acc_t> block_best(Candidate<acc_t> c, ArgmaxStorage<acc_t>& storage) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  c = warp_best(c);
  if (lane == 0) storage.warps[warp] = c;
  __syncthreads();
  if (warp == 0) {
    c = lane < kGreedyWarps ? storage.warps[lane] : Candidate<acc_t>{minus_infinity<acc_t>(), -1};
    c = warp_best(c);
    if (lane == 0) storage.best = c;
  }
  __syncthreads();
  return storage.best;
}

// Grid: ceil(B*N / kUnitWarpsPerBlock) blocks of kUnitWarpsPerBlock warps; warp per token.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kUnitWarpsPerBlock* kWarpSize)
    unit_vectors(const scalar_t* __restrict__ metric, int64_t tokens, int64_t n, int64_t dm, int64_t sb,
                 int64_t sn, int64_t sd, acc_t* __restrict__ unit) {
  const int64_t token = int64_t(blockIdx.x) * kUnitWarpsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (token >= tokens) return;  // warp-uniform: the shuffles below see full warps
  const scalar_t* row = metric + (token / n) * sb + (token % n) * sn;
  double squared_norm = 0;
  for (int64_t d = lane; d < dm; d += kWarpSize) {
    const double v = static_cast<double>(row[d * sd]);
    squared_norm += v * v;
  }
  const double divisor = unit_divisor(warp_sum(squared_norm));
  acc_t* out = unit + token * dm;
  for (int64_t d = lane; d < dm; d += kWarpSize) {
    out[d] = static_cast<acc_t>(static_cast<double>(row[d * sd]) / divisor);
  }
}

// Pointers of one launch, already offset to its first sample; per-sample offsets use blockIdx.x.
template <typename acc_t>
struct GreedyArgs {
  const acc_t* unit;        // [B,N,Dm] contiguous
  const acc_t* similarity;  // [B,N,N] contiguous (matrix path only)
  const acc_t* importance;  // [B,N] contiguous, or nullptr: ti = 0
  acc_t* red;               // [B,N] workspace, or nullptr: red/owner live in dynamic shared memory
  int32_t* owner;           // [B,N] workspace, or nullptr
  int64_t* index;           // [B,keep]
  int64_t* slot;            // [B,N]
  int64_t n, dm, keep, protect;
  acc_t alpha;
};

// Grid: one block of kGreedyThreads per sample. Dynamic shared memory: N*(sizeof(acc_t)+4)
// bytes, or 0 with the global workspace. State of token j (red[j], owner[j]) is read and
// written during the greedy by one thread only, its "state thread": thread (j-P) % 512 in the
// matrix path, lane 0 of warp (j-P) % 16 in the dot-product path; so the greedy needs no
// barrier besides the argmax's.
template <typename acc_t, bool kMatrix>
__global__ void __launch_bounds__(kGreedyThreads) greedy_select(const GreedyArgs<acc_t> args) {
  extern __shared__ __align__(16) unsigned char state_memory[];
  __shared__ ArgmaxStorage<acc_t> argmax;
  using BlockScan = cub::BlockScan<int, kGreedyThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;

  const int64_t b = blockIdx.x, n = args.n, dm = args.dm, protect = args.protect, picks = args.keep - protect;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  acc_t* red = args.red == nullptr ? reinterpret_cast<acc_t*>(state_memory) : args.red + b * n;
  int32_t* owner = args.red == nullptr ? reinterpret_cast<int32_t*>(red + n) : args.owner + b * n;
  const acc_t* unit = args.unit + b * n * dm;
  const acc_t* similarity = kMatrix ? args.similarity + b * n * n : nullptr;
  const acc_t* importance = args.importance == nullptr ? nullptr : args.importance + b * n;
  int64_t* index = args.index + b * args.keep;
  int64_t* slot = args.slot + b * n;

  for (int64_t j = protect + threadIdx.x; j < n; j += kGreedyThreads) {
    red[j] = acc_t(-1);
    owner[j] = kNoOwner;
  }
  // The largest finite candidate importance (section 1); none: 0, so that ti = 0.
  acc_t max_importance = 0;
  if (importance != nullptr) {
    Candidate<acc_t> local{minus_infinity<acc_t>(), -1};
    for (int64_t j = protect + threadIdx.x; j < n; j += kGreedyThreads) {
      if (is_finite(importance[j])) local = better_of(Candidate<acc_t>{importance[j], j}, local);
    }
    const Candidate<acc_t> largest = block_best(local, argmax);
    if (largest.index >= 0) max_importance = largest.score;
  }
  __syncthreads();  // the state is initialized by other threads than its state threads

  auto ti = [&](int64_t j) {
    return importance == nullptr ? acc_t(0) : normalized_importance(importance[j], max_importance);
  };
  // One greedy pass (the CPU's `pass`): mark `pick` (if any) as picked, fold it into red/owner of
  // the other available tokens, and return this thread's best available candidate if `score`.
  auto pass = [&](int64_t pick, bool score) {
    Candidate<acc_t> best{minus_infinity<acc_t>(), -1};
    if constexpr (kMatrix) {
      // sim is symmetric up to rounding; the pick's row is contiguous, as on CPU.
      const acc_t* pick_row = pick < 0 ? nullptr : similarity + pick * n;
      for (int64_t j = protect + threadIdx.x; j < n; j += kGreedyThreads) {
        if (owner[j] == kPicked) continue;
        if (j == pick) {
          owner[j] = kPicked;
          continue;
        }
        if (pick >= 0) {
          const acc_t s = pick_row[j];
          if (takes_ownership(s, red[j], owner[j] != kNoOwner)) {
            red[j] = s;
            owner[j] = static_cast<int32_t>(pick);
          }
        }
        if (score) {
          const acc_t value = greedy_score(args.alpha, ti(j), red[j]);
          if (beats(value, j, best.score, best.index)) best = {value, j};
        }
      }
    } else {
      const acc_t* pick_unit = pick < 0 ? nullptr : unit + pick * dm;
      for (int64_t j = protect + warp; j < n; j += kGreedyWarps) {  // warp-uniform loop
        const int32_t state = __shfl_sync(kFullMask, lane == 0 ? owner[j] : 0, 0);
        if (state == kPicked) continue;
        if (j == pick) {
          if (lane == 0) owner[j] = kPicked;
          continue;
        }
        if (pick >= 0) {  // not pick_unit != nullptr: an empty metric (Dm = 0) has no data pointer
          const acc_t* u = unit + j * dm;
          acc_t partial = 0;
          for (int64_t d = lane; d < dm; d += kWarpSize) partial += u[d] * pick_unit[d];
          const acc_t s = warp_sum(partial);
          if (lane == 0 && takes_ownership(s, red[j], owner[j] != kNoOwner)) {
            red[j] = s;
            owner[j] = static_cast<int32_t>(pick);
          }
        }
        if (score && lane == 0) {
          const acc_t value = greedy_score(args.alpha, ti(j), red[j]);
          if (beats(value, j, best.score, best.index)) best = {value, j};
        }
      }
    }
    return best;
  };

  // K' steps; each pick exists: picks <= N - P candidates, all available at the start.
  int64_t pick = -1;
  for (int64_t step = 0; step < picks; ++step) pick = block_best(pass(pick, true), argmax).index;
  if (picks > 0) pass(pick, false);  // fold the last pick
  __syncthreads();

  // Rank the picks in token order: position P + (picks before j). Chunks of kGreedyThreads tokens,
  // each an exclusive block scan; a thread only rewrites owner[] of its own token in its chunk.
  int64_t offset = protect;
  for (int64_t base = protect; base < n; base += kGreedyThreads) {
    const int64_t j = base + threadIdx.x;
    const int picked = (j < n && owner[j] == kPicked) ? 1 : 0;
    int rank = 0, chunk_picks = 0;
    BlockScan(scan_storage).ExclusiveSum(picked, rank, chunk_picks);
    if (picked) {
      const int64_t position = offset + rank;
      owner[j] = static_cast<int32_t>(kPicked - position);
      index[position] = j;
    }
    offset += chunk_picks;
    __syncthreads();  // scan_storage is reused by the next chunk
  }
  for (int64_t p = threadIdx.x; p < protect; p += kGreedyThreads) index[p] = p;

  // slot (section 4): own position if kept, the owner's position if owned, else -1. Owners are picks.
  for (int64_t j = threadIdx.x; j < n; j += kGreedyThreads) {
    int64_t position = j;
    if (j >= protect) {
      const int32_t code = owner[j];
      position = code <= kPicked ? decode_position(code) : (code >= 0 ? decode_position(owner[code]) : -1);
    }
    slot[j] = position;
  }
}

bool use_similarity_matrix(int64_t n, int64_t picks, size_t acc_bytes) {
  // at::NoTF32Guard keeps cuBLAS in float32, but cuBLASLt and TunableOp follow the process-wide
  // setting: while it allows TF32 (torch.backends.cuda.matmul.allow_tf32, or
  // set_float32_matmul_precision("high")), a GEMM could round the similarities to about 1e-3, so
  // the greedy computes its dot products itself. Reading the flag is race-free; writing it is not.
  if (at::globalContext().allowTF32CuBLAS()) return false;
  // n <= 2^16 first, so that n * n * acc_bytes cannot overflow.
  return picks > 0 && n <= (int64_t(1) << 16) && n * n * int64_t(acc_bytes) <= kSimilarityBudgetBytes &&
         picks * kColumnsPerGemmColumn >= n;
}

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

  at::Tensor unit = at::empty({batch, n, dm}, acc_options);
  const int64_t tokens = batch * n;
  if (tokens > 0) {
    const int64_t blocks = (tokens + kUnitWarpsPerBlock - 1) / kUnitWarpsPerBlock;
    unit_vectors<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kUnitWarpsPerBlock * kWarpSize, 0, stream>>>(
        metric.const_data_ptr<scalar_t>(), tokens, n, dm, metric.stride(0), metric.stride(1), metric.stride(2),
        unit.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const bool matrix = use_similarity_matrix(n, picks, sizeof(acc_t));
  const int64_t state_bytes = n * int64_t(sizeof(acc_t) + sizeof(int32_t));
  const int64_t shared_limit = matrix ? dynamic_shared_limit<&greedy_select<acc_t, true>>()
                                      : dynamic_shared_limit<&greedy_select<acc_t, false>>();
  const bool shared_state = state_bytes <= shared_limit;
  at::Tensor red, owner;
  if (!shared_state) {
    red = at::empty({batch, n}, acc_options);
    owner = at::empty({batch, n}, metric.options().dtype(at::kInt));
  }
  const int64_t group =
      matrix ? std::max<int64_t>(1, kSimilarityBudgetBytes / (n * n * int64_t(sizeof(acc_t)))) : batch;
  const size_t dynamic_shared = shared_state ? static_cast<size_t>(state_bytes) : 0;
  const auto kernel = matrix ? greedy_select<acc_t, true> : greedy_select<acc_t, false>;

  for (int64_t b0 = 0; b0 < batch; b0 += group) {
    const int64_t samples = std::min(group, batch - b0);
    at::Tensor similarity;
    if (matrix) {
      const at::NoTF32Guard float32_products;  // cuBLAS; cuBLASLt and TunableOp: see use_similarity_matrix
      const at::Tensor u = unit.narrow(0, b0, samples);
      similarity = at::bmm(u, u.transpose(1, 2));
    }
    GreedyArgs<acc_t> args{};
    args.unit = unit.const_data_ptr<acc_t>() + b0 * n * dm;
    args.similarity = matrix ? similarity.const_data_ptr<acc_t>() : nullptr;
    args.importance = importance.defined() ? importance.const_data_ptr<acc_t>() + b0 * n : nullptr;
    args.red = shared_state ? nullptr : red.mutable_data_ptr<acc_t>() + b0 * n;
    args.owner = shared_state ? nullptr : owner.mutable_data_ptr<int32_t>() + b0 * n;
    args.index = index.mutable_data_ptr<int64_t>() + b0 * keep;
    args.slot = slot.mutable_data_ptr<int64_t>() + b0 * n;
    args.n = n;
    args.dm = dm;
    args.keep = keep;
    args.protect = protect;
    args.alpha = static_cast<acc_t>(alpha);
    kernel<<<static_cast<unsigned>(samples), kGreedyThreads, dynamic_shared, stream>>>(args);
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
