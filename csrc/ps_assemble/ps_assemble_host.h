// Host-side argument handling shared by the CPU and CUDA implementations of the
// position-sensitive assembly ops: checks that guard memory safety (the Python wrappers give
// friendlier errors first), geometry, and the window sort of the sparse backward.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common_host.h"
#include "ps_assemble/ps_assemble.h"

namespace segkernels {
namespace ps_assemble {

inline void check_grid(int64_t k, int64_t m, int64_t stride) {
  TORCH_CHECK_VALUE(k >= 1 && k <= m, "segkernels.ps_assemble: need 1 <= k <= m, got k=", k, ", m=", m);
  TORCH_CHECK_VALUE(stride >= 1, "segkernels.ps_assemble_dense: stride must be positive, got ", stride);
}

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   "segkernels.ps_assemble: ", name, " must be float16, bfloat16, float32 or float64, got ", s);
}

inline void check_windows(const at::Tensor& windows, const at::Tensor& like) {
  TORCH_CHECK_TYPE(windows.scalar_type() == at::kLong, "segkernels.ps_assemble: windows must be int64, got ",
                   windows.scalar_type());
  TORCH_CHECK_VALUE(windows.dim() == 2 && windows.size(1) == 3,
                    "segkernels.ps_assemble: windows must have shape (R, 3), got ", windows.sizes());
  TORCH_CHECK_VALUE(windows.device() == like.device(), "segkernels.ps_assemble: windows must be on ", like.device(),
                    ", got ", windows.device());
}

// Geometry of a (N, C, H, W) scores tensor (strides as given) or, for the backward, of its
// shape with contiguous strides.
inline Geometry make_geometry(at::IntArrayRef size, at::IntArrayRef strides, int64_t k, int64_t m, int64_t stride) {
  TORCH_CHECK_VALUE(size.size() == 4, "segkernels.ps_assemble: scores must be 4-D (N, G * k * k, H, W), got ", size);
  check_grid(k, m, stride);
  Geometry g;
  g.N = size[0];
  g.C = size[1];
  g.H = size[2];
  g.W = size[3];
  TORCH_CHECK_VALUE(g.C % (k * k) == 0 && g.C > 0, "segkernels.ps_assemble: scores channels (", g.C,
                    ") must be a positive multiple of k * k = ", k * k);
  g.sN = strides[0];
  g.sC = strides[1];
  g.sH = strides[2];
  g.sW = strides[3];
  g.G = g.C / (k * k);
  g.k = k;
  g.m = m;
  g.stride = stride;
  g.Ho = ceil_div(g.H, stride);
  g.Wo = ceil_div(g.W, stride);
  return g;
}

inline Geometry contiguous_geometry(at::IntArrayRef size, int64_t k, int64_t m, int64_t stride) {
  TORCH_CHECK_VALUE(size.size() == 4, "segkernels.ps_assemble: scores_size must have 4 entries, got ", size);
  const int64_t st[4] = {size[1] * size[2] * size[3], size[2] * size[3], size[3], 1};
  return make_geometry(size, at::IntArrayRef(st, 4), k, m, stride);
}

// Windows sorted for the backward gather: (keys ascending, window index of each), stable, so
// that windows with equal keys keep their order. Runs on the windows' device, no host sync.
inline std::tuple<at::Tensor, at::Tensor> sort_windows(const Geometry& g, const at::Tensor& windows) {
  const at::Tensor b = windows.select(1, 0);
  const at::Tensor y0 = windows.select(1, 1);
  const at::Tensor valid = b.ge(0).logical_and(b.lt(g.N));
  const at::Tensor key = at::where(valid, b.clamp(0, g.N - 1) * g.key_rows() + y0.clamp(-g.m, g.H) + g.m,
                                   at::full({}, g.N * g.key_rows(), windows.options()));
  auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {std::get<0>(sorted).contiguous(), std::get<1>(sorted).contiguous()};
}

inline void check_grad_output(const at::Tensor& grad, at::IntArrayRef expected, const char* op) {
  check_float(grad, "grad_output");
  TORCH_CHECK_VALUE(grad.sizes() == expected, "segkernels.", op, ": grad_output must have shape ", expected,
                    ", got ", grad.sizes());
}

// What every backward (CPU, CUDA and the test-only gathers) starts from, checked the same way:
// the geometry, the contiguous gradient (and windows, for the sparse op) and the fresh
// scores-sized output.
struct BackwardArgs {
  Geometry g;
  at::Tensor grad, windows, out;
};

inline BackwardArgs prepare_backward(const at::Tensor& grad_in, const at::Tensor& windows_in, at::IntArrayRef scores_size,
                                     int64_t k, int64_t m) {
  BackwardArgs a{contiguous_geometry(scores_size, k, m, 1), {}, {}, {}};
  check_windows(windows_in, grad_in);
  check_grad_output(grad_in, {windows_in.size(0), a.g.G, m, m}, "ps_assemble_backward");
  a.grad = grad_in.contiguous();
  a.windows = windows_in.contiguous();
  a.out = new_output(scores_size, a.grad.options().memory_format(at::MemoryFormat::Contiguous));
  return a;
}

inline BackwardArgs prepare_dense_backward(const at::Tensor& grad_in, at::IntArrayRef scores_size, int64_t k, int64_t m,
                                           int64_t stride) {
  BackwardArgs a{contiguous_geometry(scores_size, k, m, stride), {}, {}, {}};
  check_grad_output(grad_in, {a.g.N, a.g.G, a.g.Ho, a.g.Wo, m, m}, "ps_assemble_dense_backward");
  a.grad = grad_in.contiguous();
  a.out = new_output(scores_size, a.grad.options().memory_format(at::MemoryFormat::Contiguous));
  return a;
}

}  // namespace ps_assemble
}  // namespace segkernels
