// Schemas of the label-map convolution ops in the `segkernels` library. The CPU kernels register
// next to their code (one_hot_conv2d_cpu.cpp); the CUDA kernels are Triton
// (segkernels/ops/one_hot_conv2d/triton.py); fake kernels and autograd are registered from Python
// (segkernels/ops/one_hot_conv2d/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // labels (N, H, W) any integer dtype; weight (O, C, kh, kw) floating; bias (O,) or None.
  // Returns the (N, O, Ho, Wo) contiguous output in weight's dtype. A label outside [0, C) that
  // is not ignore_index raises IndexError.
  m.def(
      "one_hot_conv2d(Tensor labels, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int ignore_index) -> Tensor");
  // Gradients of weight (weight_size) and of the bias ((O,)) from grad_output (N, O, Ho, Wo).
  // Invalid labels contribute nothing (the forward has refused them).
  m.def(
      "one_hot_conv2d_weight_backward(Tensor grad_output, Tensor labels, int[] weight_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int ignore_index) -> (Tensor, Tensor)");
  // (N, C, H // factor, W // factor) float32: the share of each class in every factor x factor
  // block (ignored pixels count in no class). A label outside [0, C) that is not ignore_index
  // raises IndexError.
  m.def("label_fractions(Tensor labels, int num_classes, int factor, int ignore_index) -> Tensor");
}
