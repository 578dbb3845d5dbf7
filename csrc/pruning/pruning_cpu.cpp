// CPU kernels of channel pruning on Gram statistics (csrc/pruning):
//   channel_gram: G[i, j] = sum_{k,l} A[(i,k),(j,l)] (Wf^T Wf)[(i,k),(j,l)] and
//                 q[i] = sum_{k,o} B[(i,k),o] W[o,i,k], without materialising Wf^T Wf;
//   lasso_gram:   coordinate descent on the Gram for a batch of alphas (parallel over alphas).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common_host.h"
#include "pruning/pruning.h"

namespace segkernels {
namespace pruning {
namespace {

using at::Tensor;

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "segkernels.pruning: ", name,
                   " must be float32 or float64, got ", t.scalar_type());
}

void check_gram_args(const Tensor& A, const Tensor& B, const Tensor& weight) {
  check_float(A, "A");
  check_float(B, "B");
  check_float(weight, "weight");
  TORCH_CHECK_TYPE(A.scalar_type() == B.scalar_type() && A.scalar_type() == weight.scalar_type(),
                   "segkernels.channel_gram: A, B and weight must share a dtype, got ", A.scalar_type(), ", ",
                   B.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() >= 2, "segkernels.channel_gram: weight must be (n, c, *kernel), got ",
                    weight.sizes());
  const int64_t n = weight.size(0), c = weight.size(1);
  int64_t K = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) K *= weight.size(d);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(0) == c * K && A.size(1) == c * K, "segkernels.channel_gram: A must be (",
                    c * K, ", ", c * K, ") for weight ", weight.sizes(), ", got ", A.sizes());
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(0) == c * K && B.size(1) == n, "segkernels.channel_gram: B must be (",
                    c * K, ", ", n, ") for weight ", weight.sizes(), ", got ", B.sizes());
}

// Wf^T Wf is formed one block of rows at a time (bK x cK, about 32 MB, by BLAS: an inner
// dimension of n keeps it efficient) and immediately folded into G by a fused multiply with A
// and (k, l)-block reduction; only the upper block triangle (j >= i) is computed, then mirrored.
std::tuple<Tensor, Tensor> channel_gram_cpu(const Tensor& A_in, const Tensor& B_in, const Tensor& weight) {
  check_gram_args(A_in, B_in, weight);
  const int64_t n = weight.size(0), c = weight.size(1);
  int64_t K = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) K *= weight.size(d);
  Tensor G = new_output({c, c}, A_in.options());
  Tensor q = new_output({c}, A_in.options());
  if (c == 0) return {G, q};
  const int64_t cK = c * K;
  const Tensor A = A_in.contiguous();
  const Tensor B = B_in.contiguous();
  const Tensor Wf = weight.reshape({n, cK}).contiguous();
  const int64_t elem = static_cast<int64_t>(A.element_size());
  const int64_t block_c = std::max<int64_t>(1, (int64_t{32} << 20) / std::max<int64_t>(1, K * cK * elem));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "channel_gram_cpu", [&] {
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    scalar_t* g = G.mutable_data_ptr<scalar_t>();
    for (int64_t i0 = 0; i0 < c; i0 += block_c) {
      const int64_t i1 = std::min(c, i0 + block_c);
      const int64_t r0 = i0 * K, r1 = i1 * K, width = cK - r0;
      // M[(i,k), (j,l)] for i in [i0, i1), j >= i0: (r1 - r0, width).
      Tensor M = n == 0 ? at::zeros({r1 - r0, width}, A.options())
                        : at::mm(Wf.slice(1, r0, r1).t(), Wf.slice(1, r0, cK)).contiguous();
      const scalar_t* m = M.const_data_ptr<scalar_t>();
      at::parallel_for(i0, i1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          for (int64_t j = i; j < c; ++j) {
            double acc = 0.0;
            for (int64_t k = 0; k < K; ++k) {
              const scalar_t* arow = a + (i * K + k) * cK + j * K;
              const scalar_t* mrow = m + ((i - i0) * K + k) * width + (j * K - r0);
              for (int64_t l = 0; l < K; ++l) acc += static_cast<double>(arow[l]) * static_cast<double>(mrow[l]);
            }
            g[i * c + j] = static_cast<scalar_t>(acc);
            g[j * c + i] = static_cast<scalar_t>(acc);
          }
        }
      });
    }
    const scalar_t* b = B.const_data_ptr<scalar_t>();
    const scalar_t* wf = Wf.const_data_ptr<scalar_t>();
    scalar_t* qp = q.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* brow = b + (i * K + k) * n;
          for (int64_t o = 0; o < n; ++o) acc += static_cast<double>(brow[o]) * static_cast<double>(wf[o * cK + i * K + k]);
        }
        qp[i] = static_cast<scalar_t>(acc);
      }
    });
  });
  return {G, q};
}

