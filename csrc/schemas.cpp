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
  // Test-only (CPU): runs the CUDA fast path's tiled-window element functions on the CPU.
  m.def("_max_unpool_tiled_logic(Tensor input, Tensor indices, Tensor grad_output, int[] kernel_size, "
        "int[] padding, int[] output_size) -> (Tensor, Tensor, Tensor)");
  // Test-only (CPU): max-pooling by the CUDA kernel's element function, in 32 (narrow) or 64 bits.
  m.def("_max_pool_logic(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode, bool compact, bool narrow) -> (Tensor, Tensor)");
  // Test-only (CPU): FastDivider (csrc/common.h), the 32-bit CUDA kernels' division.
  m.def("_fast_divide(Tensor numerators, int divisor) -> Tensor");

  // SegNet evaluation (csrc/confusion_matrix): input is logits (N, C, *spatial), argmax fused,
  // or an int64 prediction map (N, *spatial). Returns the (C, C) int64 matrix (rows = true
  // class) and a (1,) count of positions with a label or prediction outside [0, C).
  m.def("confusion_matrix(Tensor input, Tensor labels, int num_classes, int ignore_index) -> (Tensor, Tensor)");

  // Tempered-softmax distillation (csrc/kd_loss). kd_loss: K students against one teacher read
  // once; returns the loss map (K, N, *spatial) (spatial=False: softmax over channels, positions
  // whose label is ignore_index give 0) or (K, N, C) (spatial=True: softmax over each (n, c)
  // row), in float32 (float64 for float64 inputs), and each student's gradient of the sum of its
  // map, in the input dtype. seg_kd_loss: hard CE + soft KD in one pass; returns the 0-d loss
  // and the student's gradient of it.
  m.def("kd_loss(Tensor[] students, Tensor teacher, Tensor? labels, float temperature, bool spatial, bool kl, "
        "bool scale_by_t2, int ignore_index) -> (Tensor, Tensor[])");
  m.def("seg_kd_loss(Tensor student, Tensor teacher, Tensor labels, Tensor? class_weight, float temperature, "
        "float hard_weight, float soft_weight, int ignore_index) -> (Tensor, Tensor)");
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

// InstanceFCN position-sensitive assembly (csrc/ps_assemble). scores (N, G * k * k, H, W);
// windows (R, 3) int64 rows (batch_index, y0, x0). Sparse output (R, G, m, m), dense output
// (N, G, ceil(H / stride), ceil(W / stride), m, m). Backward ops return contiguous (N, C, H, W)
// gradients; the underscored ops are test-only CPU runs of the CUDA kernels' element functions.
TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  m.def("ps_assemble(Tensor scores, Tensor windows, int k, int m, float pad_value) -> Tensor");
  m.def("ps_assemble_backward(Tensor grad_output, Tensor windows, int[] scores_size, int k, int m) -> Tensor");
  m.def("ps_assemble_dense(Tensor scores, int k, int m, int stride, float pad_value) -> Tensor");
  m.def("ps_assemble_dense_backward(Tensor grad_output, int[] scores_size, int k, int m, int stride) -> Tensor");
  m.def("_ps_assemble_backward_gather(Tensor grad_output, Tensor windows, int[] scores_size, int k, int m) -> Tensor");
  m.def("_ps_assemble_dense_backward_gather(Tensor grad_output, int[] scores_size, int k, int m, int stride) -> Tensor");
  m.def("_ps_assemble_elementwise(Tensor scores, Tensor windows, int k, int m, int stride, float pad_value, "
        "bool dense) -> Tensor");
}
