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

// The divergences, as the ops' `divergence` argument numbers them.
enum Divergence : int { kKL = 0, kCE = 1, kReverseKL = 2, kJS = 3 };

// log(1 + y) for y in [0, 1], branch-free so that it vectorises: 2 atanh(s), s = y / (2 + y) in
// [0, 1/3], by its series to s^15 (relative error below 1e-7).
SK_HD float log1p_unit(float y) {
  const float s = y / (2.0f + y);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
SK_HD double log1p_unit(double y) { return std::log1p(y); }

// log M for the generalised Jensen-Shannon divergence, M = beta p_t + (1 - beta) p_s, from the
// log-probabilities: the log-sum-exp of log beta + lpt and log(1 - beta) + lps. Finite wherever
// either is (both probabilities may underflow to 0 while their logs stay finite), -inf only
// where both are -inf; NaN passes through.
template <typename acc_t>
SK_HD acc_t js_log_mixture(acc_t lpt, acc_t lps, acc_t log_beta, acc_t log_1m_beta) {
  const acc_t a = log_beta + lpt, b = log_1m_beta + lps;
  const acc_t hi = a > b ? a : b, lo = a > b ? b : a;
  const acc_t d = lo - hi;  // <= 0; NaN where hi is -inf (both -inf) or either is NaN
  const acc_t r = hi + log1p_unit(exp_nonpos(d == d ? d : acc_t(0)));
  return (a != a || b != b) ? a + b : r;
}

// One position's (or row element's) share of a divergence and what its gradients need, for
// the divergences whose student gradient needs the position's total (reverse KL, JS):
// - term: its contribution to the divergence;
// - su: ps * u, u being d D / d ps (up to a constant that cancels), summed into U;
// - tu: pt * h, h being d D / d pt (JS's), summed into the teacher's total.
// The student gradient by the logit / T is ps (u - U); the teacher's pt (h - U_t) (JS) or pt - ps
// (reverse KL). Every product with a zero probability is 0, never 0 * -inf.
template <typename acc_t>
struct Share {
  acc_t term, u, su, h, tu;
};

template <typename acc_t, int DIV>
SK_HD Share<acc_t> two_pass_share(acc_t pt, acc_t lpt, acc_t ps, acc_t lps, acc_t beta, acc_t log_beta,
                                  acc_t log_1m_beta) {
  Share<acc_t> r;
  const bool has_s = ps != acc_t(0), has_t = pt != acc_t(0);
  if (DIV == kReverseKL) {
    r.u = lps - lpt;
    r.su = has_s ? ps * r.u : acc_t(0);
    r.term = r.su;
    r.h = acc_t(0);
    r.tu = acc_t(0);
  } else {  // kJS
    const acc_t lm = js_log_mixture(lpt, lps, log_beta, log_1m_beta);
    r.u = (acc_t(1) - beta) * (lps - lm);
    r.h = beta * (lpt - lm);
    r.su = has_s ? ps * r.u : acc_t(0);
    r.tu = has_t ? pt * r.h : acc_t(0);
    r.term = r.su + r.tu;
  }
  return r;
}

}  // namespace kd_loss
}  // namespace segkernels
