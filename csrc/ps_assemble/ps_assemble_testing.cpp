// Test-only ops (segkernels_testing, testing builds only): the CUDA kernels' per-element
// functions (forward elements and backward gathers) run on the CPU, so that CPU-only CI checks
// the index math only CUDA runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "ps_assemble/ps_assemble_host.h"

namespace segkernels {
namespace ps_assemble {
namespace {

using at::Tensor;

// Contiguous, and (through new_output) on transparent huge pages when large.
Tensor fresh_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return new_output(sizes, options.memory_format(at::MemoryFormat::Contiguous));
}

// Test-only: the CUDA kernels' per-element gathers, run on the CPU.
Tensor ps_assemble_backward_gather_cpu(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                       int64_t k, int64_t m) {
  const auto [g, grad, windows, out] = prepare_backward(grad_in, windows_in, scores_size, k, m);
  if (out.numel() == 0) return out;
  Tensor keys, order;
  std::tie(keys, order) = sort_windows(g, windows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_backward_gather", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        dst[e] = static_cast<scalar_t>(backward_gather_element<scalar_t, acc_t>(
            g, go, windows.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
            order.const_data_ptr<int64_t>(), windows.size(0), e));
    });
  });
  return out;
}

Tensor ps_assemble_dense_backward_gather_cpu(const Tensor& grad_in, at::IntArrayRef scores_size, int64_t k, int64_t m,
                                             int64_t stride) {
  const auto [g, grad, windows, out] = prepare_dense_backward(grad_in, scores_size, k, m, stride);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_dense_backward_gather",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    const scalar_t* go = grad.const_data_ptr<scalar_t>();
                                    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
                                    at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
                                      for (int64_t e = begin; e < end; ++e)
                                        dst[e] = static_cast<scalar_t>(
                                            dense_backward_gather_element<scalar_t, acc_t>(g, go, e));
                                    });
                                  });
  return out;
}

// Test-only: the CUDA forward's per-element functions, run on the CPU.
Tensor ps_assemble_elementwise_cpu(const Tensor& scores, const Tensor& windows_in, int64_t k, int64_t m,
                                   int64_t stride, double pad_value, bool dense) {
  check_float(scores, "scores");
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, stride);
  Tensor windows;
  std::vector<int64_t> sizes = {g.N, g.G, g.Ho, g.Wo, m, m};
  if (!dense) {
    check_windows(windows_in, scores);
    windows = windows_in.contiguous();
    sizes = {windows.size(0), g.G, m, m};
  }
  Tensor out = fresh_output(sizes, scores.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_elementwise", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    const int64_t* win = dense ? nullptr : windows.const_data_ptr<int64_t>();
    at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        dst[e] = dense ? dense_forward_element(g, src, e, pad) : forward_element(g, src, win, e, pad);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(segkernels_testing, m) {
  m.def("ps_assemble_backward_gather(Tensor grad_output, Tensor windows, int[] scores_size, int k, int m) -> Tensor");
  m.def("ps_assemble_dense_backward_gather(Tensor grad_output, int[] scores_size, int k, int m, int stride) -> Tensor");
  m.def("ps_assemble_elementwise(Tensor scores, Tensor windows, int k, int m, int stride, float pad_value, "
        "bool dense) -> Tensor");
}

TORCH_LIBRARY_IMPL(segkernels_testing, CPU, m) {
  m.impl("ps_assemble_backward_gather", &ps_assemble_backward_gather_cpu);
  m.impl("ps_assemble_dense_backward_gather", &ps_assemble_dense_backward_gather_cpu);
  m.impl("ps_assemble_elementwise", &ps_assemble_elementwise_cpu);
}

}  // namespace ps_assemble
}  // namespace segkernels
