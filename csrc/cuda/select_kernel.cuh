// Device code of `select` (SPEC.md sections 1-3) and its launch policy, included by select.cu
// (nvcc) and by the CPU execution model of the tests (python_tests/kernels/); no ATen here.
// The design (unit vectors, similarity matrix or in-kernel dot products, one-launch greedy, rank
// scan) is described in select.cu, which launches these kernels.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../math.h"
#include "device.cuh"

namespace evoprune::cuda {

// Threads of a greedy block: 16 warps hide the latency of one pass over N <= a few thousand tokens.
constexpr int kGreedyThreads = 512;
constexpr int kGreedyWarps = kGreedyThreads / kWarpSize;
constexpr int kUnitWarpsPerBlock = 8;
// Largest similarity matrices one launch may allocate, all samples of the group together
// (256 MiB: 16 samples at N = 2048, 4 at N = 4096, 1 at N = 8192, none above in float32).
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

// Exclusive prefix sum of `value` over the kThreads threads of a 1-D block, in thread order, and
// the block's total. Every thread must call it. One barrier: every warp's total is written before
// any thread reads them; the caller must pass a barrier before `warp_totals` is written again.
template <int kThreads>
__device__ int block_exclusive_sum(int value, int& total, int (&warp_totals)[kThreads / kWarpSize]) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  int inclusive = value;
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarpSize - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < kThreads / kWarpSize; ++w) {
    before += w < warp ? warp_totals[w] : 0;
    total += warp_totals[w];
  }
  return before + inclusive - value;
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
  EVOPRUNE_DYNAMIC_SHARED(unsigned char, state_memory);
  EVOPRUNE_SHARED(ArgmaxStorage<acc_t>, argmax);
  using ScanStorage = int[kGreedyWarps];
  EVOPRUNE_SHARED(ScanStorage, scan_storage);

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
    int chunk_picks = 0;
    const int rank = block_exclusive_sum<kGreedyThreads>(picked, chunk_picks, scan_storage);
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

// Whether the greedy reads the similarities from an N x N matrix per sample (a GEMM per group of
// samples, made by the launcher) rather than computing each step's dot products in the kernel.
// `allow_tf32`: the process lets float32 GEMMs round to TF32 (see select.cu); `budget`: the most
// bytes of similarity matrices one launch may hold.
inline bool use_similarity_matrix(int64_t n, int64_t picks, size_t acc_bytes, bool allow_tf32,
                                  int64_t budget = kSimilarityBudgetBytes) {
  if (allow_tf32) return false;
  // n <= 2^16 first, so that n * n * acc_bytes cannot overflow.
  return picks > 0 && n <= (int64_t(1) << 16) && n * n * int64_t(acc_bytes) <= budget &&
         picks * kColumnsPerGemmColumn >= n;
}

// The launches of select for one call, a plain function of the shapes and the device's limits,
// so that tests can drive every branch on the CPU (python_tests/kernels/).
struct SelectPlan {
  unsigned unit_blocks;   // blocks of unit_vectors (0: no tokens, no launch)
  bool shared_state;      // red/owner in dynamic shared memory, else in [B,N] global workspaces
  size_t dynamic_shared;  // bytes per greedy block
  int64_t group;          // samples per greedy launch: one similarity matrix each, within `budget`
};

// `shared_limit`: the dynamic shared memory the greedy kernel may take on this device.
inline SelectPlan plan_select(int64_t batch, int64_t n, size_t acc_bytes, bool matrix, int64_t shared_limit,
                              int64_t budget = kSimilarityBudgetBytes) {
  SelectPlan plan{};
  const int64_t tokens = batch * n;
  plan.unit_blocks = static_cast<unsigned>((tokens + kUnitWarpsPerBlock - 1) / kUnitWarpsPerBlock);
  const int64_t state_bytes = n * int64_t(acc_bytes + sizeof(int32_t));
  plan.shared_state = state_bytes <= shared_limit;
  plan.dynamic_shared = plan.shared_state ? static_cast<size_t>(state_bytes) : 0;
  plan.group = matrix ? std::max<int64_t>(1, budget / (n * n * int64_t(acc_bytes))) : batch;
  return plan;
}

}  // namespace evoprune::cuda
