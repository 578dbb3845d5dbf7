// Geometry of a convolution over a label map, shared by the CPU kernels: the one-hot map of
// labels (N, H, W) is never formed; the class at each tap of an output position selects a
// column of the weight.
//
//   out[n, o, y, x] = bias[o] + sum_{i, j} weight[o, labels[n, y*sh - ph + i*dh, x*sw - pw + j*dw], i, j]
//
// summed over the taps inside the map whose label is a class (in [0, C), not ignore_index):
// ignored pixels and the zero padding contribute nothing, as the all-zero columns of a one-hot
// map would.
#pragma once

#include <cstdint>

#include "common.h"

namespace segkernels {
namespace one_hot_conv2d {

struct Geometry {
  int64_t N, H, W;     // labels
  int64_t sN, sH, sW;  // labels strides, in elements (any layout)
  int64_t C, O;        // classes (weight's dim 1), output channels
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;
  int64_t ignore_index;

  SK_HD int64_t taps() const { return kh * kw; }
  SK_HD int64_t positions() const { return Ho * Wo; }
  // Input row (column) of output row oy (column ox) at tap row i (column j); may lie outside.
  SK_HD int64_t in_y(int64_t oy, int64_t i) const { return oy * sh - ph + i * dh; }
  SK_HD int64_t in_x(int64_t ox, int64_t j) const { return ox * sw - pw + j * dw; }
};

// What a label read at a tap means: a class in [0, C), nothing (ignored, or in the padding),
// or an invalid value (outside [0, C) and not ignore_index).
constexpr int64_t kNoClass = -1;
constexpr int64_t kInvalid = -2;

SK_HD int64_t classify(int64_t label, int64_t classes, int64_t ignore_index) {
  if (label == ignore_index) return kNoClass;
  return (label >= 0 && label < classes) ? label : kInvalid;
}

// classify for labels already checked (no invalid value left, so one outside [0, C) is
// ignore_index): whether the label is a class. Branch-free, for the kernels' inner loops.
SK_HD bool is_checked_class(int64_t label, int64_t classes, int64_t ignore_index) {
  return static_cast<uint64_t>(label) < static_cast<uint64_t>(classes) && label != ignore_index;
}

// Output positions [first, last) of the run [0, count) starting at output column ox0 whose tap
// column j reads inside the map's W columns; first == last == count when none does.
SK_HD void inside_run(int64_t ox0, int64_t count, int64_t j, int64_t sw, int64_t pw, int64_t dw, int64_t W,
                      int64_t& first, int64_t& last) {
  const int64_t ix0 = ox0 * sw - pw + j * dw;
  first = ix0 >= 0 ? 0 : ceil_div(-ix0, sw);
  last = ix0 > W - 1 ? 0 : floor_div(W - 1 - ix0, sw) + 1;
  if (first > count) first = count;
  if (last > count) last = count;
  if (last < first) first = last = count;
}

// Output extent of a convolution (floor mode, as F.conv2d): may be <= 0 for a map smaller than
// the dilated kernel, which the callers refuse.
SK_HD int64_t output_extent(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d) {
  return floor_div(size + 2 * p - d * (k - 1) - 1, s) + 1;
}

}  // namespace one_hot_conv2d
}  // namespace segkernels
