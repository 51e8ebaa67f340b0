// A test-only CUDA execution model on the CPU, for running the device code of csrc/cuda/*.cuh
// without a GPU (docs/CUDA.md, "Executing the kernels on the CPU"). Never part of the package.
//
// Every CUDA thread of a block is a cooperative fiber on the calling OS thread. A thread runs
// until it reaches a block barrier, a warp collective or its end; a barrier opens when every live
// thread waits at one (threads that returned early do not count, as on Volta and later), a warp
// collective completes when every lane of its mask arrived. The scheduler always resumes the
// runnable thread that comes first in the block's thread order (natural, reversed or shuffled by a
// seed), so the first warp runs all the way to its next barrier before the next warp starts: a
// thread that reads what other warps write without a barrier in between reads garbage, and a
// missing barrier shows up as a wrong result, deterministically for a given order. Blocks run one
// at a time, in grid order; each starts with its shared memory filled with 0xff bytes (NaN, or
// -1), so a read before the block wrote it shows up too.
//
// What the model cannot show (timing, races between blocks, the memory model, real shared memory
// limits) is listed in docs/CUDA.md.
//
// Faults for the harness's self-test: a barrier call site (file:line) can be skipped, and a
// shuffle call site can return the caller's own value in one warp (that warp "drops" its shuffle).
// Device assertions are counted, not fatal, like a kernel that keeps going after the assert.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace evoprune::sim {

// The running thread's coordinates; valid inside a kernel only.
struct ThreadCoordinates {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
const ThreadCoordinates& coordinates();

// Faults and schedule of the next launches (the harness's configure op).
struct Settings {
  uint64_t order_seed = 0;  // 0: thread order 0..T-1; 1: reversed; else shuffled with this seed
  std::string skip_barrier_file;  // basename of the source file; empty: no fault
  int skip_barrier_line = 0;
  std::string drop_shuffle_file;
  int drop_shuffle_line = 0;
  int drop_shuffle_warp = 0;  // the warp (in its block) whose shuffles at that site return their own value
  int64_t max_dynamic_shared = 0;  // bytes a launch may request (the device's opt-in limit less static)
};
Settings& settings();

// What happened since the last reset (the harness returns these to Python).
struct Counters {
  int64_t launches = 0, blocks = 0, barriers = 0, skipped_barriers = 0, shuffles = 0, dropped_shuffles = 0;
  int64_t failed_asserts = 0;
  std::string first_assert;
};
Counters& counters();

void syncthreads(const char* file, int line);
void device_assert(bool ok, const char* message, const char* file, int line);
void* dynamic_shared();
// The block's instance of the static shared variable declared at file:line (EVOPRUNE_SHARED).
void* static_shared(const char* file, int line, size_t bytes);

template <typename T>
T& static_shared(const char* file, int line) {
  static_assert(std::is_trivially_default_constructible_v<T>, "shared variables have no constructor on a GPU");
  return *static_cast<T*>(static_shared(file, line, sizeof(T)));
}

enum class ShuffleKind { kIndexed, kUp, kDown, kXor };
// Exchanges 8 bytes among the lanes of `mask`; `arg` is the source lane, delta or xor mask.
uint64_t shuffle(unsigned mask, uint64_t bits, ShuffleKind kind, int arg, const char* file, int line);

template <typename T>
T shuffle_value(unsigned mask, T value, ShuffleKind kind, int arg, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle(mask, bits, kind, arg, file, line);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Runs `body` (one kernel invocation with bound arguments) as a grid of blocks of threads.
void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*entry)(void*), void* body);

// kernel<<<grid, block, shared>>>(args...) on the CPU.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*kernel)(Params...), Args&&... args) {
  auto call = [&] { kernel(args...); };
  using Call = decltype(call);
  run_grid(grid, block, dynamic_shared_bytes, [](void* c) { (*static_cast<Call*>(c))(); }, &call);
}

}  // namespace evoprune::sim

// The CUDA built-ins the kernels use, spelled as in CUDA.
#define threadIdx (::evoprune::sim::coordinates().thread)
#define blockIdx (::evoprune::sim::coordinates().block)
#define blockDim (::evoprune::sim::coordinates().block_dim)
#define gridDim (::evoprune::sim::coordinates().grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __syncthreads() ::evoprune::sim::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(mask, value, lane) \
  ::evoprune::sim::shuffle_value(mask, value, ::evoprune::sim::ShuffleKind::kIndexed, lane, __FILE__, __LINE__)
#define __shfl_up_sync(mask, value, delta) \
  ::evoprune::sim::shuffle_value(mask, value, ::evoprune::sim::ShuffleKind::kUp, delta, __FILE__, __LINE__)
#define __shfl_down_sync(mask, value, delta) \
  ::evoprune::sim::shuffle_value(mask, value, ::evoprune::sim::ShuffleKind::kDown, delta, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) \
  ::evoprune::sim::shuffle_value(mask, value, ::evoprune::sim::ShuffleKind::kXor, lane_mask, __FILE__, __LINE__)
