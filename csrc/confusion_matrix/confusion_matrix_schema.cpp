// Schemas of the confusion-matrix ops in the `segkernels` library. The kernels register next to
// their code (TORCH_LIBRARY_IMPL in confusion_matrix_cpu.cpp; the CUDA kernel is Triton); fake kernels and autograd are registered from
// Python (segkernels/ops/confusion_matrix/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // input is logits (N, C, *spatial), argmax fused, or an int64 prediction map (N, *spatial).
  // Returns the (C, C) int64 matrix (rows = true class) and a (1,) count of positions with a
  // label or prediction outside [0, C).
  m.def("confusion_matrix(Tensor input, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");
}
