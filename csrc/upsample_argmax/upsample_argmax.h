// Bilinear upsampling as F.interpolate(mode="bilinear") computes it, one axis at a time, shared
// by the CPU kernel of upsample_argmax and (as the specification its Triton kernel's host-side
// tables follow) the tests. The argmax rule is confusion_matrix's (torch.argmax's).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace segkernels {
namespace upsample_argmax {

// The two input indices an output index reads along one axis and their weights:
// out = w0 * in[i0] + w1 * in[i1]. ATen's rule for linear modes (UpSample.h,
// compute_source_index_and_lambda), in its arithmetic, T being the logits' opmath type (float
// for 16- and 32-bit logits): an axis of unchanged size is copied (i0 = i1, weights 1 and 0);
// otherwise align_corners maps the corner pixels onto each other ((in - 1) / (out - 1) per
// step) and the default maps pixel centres ((i + 0.5) * in / out - 0.5, clamped at 0). The same
// pixels and weights as F.interpolate matter beyond rounding: a NaN or an infinity read with
// weight 0 still makes the value NaN.
template <typename T>
struct LinearTap {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
SK_HD LinearTap<T> linear_tap(int64_t out_index, int64_t in_size, int64_t out_size, bool align_corners) {
  LinearTap<T> t;
  if (in_size == out_size) {
    t.i0 = t.i1 = out_index;
    t.w0 = T(1);
    t.w1 = T(0);
    return t;
  }
  T src;
  if (align_corners) {
    const T scale = out_size > 1 ? static_cast<T>(in_size - 1) / static_cast<T>(out_size - 1) : T(0);
    src = scale * static_cast<T>(out_index);
  } else {
    // One rounding, as ATen's x86 builds (AVX2 and up) compute it: their compiler contracts
    // scale * (i + 0.5) - 0.5 into an FMA, which decides the pixel read where the exact value
    // is an integer (e.g. 2 -> 50 pixels, output 37).
    const T scale = static_cast<T>(in_size) / static_cast<T>(out_size);
    src = std::fma(scale, static_cast<T>(out_index) + T(0.5), T(-0.5));
    src = src < T(0) ? T(0) : src;
  }
  t.i0 = static_cast<int64_t>(src);  // floor: src >= 0
  if (t.i0 > in_size - 1) t.i0 = in_size - 1;
  t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
  T l1 = src - static_cast<T>(t.i0);
  l1 = l1 < T(0) ? T(0) : (l1 > T(1) ? T(1) : l1);
  t.w1 = l1;
  t.w0 = T(1) - l1;
  return t;
}

// One interpolated value, in ATen's order: each input row blended horizontally, then the two
// rows blended vertically.
template <typename acc_t>
SK_HD acc_t bilinear(acc_t x00, acc_t x01, acc_t x10, acc_t x11, acc_t wy0, acc_t wy1, acc_t wx0, acc_t wx1) {
  return (x00 * wx0 + x01 * wx1) * wy0 + (x10 * wx0 + x11 * wx1) * wy1;
}

}  // namespace upsample_argmax
}  // namespace segkernels
