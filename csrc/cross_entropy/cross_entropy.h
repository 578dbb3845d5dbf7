// Per-pixel math of cross_entropy over bilinearly upsampled logits (csrc/cross_entropy), shared
// by the CPU kernels and followed step by step by the Triton kernels
// (segkernels/ops/cross_entropy/triton.py). The interpolation taps are upsample_argmax's
// (linear_tap in upsample_argmax/upsample_argmax.h), which are F.interpolate's.
//
// F.cross_entropy with class weights w (all 1 without), label smoothing eps and C classes, at a
// pixel labelled t whose upsampled logits are z, with lse = log sum_c exp(z_c):
//   loss = (1 - eps) w_t (lse - z_t) + (eps / C) sum_c w_c (lse - z_c)
//   d loss / d z_c = (1 - eps) w_t (p_c - [c == t]) + (eps / C) (W p_c - w_c),  W = sum_c w_c
// and its "mean" divides the sum of the losses by the sum of w_t over the labelled pixels (with
// or without weights, as torch does).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace segkernels {
namespace cross_entropy {

// The loss of one labelled pixel from the row maximum m of z, s = sum_c exp(z_c - m), z_t and
// sum_wz = sum_c w_c z_c. nll = lse - z_t is formed as (m - z_t) + log s, which keeps its low
// bits where the logits are large (1e4): lse itself would round them away.
template <typename acc_t>
struct PixelLoss {
  acc_t nll;   // -log p_t, unweighted
  acc_t loss;  // the pixel's term of the sum
};

template <typename acc_t>
SK_HD PixelLoss<acc_t> pixel_loss(acc_t m, acc_t log_s, acc_t z_t, acc_t sum_wz, acc_t w_t, acc_t w_total,
                                  acc_t smoothing, acc_t classes) {
  PixelLoss<acc_t> r;
  r.nll = (m - z_t) + log_s;
  acc_t loss = (acc_t(1) - smoothing) * w_t * r.nll;
  if (smoothing != acc_t(0)) {
    // sum_c w_c (lse - z_c) = W lse - sum_wz, with lse = m + log s.
    loss += smoothing / classes * (w_total * (m + log_s) - sum_wz);
  }
  r.loss = loss;
  return r;
}

// The per-pixel coefficients of the gradient: d loss / d z_c = grad * (a p_c - b [c == t] - e w_c),
// with p_c = exp(z_c - m - log s) from the forward's log s (z_c - lse without forming lse, whose
// rounding at logits of 1e4 would cost p three digits).
template <typename acc_t>
struct PixelGradCoef {
  acc_t a, b, e;
};

template <typename acc_t>
SK_HD PixelGradCoef<acc_t> pixel_grad_coef(acc_t grad, acc_t w_t, acc_t w_total, acc_t smoothing, acc_t classes) {
  PixelGradCoef<acc_t> k;
  const acc_t e = smoothing / classes;
  k.b = grad * (acc_t(1) - smoothing) * w_t;
  k.a = k.b + grad * e * w_total;
  k.e = grad * e;
  return k;
}

}  // namespace cross_entropy
}  // namespace segkernels
