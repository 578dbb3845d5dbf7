// CPU kernel body of upsample_argmax. No include guard on purpose: upsample_argmax_cpu.cpp
// builds this file once per instruction set (cpu_isa_builds.h) and picks one at run time. AxisTable comes from the .cpp.

#include "cpu_convert.h"  // load_acc: bfloat16 widened inline (c10's conversion is an out-of-line call)
#include "upsample_argmax/upsample_argmax_cpu_blend.h"  // ColumnBlendCache: the column blend

template <typename scalar_t>
void argmax_rows(const scalar_t* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, int64_t C, int64_t h, int64_t w,
                 int64_t Ho, int64_t Wo, const AxisTable<at::opmath_type<scalar_t>>& ty,
                 const AxisTable<at::opmath_type<scalar_t>>& tx, int64_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> best(Wo);
  std::vector<int32_t> col0(Wo), col1(Wo), best_c(Wo);  // int32 classes: twice the vector lanes of int64
  for (int64_t X = 0; X < Wo; ++X) {
    col0[X] = static_cast<int32_t>(tx.i0[X]);
    col1[X] = static_cast<int32_t>(tx.i1[X]);
  }
  ColumnBlendCache<scalar_t, acc_t> cache(x, sN, sC, sH, sW, C, h, w, Wo, col0.data(), col1.data(), tx.w0.data(),
                                          tx.w1.data());
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / Ho, Y = r - n * Ho;
    const acc_t wy0 = ty.w0[Y], wy1 = ty.w1[Y];
    const acc_t* ra = cache.get(n, ty.i0[Y], ty.i1[Y]);
    const acc_t* rb = cache.get(n, ty.i1[Y], ty.i0[Y]);
    int32_t* __restrict__ arg = best_c.data();
    acc_t* __restrict__ bp = best.data();
    for (int64_t X = 0; X < Wo; ++X) {
      bp[X] = ra[X] * wy0 + rb[X] * wy1;
      arg[X] = 0;
    }
    for (int64_t c = 1; c < C; ++c) {
      const acc_t* __restrict__ a = ra + c * Wo;
      const acc_t* __restrict__ b = rb + c * Wo;
      for (int64_t X = 0; X < Wo; ++X) {
        const acc_t v = a[X] * wy0 + b[X] * wy1;
        const bool take = confusion_matrix::argmax_takes(v, bp[X]);
        bp[X] = take ? v : bp[X];
        arg[X] = take ? static_cast<int32_t>(c) : arg[X];
      }
    }
    int64_t* __restrict__ dst = out + r * Wo;
    for (int64_t X = 0; X < Wo; ++X) dst[X] = arg[X];
  }
}

