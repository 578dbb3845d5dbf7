// Schemas of the InstanceFCN position-sensitive assembly ops in the `segkernels` library. The kernels register next to
// their code (TORCH_LIBRARY_IMPL in ps_assemble_cpu.cpp and ps_assemble_cuda.cu); fake kernels and autograd are registered from
// Python (segkernels/ops/ps_assemble/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // scores (N, G * k * k, H, W); windows (R, 3) int64 rows (batch_index, y0, x0). Sparse output
  // (R, G, m, m), dense output (N, G, ceil(H / stride), ceil(W / stride), m, m). Backward ops
  // return contiguous (N, C, H, W) gradients.
  m.def("ps_assemble(Tensor scores, Tensor windows, int k, int m, float pad_value) -> Tensor");
  m.def("ps_assemble_backward(Tensor grad_output, Tensor windows, int[] scores_size, int k, int m) -> Tensor");
  m.def("ps_assemble_dense(Tensor scores, int k, int m, int stride, float pad_value) -> Tensor");
  m.def("ps_assemble_dense_backward(Tensor grad_output, int[] scores_size, int k, int m, int stride) -> Tensor");
}
