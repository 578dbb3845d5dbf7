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

// sklearn's second stopping test, duality gap <= tol * ||y||^2, without ||y||^2 (the Gram does
// not carry it). With s the dual scaling min(1, thr / max|q - H|), the gap of sklearn's
// formulation is 0.5 (1 - s)^2 ||y||^2 + rest, rest free of ||y||^2; and ||y||^2 >= (q.w)^2 /
// (w.G.w) (Cauchy-Schwarz: the fit of y along Z w). So the returned bound >= gap / ||y||^2, and
// stopping when it is <= tol stops no earlier than sklearn would. thr = 0 (least squares) uses
// sklearn's first-order test ||q - H||^2 instead. Channels with G_jj = 0 are left out, as the
// descent leaves them out.
template <typename T>
SK_HD double lasso_gap_bound(const double* w, const double* h, const T* q, const double* g_diag, int64_t c,
                             double thr) {
  double dual = 0.0, grad2 = 0.0, qw = 0.0, whw = 0.0, l1 = 0.0;
  for (int64_t j = 0; j < c; ++j) {
    if (g_diag[j] == 0.0) continue;
    const double qj = static_cast<double>(q[j]);
    const double r = qj - h[j];
    dual = r < 0 ? (-r > dual ? -r : dual) : (r > dual ? r : dual);
    grad2 += r * r;
    qw += qj * w[j];
    whw += w[j] * h[j];
    l1 += w[j] < 0 ? -w[j] : w[j];
  }
  double lead = 0.0, rest = grad2;
  if (thr > 0) {
    const double s = dual > thr ? thr / dual : 1.0;
    lead = 0.5 * (1.0 - s) * (1.0 - s);
    rest = 0.5 * (1.0 + s * s) * (whw - 2.0 * qw) + thr * l1 + s * qw;
  }
  if (!(rest > 0)) return lead;
  const double y2_lower = whw > 0 ? qw * qw / whw : 0.0;
  return y2_lower > 0 ? lead + rest / y2_lower : INFINITY;
}

}  // namespace pruning
}  // namespace segkernels
