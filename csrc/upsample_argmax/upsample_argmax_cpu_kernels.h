// CPU kernel body of upsample_argmax. No include guard on purpose: upsample_argmax_cpu.cpp
// includes this file into namespaces `generic`, `avx2` and `avx512`, each under its own target,
// and picks one at run time. AxisTable comes from the .cpp.

#include "cpu_convert.h"  // load_acc: bfloat16 widened inline (c10's conversion is an out-of-line call)

template <typename scalar_t>
void argmax_rows(const scalar_t* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, int64_t C, int64_t h, int64_t w,
                 int64_t Ho, int64_t Wo, const AxisTable<at::opmath_type<scalar_t>>& ty,
                 const AxisTable<at::opmath_type<scalar_t>>& tx, int64_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> best(Wo), lowres(w), slots(2 * C * Wo);
  std::vector<int32_t> col0(Wo), col1(Wo), best_c(Wo);  // int32 classes: twice the vector lanes of int64
  for (int64_t X = 0; X < Wo; ++X) {
    col0[X] = static_cast<int32_t>(tx.i0[X]);
    col1[X] = static_cast<int32_t>(tx.i1[X]);
  }
  int64_t tag[2] = {-1, -1};
  // Input row y of image n blended along the columns, every class: slot[c * Wo + X].
  const auto row_of = [&](int64_t n, int64_t y, int64_t keep) -> const acc_t* {
    const int64_t key = n * h + y, keep_key = n * h + keep;
    for (int k = 0; k < 2; ++k)
      if (tag[k] == key) return slots.data() + k * C * Wo;
    const int k = tag[0] == keep_key ? 1 : 0;
    acc_t* dst = slots.data() + k * C * Wo;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = x + n * sN + c * sC + y * sH;
      for (int64_t i = 0; i < w; ++i) lowres[i] = load_acc(src[i * sW]);
      const acc_t* __restrict__ lr = lowres.data();
      const acc_t* __restrict__ w0 = tx.w0.data();
      const acc_t* __restrict__ w1 = tx.w1.data();
      acc_t* __restrict__ o = dst + c * Wo;
      for (int64_t X = 0; X < Wo; ++X) o[X] = lr[col0[X]] * w0[X] + lr[col1[X]] * w1[X];
    }
    tag[k] = key;
    return dst;
  };
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / Ho, Y = r - n * Ho;
    const acc_t wy0 = ty.w0[Y], wy1 = ty.w1[Y];
    const acc_t* ra = row_of(n, ty.i0[Y], ty.i1[Y]);
    const acc_t* rb = row_of(n, ty.i1[Y], ty.i0[Y]);
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

