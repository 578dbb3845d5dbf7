// Channel pruning (He et al. 2017) on Gram statistics: per-coordinate math shared by the CPU
// kernels (and mirrored by the Triton GPU kernels in segkernels/pruning.py).
#pragma once

#include <cmath>

#include "common.h"

namespace segkernels {
namespace pruning {

// One coordinate-descent update of the LASSO on the Gram, in sklearn's
// enet_coordinate_descent_gram form: with G = Z^T Z, q = Z^T y and H = G w,
//   w_j <- soft(q_j - H_j + G_jj w_j, threshold) / G_jj,   threshold = alpha * n_samples.
template <typename T>
SK_HD T lasso_coordinate(T q_j, T h_j, T g_jj, T w_j, T threshold) {
  const T rho = q_j - h_j + g_jj * w_j;
  const T mag = (rho < T(0) ? -rho : rho) - threshold;
  if (!(mag > T(0))) return T(0);
  return (rho < T(0) ? -mag : mag) / g_jj;
}

}  // namespace pruning
}  // namespace segkernels
