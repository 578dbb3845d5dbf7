// Schemas of the max-pooling and max-unpooling ops in the `segkernels` library. The kernels register next to
// their code (TORCH_LIBRARY_IMPL in max_unpool_cpu*.cpp and max_unpool_cuda.cu); fake kernels and autograd are registered from
// Python (segkernels/ops/max_unpool/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // Spatial lists have 2 or 3 entries; indices are int64 plane-flat (as ATen) or uint8
  // in-window offsets (compact).
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
}
