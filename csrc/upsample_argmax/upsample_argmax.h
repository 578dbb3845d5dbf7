// Bilinear upsampling as F.interpolate(mode="bilinear") computes it, one axis at a time, shared
// by the CPU kernel of upsample_argmax and (as the specification its Triton kernel follows) the
// tests. The argmax rule is confusion_matrix's (torch.argmax's).
#pragma once

#include <cstdint>

#include "common.h"

namespace segkernels {
namespace upsample_argmax {

// The two input indices an output index reads along one axis and their weights:
// out = w0 * in[i0] + w1 * in[i1]. ATen's area_pixel_compute_source_index for linear modes:
// align_corners maps the corner pixels onto each other ((in - 1) / (out - 1) per step);
// otherwise pixel centres ((i + 0.5) * in / out - 0.5, clamped at 0). Computed in double; the
// kernels round the weights to their accumulation type.
struct LinearTap {
  int64_t i0, i1;
  double w0, w1;
};

SK_HD LinearTap linear_tap(int64_t out_index, int64_t in_size, int64_t out_size, bool align_corners) {
  double src;
  if (align_corners) {
    const double scale = out_size > 1 ? static_cast<double>(in_size - 1) / static_cast<double>(out_size - 1) : 0.0;
    src = scale * static_cast<double>(out_index);
  } else {
    const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
    src = scale * (static_cast<double>(out_index) + 0.5) - 0.5;
    src = src < 0.0 ? 0.0 : src;
  }
  LinearTap t;
  t.i0 = static_cast<int64_t>(src);  // floor: src >= 0
  if (t.i0 > in_size - 1) t.i0 = in_size - 1;
  t.i1 = t.i0 < in_size - 1 ? t.i0 + 1 : t.i0;
  double l1 = src - static_cast<double>(t.i0);
  l1 = l1 > 1.0 ? 1.0 : l1;
  t.w1 = l1;
  t.w0 = 1.0 - l1;
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
