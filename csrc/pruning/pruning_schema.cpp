// Schemas of the channel-pruning ops in the `segkernels` library. The kernels register next to
// their code (TORCH_LIBRARY_IMPL in pruning_cpu.cpp; the CUDA kernels are Triton); fake kernels and autograd are registered from
// Python (segkernels/ops/pruning/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // channel_gram: A (cK, cK) = Xf^T Xf, B (cK, n) = Xf^T Y, weight (n, c, *kernel) -> G (c, c) =
  // Z^T Z, q (c,) = Z^T y with Z_i = X_i W_i^T. lasso_gram: coordinate descent for every alpha at
  // once -> (L, c); init (L, c) warm-starts each alpha. Not differentiable.
  m.def("channel_gram(Tensor A, Tensor B, Tensor weight) -> (Tensor, Tensor)");
  m.def("lasso_gram(Tensor G, Tensor q, Tensor alphas, float n_samples, float tol, int max_iter, Tensor? init) -> Tensor");
}
