// Scratch memory for the CPU kernels.
//
// Fresh memory from the OS costs a page fault per 4 KiB page on first touch: for an N x N
// similarity matrix that is as long as the GEMM that fills it (N = 2304: 16 ms against 7 ms), and
// threads faulting at once queue on the kernel's memory-map lock, which is what kept `select`
// from scaling over samples. So each thread keeps one buffer per use site, grown when needed, up
// to kRetainedScratchBytes (retained until the thread exits). A larger request gets memory of its
// own, freed with the caller's `fallback`, in 2 MiB-aligned blocks marked for transparent huge
// pages (on Linux), which take one fault per 2 MiB.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace evoprune::cpu {

enum class ScratchSlot { kSimilarity = 0, kMergeSums = 1, kLogits = 2 };

constexpr size_t kRetainedScratchBytes = size_t(32) << 20;

struct FreeMemory {
  void operator()(void* p) const { std::free(p); }
};
using OwnedMemory = std::unique_ptr<void, FreeMemory>;

// Room for `count` values of T on this thread, uninitialized.
template <typename T>
T* scratch(ScratchSlot slot, size_t count, OwnedMemory& fallback) {
  const size_t bytes = count * sizeof(T);
  if (bytes > kRetainedScratchBytes) {
    constexpr size_t kHugePage = size_t(2) << 20;
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    fallback.reset(std::aligned_alloc(kHugePage, rounded));
    if (!fallback) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(fallback.get(), rounded, MADV_HUGEPAGE);  // advice only: without it, 4 KiB pages
#endif
    return static_cast<T*>(fallback.get());
  }
  // 64-byte units: aligned for any vector width, whatever T is.
  struct alignas(64) Line {
    std::byte bytes[64];
  };
  thread_local std::vector<Line> buffers[3];
  std::vector<Line>& buffer = buffers[static_cast<int>(slot)];
  const size_t lines = (bytes + sizeof(Line) - 1) / sizeof(Line);
  if (buffer.size() < lines) buffer.resize(lines);
  return reinterpret_cast<T*>(buffer.data());
}

}  // namespace evoprune::cpu
