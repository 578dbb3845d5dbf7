// Shared by every op: host/device qualifiers and small helpers that CPU and CUDA code both use.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace segkernels {

// Floor division for possibly negative numerators (C++ '/' truncates toward zero).
SK_HD int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (q * b != a && ((a < 0) != (b < 0))) ? q - 1 : q;
}

SK_HD int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// Division of 0 <= n < 2^31 by a divisor 1 <= d < 2^31 fixed at launch, as a multiply-high, an
// add and a shift (Granlund and Montgomery, "Division by invariant integers using
// multiplication", 1994): on a GPU a 32-bit division by a run-time value is a sequence of about
// twenty instructions, and the per-element index math of a memory-bound kernel is mostly
// divisions. With s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1,
// floor(n / d) = (floor(n m / 2^32) + n) >> s; n < 2^31 keeps the sum within 32 bits.
struct FastDivider {
  int32_t divisor;
  uint32_t magic;
  uint32_t shift;

  FastDivider() = default;
  // Host only; d must lie in [1, 2^31) (d = 0 would divide by zero here).
  explicit FastDivider(int32_t d) : divisor(d), magic(0), shift(0) {
    while ((uint64_t{1} << shift) < static_cast<uint64_t>(d)) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - static_cast<uint64_t>(d))) /
                                      static_cast<uint64_t>(d) +
                                  1);
  }

  SK_HD int32_t div(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t high = __umulhi(u, magic);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(u) * magic) >> 32);
#endif
    return static_cast<int32_t>((high + u) >> shift);
  }
};

// Plain division, for the 64-bit instantiations of kernels that use FastDivider in 32 bits.
template <typename I>
struct PlainDivider {
  I divisor;

  PlainDivider() = default;
  explicit PlainDivider(I d) : divisor(d) {}

  SK_HD I div(I n) const { return n / divisor; }
};

// The divider a kernel with index arithmetic type I uses.
template <typename I>
struct DividerFor {
  using type = PlainDivider<I>;
};
template <>
struct DividerFor<int32_t> {
  using type = FastDivider;
};

}  // namespace segkernels
