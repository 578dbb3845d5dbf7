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

}  // namespace segkernels