void check_lasso_args(const Tensor& G, const Tensor& q, const Tensor& alphas, double n_samples, double tol,
                      int64_t max_iter, const std::optional<Tensor>& init) {
  check_float(G, "G");
  TORCH_CHECK_TYPE(q.scalar_type() == G.scalar_type() && alphas.scalar_type() == G.scalar_type(),
                   "segkernels.lasso_gram: G, q and alphas must share a dtype, got ", G.scalar_type(), ", ",
                   q.scalar_type(), " and ", alphas.scalar_type());
  TORCH_CHECK_VALUE(G.dim() == 2 && G.size(0) == G.size(1), "segkernels.lasso_gram: G must be square (c, c), got ",
                    G.sizes());
  TORCH_CHECK_VALUE(q.dim() == 1 && q.size(0) == G.size(0), "segkernels.lasso_gram: q must be (", G.size(0),
                    ",), got ", q.sizes());
  TORCH_CHECK_VALUE(alphas.dim() == 1, "segkernels.lasso_gram: alphas must be 1-D (L,), got ", alphas.sizes());
  TORCH_CHECK_VALUE(n_samples > 0, "segkernels.lasso_gram: n_samples must be positive, got ", n_samples);
  TORCH_CHECK_VALUE(tol >= 0, "segkernels.lasso_gram: tol must be >= 0, got ", tol);
  TORCH_CHECK_VALUE(max_iter >= 0, "segkernels.lasso_gram: max_iter must be >= 0, got ", max_iter);
  if (init.has_value()) {
    TORCH_CHECK_VALUE(init->dim() == 2 && init->size(0) == alphas.size(0) && init->size(1) == G.size(0),
                      "segkernels.lasso_gram: init must be (", alphas.size(0), ", ", G.size(0), "), got ",
                      init->sizes());
    TORCH_CHECK_TYPE(init->scalar_type() == G.scalar_type(), "segkernels.lasso_gram: init must be ",
                     G.scalar_type(), ", got ", init->scalar_type());
  }
}

Tensor lasso_gram_cpu(const Tensor& G_in, const Tensor& q_in, const Tensor& alphas_in, double n_samples, double tol,
                      int64_t max_iter, const std::optional<Tensor>& init) {
  check_lasso_args(G_in, q_in, alphas_in, n_samples, tol, max_iter, init);
  const int64_t c = G_in.size(0), L = alphas_in.size(0);
  Tensor out = new_output({L, c}, G_in.options());
  if (L == 0 || c == 0) return out;
  const Tensor G = G_in.contiguous();
  const Tensor q = q_in.contiguous();
  const Tensor alphas = alphas_in.contiguous();
  const Tensor w0 = init.has_value() ? init->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lasso_gram_cpu", [&] {
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* al = alphas.const_data_ptr<scalar_t>();
    const scalar_t* w0p = w0.defined() ? w0.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> w(c), h(c), gd(c);
      for (int64_t j = 0; j < c; ++j) gd[j] = static_cast<double>(g[j * c + j]);
      for (int64_t a = begin; a < end; ++a) {
        const double threshold = static_cast<double>(al[a]) * n_samples;
        for (int64_t j = 0; j < c; ++j) w[j] = w0p ? static_cast<double>(w0p[a * c + j]) : 0.0;
        // H = G w
        std::fill(h.begin(), h.end(), 0.0);
        for (int64_t j = 0; j < c; ++j) {
          if (w[j] == 0.0) continue;
          const scalar_t* gr = g + j * c;
          for (int64_t t = 0; t < c; ++t) h[t] += static_cast<double>(gr[t]) * w[j];
        }
        for (int64_t it = 0; it < max_iter; ++it) {
          double w_max = 0.0, d_max = 0.0;
          for (int64_t j = 0; j < c; ++j) {
            if (gd[j] == 0.0) continue;  // a channel whose contribution is identically zero
            const double old = w[j];
            const double nw = lasso_coordinate<double>(static_cast<double>(qp[j]), h[j], gd[j], old, threshold);
            if (nw != old) {
              const double d = nw - old;
              const scalar_t* gr = g + j * c;  // G symmetric: row j is column j
              for (int64_t t = 0; t < c; ++t) h[t] += static_cast<double>(gr[t]) * d;
              w[j] = nw;
              d_max = std::max(d_max, std::abs(d));
            }
            w_max = std::max(w_max, std::abs(nw));
          }
          if (d_max == 0.0) break;  // a sweep that changed nothing: every later one is the same
          // sklearn's two tests: the largest update relative to the largest coefficient, then
          // (bounded, see lasso_gap_bound) the duality gap.
          if ((w_max == 0.0 || d_max <= tol * w_max) &&
              lasso_gap_bound<scalar_t>(w.data(), h.data(), qp, gd.data(), c, threshold) <= tol)
            break;
        }
        for (int64_t j = 0; j < c; ++j) op[a * c + j] = static_cast<scalar_t>(w[j]);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("channel_gram", &channel_gram_cpu);
  m.impl("lasso_gram", &lasso_gram_cpu);
}

}  // namespace pruning
}  // namespace segkernels
