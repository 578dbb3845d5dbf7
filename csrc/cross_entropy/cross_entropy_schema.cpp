// Schemas of cross_entropy over bilinearly upsampled logits in the `segkernels` library. The CPU
// kernels register in cross_entropy_cpu.cpp, the CUDA kernels are Triton; fake kernels, autograd
// and vmap rules are registered from Python (segkernels/ops/cross_entropy/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // input (N, C, h, w) logits, target (N, H, W) labels (any integer dtype, contiguous), H >= h,
  // W >= w: F.cross_entropy of the logits bilinearly upsampled to (H, W), never formed.
  // Returns (loss, weight_sum, log_sum), in float32 (float64 for float64 input): loss is the (N, H, W)
  // per-pixel loss with per_pixel, else the (N, H) sums of each label row; weight_sum the (N, H)
  // sums of the labelled pixels' class weights (their count without weights); log_sum the (N, H, W)
  // log sum_c exp(z_c - max_c z_c) of labelled pixels (0 elsewhere) that the backward needs, empty
  // without save_log_sum.
  m.def("cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
        "bool align_corners, bool per_pixel, bool save_log_sum) -> (Tensor, Tensor, Tensor)");
  // The gradient of sum(grad * per-pixel loss) with respect to input, grad being (N, H, W) (any
  // strides, an expanded row or scalar included), in input's dtype and layout.
  m.def("cross_entropy_backward(Tensor grad, Tensor input, Tensor target, Tensor? weight, Tensor log_sum, "
        "int ignore_index, float label_smoothing, bool align_corners) -> Tensor");
}
