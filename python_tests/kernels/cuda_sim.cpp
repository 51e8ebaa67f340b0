// The scheduler of cuda_sim.h: fibers for the threads of one block, barriers, warp collectives.
#include "cuda_sim.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>

// Fiber switch (x86-64 System V): saves the callee-saved registers, the SSE control/status word
// and the x87 control word on the current stack, stores the stack pointer in *save, and resumes
// the fiber whose stack pointer is `resume`. glibc's swapcontext does the same plus a signal-mask
// system call per switch, which made the greedy's millions of warp collectives ten times slower.
#if !defined(__x86_64__)
#error "cuda_sim.cpp switches fibers with x86-64 assembly"
#endif
extern "C" void evoprune_sim_switch(void** save, void* resume);
asm(R"(
  .text
  .globl evoprune_sim_switch
  .type evoprune_sim_switch, @function
evoprune_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size evoprune_sim_switch, .-evoprune_sim_switch
)");

namespace evoprune::sim {
namespace {

constexpr int kWarpSize = 32;
// The kernels keep a few scalars and small arrays per thread; 64 KiB leaves room for -O0 builds.
constexpr size_t kStackBytes = size_t(64) << 10;

enum class State { kRunnable, kAtBarrier, kAtShuffle, kDone };

struct Thread {
  void* sp = nullptr;  // saved stack pointer while switched out
  std::vector<char> stack;
  State state = State::kDone;  // change it with set_state only
  int rank = 0;                 // position in the block's thread order
  ThreadCoordinates where;
  int warp = 0, lane = 0;
};

// One warp collective in progress: what each arrived lane brought and asked for.
struct Collective {
  unsigned arrived = 0;
  unsigned mask = 0;
  ShuffleKind kind = ShuffleKind::kIndexed;
  const char* file = nullptr;
  int line = 0;
  uint64_t value[kWarpSize];
  int source[kWarpSize];
  uint64_t result[kWarpSize];
};

struct Block {
  std::vector<Thread> threads;
  std::vector<Collective> warps;
  std::vector<int> order;       // thread ids by rank
  std::vector<uint64_t> ready;  // bit r: the thread of rank r is runnable
  std::vector<unsigned char> shared;
  // Static shared variables of the running block, by declaration site.
  std::map<std::pair<const char*, int>, std::vector<unsigned char>> static_shared;
  void* scheduler = nullptr;  // the scheduler's saved stack pointer while a thread runs
  Thread* current = nullptr;
  void (*entry)(void*) = nullptr;
  void* body = nullptr;
  bool running = false;
  std::string error;  // set by a thread that broke CUDA's rules; the launch then throws it
};

Block& block_state() {
  static Block block;
  return block;
}

void set_state(Thread& t, State state) {
  uint64_t& word = block_state().ready[t.rank / 64];
  const uint64_t bit = uint64_t(1) << (t.rank % 64);
  word = state == State::kRunnable ? word | bit : word & ~bit;
  t.state = state;
}

// The runnable thread of lowest rank, or nullptr.
Thread* next_runnable(Block& b) {
  for (size_t w = 0; w < b.ready.size(); ++w) {
    if (b.ready[w] != 0) return &b.threads[b.order[w * 64 + __builtin_ctzll(b.ready[w])]];
  }
  return nullptr;
}

const char* basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash == nullptr ? path : slash + 1;
}

std::string site(const char* file, int line) { return std::string(basename(file)) + ":" + std::to_string(line); }

bool matches(const std::string& file, int line, const char* at_file, int at_line) {
  return !file.empty() && line == at_line && file == basename(at_file);
}

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("cuda_sim: " + what); }

// A thread broke CUDA's rules: abandon the block (an exception cannot cross fiber stacks) and let
// the scheduler throw. The fiber is never resumed; its frames hold no resources.
[[noreturn]] void fail_in_kernel(const std::string& what);

Thread& self() {
  Block& b = block_state();
  if (!b.running || b.current == nullptr) fail("a CUDA built-in was used outside a kernel");
  return *b.current;
}

// Gives control back to the scheduler until this thread is runnable again.
void yield_to_scheduler(Thread& t) {
  evoprune_sim_switch(&t.sp, block_state().scheduler);
}

