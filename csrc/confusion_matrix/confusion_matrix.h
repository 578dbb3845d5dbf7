// Per-position logic of the fused argmax + confusion-matrix op, shared by the CPU kernel and
// (as the specification the Triton GPU kernel follows) the tests.
#pragma once

#include <cstdint>

#include "common.h"

namespace segkernels {
namespace confusion_matrix {

// Running argmax over classes with torch.argmax's rules: the first maximum wins ties, and the
// first NaN wins over everything (NaN counts as the largest value).
template <typename acc_t>
SK_HD bool argmax_takes(acc_t v, acc_t best) {
  const bool v_nan = v != v;
  const bool best_nan = best != best;
  return !best_nan && (v > best || v_nan);
}

// Bin of one position in the row-major (true class, predicted class) matrix, or -1 when the
// label is ignore_index, or -2 when the label or the prediction lies outside [0, classes).
SK_HD int64_t confusion_bin(int64_t label, int64_t pred, int64_t classes, int64_t ignore_index) {
  if (label == ignore_index) return -1;
  if (label < 0 || label >= classes || pred < 0 || pred >= classes) return -2;
  return label * classes + pred;
}

}  // namespace confusion_matrix
}  // namespace segkernels
