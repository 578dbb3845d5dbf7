// Per-element math of the tempered-softmax distillation losses (csrc/kd_loss), shared by the CPU
// kernels. The GPU path is a Triton kernel (segkernels/kd_loss.py) that follows the same steps.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

namespace segkernels {
namespace kd_loss {

// exp for arguments <= 0 ((x - max of the row) / T), branch-free so that loops over positions
// vectorise: Cody-Waite reduction and Cephes' degree-5 polynomial (about 1 ulp). Exactly 0 for
// x < -87 (so exp(-inf) = 0 and p = 0 stays exactly 0); NaN stays NaN.
SK_HD float exp_nonpos(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float e = y * scale;
  return x != x ? x : (x < -87.0f ? 0.0f : e);
}

SK_HD double exp_nonpos(double x) { return std::exp(x); }

// (x - m) / T for a logit x and its row's maximum m (of the raw logits), given inv_t = 1 / T.
// Exactly 0 at the maximum however the compiler contracts the arithmetic: x * inv_t - m with m
// taken over rounded products became one FMA, whose residual at the maximum overflowed exp at
// tiny temperatures. Halving first keeps x - m in range where a row spans more than the float
// range (|x|, |m| near FLT_MAX) while (x - m) / T may not overflow; halving and doubling are exact
// but for denormals, so elsewhere the result is that of (x - m) * inv_t.
template <typename acc_t>
SK_HD acc_t shifted_logit(acc_t x, acc_t m, acc_t inv_t) {
  return ((x * acc_t(0.5) - m * acc_t(0.5)) * inv_t) * acc_t(2);
}

// One position's (or one row element's) contribution to the divergence, given the teacher's
// probability pt and both log-probabilities. 0 where pt == 0 (p log p = 0, and no 0 * -inf); a
// NaN pt (a NaN teacher) passes through, as in F.kl_div, rather than reading as 0.
template <typename acc_t>
SK_HD acc_t divergence_term(acc_t pt, acc_t lpt, acc_t lps, bool kl) {
  const acc_t v = kl ? pt * (lpt - lps) : -pt * lps;
  return pt != acc_t(0) ? v : acc_t(0);
}

// The derivative of one position's (or row's) divergence with respect to the teacher's scaled
// logit x / T, given the element's teacher probability pt, both log-probabilities, and the
// position's total divergence: pt (l - total), l being the term per unit of pt (log pt - log ps
// for KL, -log ps for CE). 0 where pt == 0 (never 0 * -inf); a NaN pt passes through.
template <typename acc_t>
SK_HD acc_t teacher_gradient(acc_t pt, acc_t lpt, acc_t lps, acc_t total, bool kl) {
  const acc_t per_unit = kl ? lpt - lps : -lps;
  const acc_t v = pt * (per_unit - total);
  return pt != acc_t(0) ? v : acc_t(0);
}

}  // namespace kd_loss
}  // namespace segkernels
