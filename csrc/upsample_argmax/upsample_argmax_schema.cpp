// Schema of upsample_argmax in the `segkernels` library. The CPU kernel registers in
// upsample_argmax_cpu.cpp, the CUDA kernel is Triton; the fake kernel and the vmap rule are
// registered from Python (segkernels/ops/upsample_argmax/registration.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(segkernels, m) {
  // logits (N, C, h, w) -> (N, H, W) int64: argmax over C of the bilinear upsampling to size.
  m.def("upsample_argmax(Tensor logits, int[] size, bool align_corners) -> Tensor");
}
