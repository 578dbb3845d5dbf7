// Builds of one CPU kernel header for each instruction set, picked at run time. Define
// SK_ISA_KERNELS as the header's path, then include this file once, at namespace scope: the
// header is compiled into namespace `generic` (the baseline build) and, with GCC on x86-64,
// into `avx2` and `avx512` under target pragmas. SK_ISA_DISPATCH(fn, ...) calls fn from the
// widest build the CPU runs (cpu_level(), common_host.h); it reads `scalar_t` from the caller's
// scope, and float16 stays on the baseline: its conversions are out-of-line c10 code, slow to
// call from AVX loops. No include guard on purpose: each .cpp builds its own kernels.

namespace generic {
#include SK_ISA_KERNELS
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include SK_ISA_KERNELS
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
#include SK_ISA_KERNELS
}  // namespace avx512
#pragma GCC pop_options

#define SK_ISA_DISPATCH(fn, ...)                                                                    \
  do {                                                                                              \
    const CpuLevel level = std::is_same_v<scalar_t, c10::Half> ? CpuLevel::kBaseline : cpu_level(); \
    if (level == CpuLevel::kAvx512)                                                                 \
      avx512::fn(__VA_ARGS__);                                                                      \
    else if (level == CpuLevel::kAvx2)                                                              \
      avx2::fn(__VA_ARGS__);                                                                        \
    else                                                                                            \
      generic::fn(__VA_ARGS__);                                                                     \
  } while (0)
#else
#define SK_ISA_DISPATCH(fn, ...) generic::fn(__VA_ARGS__)
#endif
#undef SK_ISA_KERNELS
