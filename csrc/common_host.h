// Host-only helpers shared by every op's CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>

// x86-64 CPU kernels may carry AVX2 variants (function-level target attributes), picked at
// run time by cpu_has_avx2(), so the extension still loads on CPUs without AVX2.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define SEGKERNELS_CPU_AVX2 1
#include <immintrin.h>
#else
#define SEGKERNELS_CPU_AVX2 0
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace segkernels {

#ifdef SEGKERNELS_BUILD_TESTING
// Testing builds only (csrc/testing.cpp): the test suite turns this on to fill every freshly
// allocated op output with NaN (floating) or all-ones bits (integer), so that an element a
// kernel forgets to write cannot pass for a plausible value such as 0.
std::atomic<bool>& poison_outputs_flag();
#endif

// Large CPU outputs are written once, right after allocation, so first-touch page faults on
// 4 KiB pages can cost as much as the kernel itself (a fresh 40 MB gradient takes ~10k
// faults). Ask for transparent huge pages on them before anything touches them: a hint, with
// no effect where THP is off or the pages are already mapped.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (!t.is_cpu()) return;
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes < 2 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (start + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// AVX2 + FMA present and not switched off: SEGKERNELS_NO_AVX2=1 forces the baseline code, read
// on every call so that a test can compare both paths in one process.
inline bool cpu_has_avx2() {
#if SEGKERNELS_CPU_AVX2
  const char* off = std::getenv("SEGKERNELS_NO_AVX2");
  if (off && off[0] == '1') return false;
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// The widest CPU code to run: AVX-512 (F) entry points where the CPU has it and
// SEGKERNELS_NO_AVX512=1 is not set, else AVX2 as cpu_has_avx2() says, else the baseline.
enum class CpuLevel { kBaseline, kAvx2, kAvx512 };

inline CpuLevel cpu_level() {
  if (!cpu_has_avx2()) return CpuLevel::kBaseline;
#if SEGKERNELS_CPU_AVX2
  const char* off = std::getenv("SEGKERNELS_NO_AVX512");
  static const bool has = __builtin_cpu_supports("avx512f");
  if (has && !(off && off[0] == '1')) return CpuLevel::kAvx512;
#endif
  return CpuLevel::kAvx2;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
#ifdef SEGKERNELS_BUILD_TESTING
  if (poison_outputs_flag().load(std::memory_order_relaxed) && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (t.scalar_type() == at::kByte)
      t.fill_(255);
    else
      t.fill_(-1);
  }
#endif
  return t;
}

}  // namespace segkernels