[[noreturn]] void fail_in_kernel(const std::string& what) {
  Block& b = block_state();
  b.error = what;
  Thread& t = *b.current;
  set_state(t, State::kDone);
  evoprune_sim_switch(&t.sp, b.scheduler);
  std::abort();  // a finished thread is never resumed
}

// First frame of every fiber (entered by the `ret` of evoprune_sim_switch, aligned as a call).
void thread_main() {
  Block& b = block_state();
  b.entry(b.body);
  Thread& t = *b.current;
  set_state(t, State::kDone);
  evoprune_sim_switch(&t.sp, b.scheduler);
  std::abort();  // a finished thread is never resumed
}

// A fresh stack that evoprune_sim_switch "returns" into thread_main with: the floating-point
// control words, six zeroed callee-saved registers, the return address; aligned like a call site.
void* fresh_stack(std::vector<char>& stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top) - 2;  // return address at a 16-byte boundary
  slot[0] = reinterpret_cast<uint64_t>(&thread_main);
  slot[1] = 0;
  uint64_t* sp = slot - 7;
  for (int i = 1; i < 7; ++i) sp[i] = 0;
  // The launching thread's rounding and denormal modes, so that kernels compute as host code would.
  const uint32_t mxcsr = __builtin_ia32_stmxcsr();
  uint16_t x87 = 0;
  asm volatile("fnstcw %0" : "=m"(x87));
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &x87, 2);
  return sp;
}

std::vector<int> thread_order(int threads, uint64_t seed) {
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  if (seed == 1) std::reverse(order.begin(), order.end());
  if (seed > 1) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  return order;
}

// Always resumes the runnable thread of lowest rank: a warp runs until all its lanes wait at a
// block barrier (or finished) before a warp of higher rank moves, so whatever a missing barrier
// should have waited for has not happened yet.
void run_block(Block& b) {
  for (;;) {
    if (Thread* t = next_runnable(b)) {
      b.current = t;
      evoprune_sim_switch(&b.scheduler, t->sp);
      b.current = nullptr;
      if (!b.error.empty()) fail(std::exchange(b.error, std::string()));
      continue;
    }
    int live = 0, waiting = 0;
    for (const Thread& t : b.threads) {
      live += t.state != State::kDone;
      waiting += t.state == State::kAtBarrier;
    }
    if (live == 0) return;
    if (waiting < live) {
      fail("deadlock: " + std::to_string(live - waiting) +
           " threads wait in a warp collective whose other lanes wait at a barrier or have returned");
    }
    for (Thread& t : b.threads) {
      if (t.state == State::kAtBarrier) set_state(t, State::kRunnable);
    }
  }
}

}  // namespace

const ThreadCoordinates& coordinates() { return self().where; }

Settings& settings() {
  static Settings s;
  return s;
}

Counters& counters() {
  static Counters c;
  return c;
}

void syncthreads(const char* file, int line) {
  Thread& t = self();
  if (matches(settings().skip_barrier_file, settings().skip_barrier_line, file, line)) {
    ++counters().skipped_barriers;
    return;
  }
  ++counters().barriers;
  set_state(t, State::kAtBarrier);
  yield_to_scheduler(t);
}

void device_assert(bool ok, const char* message, const char* file, int line) {
  if (ok) return;
  Counters& c = counters();
  if (c.failed_asserts++ == 0) c.first_assert = site(file, line) + ": " + message;
}

void* dynamic_shared() {
  Block& b = block_state();
  return b.shared.empty() ? nullptr : b.shared.data();
}

void* static_shared(const char* file, int line, size_t bytes) {
  Block& b = block_state();
  std::vector<unsigned char>& variable = b.static_shared[{file, line}];
  if (variable.empty()) variable.assign(bytes, 0xff);
  return variable.data();
}

