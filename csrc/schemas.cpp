// Every op schema of the `segkernels` library, in one place. Implementations register per
// dispatch key next to their kernels (TORCH_LIBRARY_IMPL); fake kernels and autograd are
// registered from Python.
#include <Python.h>
#include <torch/library.h>

#include "common_host.h"

namespace segkernels {
std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace segkernels

TORCH_LIBRARY(segkernels, m) {
  // SegNet max-pooling indices and max-unpooling (csrc/max_unpool). Spatial lists have 2 or 3
  // entries; indices are int64 plane-flat (as ATen) or uint8 in-window offsets (compact).
  m.def("max_pool_with_indices(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode, bool compact) -> (Tensor, Tensor)");
  m.def("max_unpool(Tensor input, Tensor indices, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation, int[] output_size, bool check_indices) -> Tensor");
  // Gathers grad_output at each entry's target. only_winners=True (unpool's gradient) gives zero
  // to entries that lost their target to a later entry; False (max-pool double backward) does not.
  m.def("max_unpool_backward(Tensor grad_output, Tensor indices, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, bool only_winners) -> Tensor");
  m.def("max_pool_backward(Tensor grad_output, Tensor indices, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation, int[] input_size) -> Tensor");

  // SegNet evaluation (csrc/confusion_matrix): input is logits (N, C, *spatial), argmax fused,
  // or an int64 prediction map (N, *spatial). Returns the (C, C) int64 matrix (rows = true
  // class) and a (1,) count of positions with a label or prediction outside [0, C).
  m.def("confusion_matrix(Tensor input, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");

  // Channel pruning on Gram statistics (csrc/pruning). channel_gram: A (cK, cK) = Xf^T Xf,
  // B (cK, n) = Xf^T Y, weight (n, c, *kernel) -> G (c, c) = Z^T Z, q (c,) = Z^T y with
  // Z_i = X_i W_i^T. lasso_gram: coordinate descent for every alpha at once -> (L, c);
  // init (L, c) warm-starts each alpha. Not differentiable.
  m.def("channel_gram(Tensor A, Tensor B, Tensor weight) -> (Tensor, Tensor)");
  m.def("lasso_gram(Tensor G, Tensor q, Tensor alphas, float n_samples, float tol, int max_iter, Tensor? init) -> Tensor");
}

// `import segkernels._C` loads this library, which runs the static registrations above;
// the module itself carries no Python functions.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Lets Python ask whether CUDA kernels were compiled in.
TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  m.def("built_with_cuda() -> bool", []() -> bool {
#ifdef SEGKERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("_set_poison_outputs(bool enabled) -> bool", [](bool enabled) -> bool {
    return segkernels::poison_outputs_flag().exchange(enabled);
  });
}