uint64_t shuffle(unsigned mask, uint64_t bits, ShuffleKind kind, int arg, const char* file, int line) {
  Thread& t = self();
  Block& b = block_state();
  ++counters().shuffles;
  const unsigned me = 1u << t.lane;
  if ((mask & me) == 0) fail_in_kernel(site(file, line) + ": lane not in its shuffle's mask");
  int source = t.lane;
  switch (kind) {
    case ShuffleKind::kIndexed: source = arg % kWarpSize; break;
    case ShuffleKind::kUp: source = t.lane - arg >= 0 ? t.lane - arg : t.lane; break;
    case ShuffleKind::kDown: source = t.lane + arg < kWarpSize ? t.lane + arg : t.lane; break;
    case ShuffleKind::kXor: source = (t.lane ^ arg) < kWarpSize ? t.lane ^ arg : t.lane; break;
  }
  if (matches(settings().drop_shuffle_file, settings().drop_shuffle_line, file, line) &&
      t.warp == settings().drop_shuffle_warp) {
    ++counters().dropped_shuffles;
    source = t.lane;
  }
  Collective& c = b.warps[t.warp];
  if (c.arrived == 0) {
    c.mask = mask;
    c.kind = kind;
    c.file = file;
    c.line = line;
  } else if (c.mask != mask || c.kind != kind || c.line != line || std::strcmp(c.file, file) != 0) {
    fail_in_kernel(site(file, line) + ": lanes of one warp meet in different shuffles (" + site(c.file, c.line) + ")");
  }
  c.value[t.lane] = bits;
  c.source[t.lane] = source;
  c.arrived |= me;
  if (c.arrived != mask) {
    const int first = t.warp * kWarpSize;
    for (int l = 0; l < kWarpSize; ++l) {
      const bool needed = (mask >> l) & 1u;
      if (needed && (first + l >= int(b.threads.size()) || b.threads[first + l].state == State::kDone)) {
        fail_in_kernel(site(file, line) + ": shuffle names lane " + std::to_string(l) + ", which has returned");
      }
    }
    set_state(t, State::kAtShuffle);
    yield_to_scheduler(t);
    return c.result[t.lane];
  }
  // Last lane in: everyone's result, read from lanes of the mask only (others give the caller's own).
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const int s = c.source[l];
    c.result[l] = ((mask >> s) & 1u) ? c.value[s] : c.value[l];
    Thread& lane = b.threads[t.warp * kWarpSize + l];
    if (lane.state == State::kAtShuffle) set_state(lane, State::kRunnable);
  }
  c.arrived = 0;
  return c.result[t.lane];
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*entry)(void*), void* body) {
  Block& b = block_state();
  if (b.running) fail("a kernel launched another kernel");
  const int threads = int(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024) fail("block of " + std::to_string(threads) + " threads (CUDA allows 1..1024)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    fail("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
         ") is outside CUDA's limits");
  }
  if (int64_t(dynamic_shared_bytes) > settings().max_dynamic_shared) {
    fail("launch asks for " + std::to_string(dynamic_shared_bytes) + " B of dynamic shared memory, the device allows " +
         std::to_string(settings().max_dynamic_shared));
  }
  ++counters().launches;
  b.threads.resize(threads);
  b.warps.assign((threads + kWarpSize - 1) / kWarpSize, Collective{});
  b.order = thread_order(threads, settings().order_seed);
  b.ready.assign((threads + 63) / 64, 0);
  for (int r = 0; r < threads; ++r) b.threads[b.order[r]].rank = r;
  b.entry = entry;
  b.body = body;
  b.running = true;
  struct Stop {
    Block& b;
    ~Stop() { b.running = false; }
  } stop{b};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        ++counters().blocks;
        // Shared memory starts as garbage on a GPU: NaN-like bytes make a read before write visible.
        b.shared.assign(dynamic_shared_bytes, 0xff);
        b.static_shared.clear();
        for (int i = 0; i < threads; ++i) {
          Thread& t = b.threads[i];
          if (t.stack.empty()) t.stack.resize(kStackBytes);
          const unsigned id = static_cast<unsigned>(i);
          t.where.thread = uint3{id % block.x, (id / block.x) % block.y, id / (block.x * block.y)};
          t.where.block = uint3{x, y, z};
          t.where.block_dim = block;
          t.where.grid_dim = grid;
          t.warp = i / kWarpSize;
          t.lane = i % kWarpSize;
          set_state(t, State::kRunnable);
          t.sp = fresh_stack(t.stack);
        }
        run_block(b);
      }
    }
  }
}

}  // namespace evoprune::sim
