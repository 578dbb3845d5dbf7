// CPU kernels for InstanceFCN position-sensitive assembly (sparse windows and the dense grid).
// The index math lives in ps_assemble.h and is shared with the CUDA kernels.
//
// Forward: one task per (window, group) tile; each tile row is copied in k contiguous segments
// (one per cell), pads written around them.
// Backward: one task per score plane (b, ch): a float accumulator plane is zeroed, then every
// window of image b adds its (i, j) cell block, windows taken in ascending (y0, window index)
// order. That is the order the CUDA gather sums in, so both devices give the same bits, and
// nothing is shared between tasks: deterministic, no atomics. The per-element gather the CUDA
// kernels run is exposed on the CPU as test-only ops (_ps_assemble_*_gather).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ps_assemble/ps_assemble_host.h"

namespace segkernels {
namespace ps_assemble {
namespace {

using at::Tensor;

std::vector<int64_t> cell_table(const Geometry& g) {
  std::vector<int64_t> cb(g.k + 1);
  for (int64_t i = 0; i <= g.k; ++i) cb[i] = cell_begin(i, g.k, g.m);
  return cb;
}

// Offsets [lo, hi) of [0, m) with origin + offset inside [0, size).
inline void valid_span(int64_t origin, int64_t m, int64_t size, int64_t& lo, int64_t& hi) {
  lo = origin >= 0 ? 0 : (origin <= -m ? m : -origin);
  hi = origin >= size ? 0 : std::min<int64_t>(m, size - origin);
  if (hi < lo) hi = lo;
}

// One m x m tile of window (b, y0, x0), group gi.
template <typename scalar_t>
void copy_tile(const Geometry& g, const scalar_t* scores, const int64_t* cb, int64_t b, int64_t y0, int64_t x0,
               int64_t gi, scalar_t pad, scalar_t* out) {
  const int64_t m = g.m;
  if (b < 0 || b >= g.N) {
    std::fill(out, out + m * m, pad);
    return;
  }
  int64_t ulo, uhi, vlo, vhi;
  valid_span(y0, m, g.H, ulo, uhi);
  valid_span(x0, m, g.W, vlo, vhi);
  std::fill(out, out + ulo * m, pad);
  for (int64_t i = 0; i < g.k; ++i) {
    const int64_t a = std::max(cb[i], ulo), e = std::min(cb[i + 1], uhi);
    for (int64_t u = a; u < e; ++u) {
      scalar_t* row = out + u * m;
      std::fill(row, row + vlo, pad);
      const int64_t base = b * g.sN + (gi * g.kk() + i * g.k) * g.sC + (y0 + u) * g.sH;
      for (int64_t j = 0; j < g.k; ++j) {
        const int64_t va = std::max(cb[j], vlo), ve = std::min(cb[j + 1], vhi);
        const scalar_t* src = scores + base + j * g.sC;
        if (ve <= va) continue;
        if (g.sW == 1) {
          const scalar_t* s = src + (x0 + va);
          std::copy(s, s + (ve - va), row + va);
        } else {
          for (int64_t v = va; v < ve; ++v) row[v] = src[(x0 + v) * g.sW];
        }
      }
      std::fill(row + vhi, row + m, pad);
    }
  }
  std::fill(out + uhi * m, out + m * m, pad);
}

// Adds cell (i, j) of one gradient tile into an accumulator plane (H, W).
template <typename scalar_t, typename acc_t>
inline void add_cell(const Geometry& g, const int64_t* cb, const scalar_t* tile, int64_t i, int64_t j, int64_t y0,
                     int64_t x0, acc_t* plane) {
  int64_t ulo, uhi, vlo, vhi;
  valid_span(y0, g.m, g.H, ulo, uhi);
  valid_span(x0, g.m, g.W, vlo, vhi);
  const int64_t ua = std::max(cb[i], ulo), ue = std::min(cb[i + 1], uhi);
  const int64_t va = std::max(cb[j], vlo), ve = std::min(cb[j + 1], vhi);
  for (int64_t u = ua; u < ue; ++u) {
    acc_t* dst = plane + (y0 + u) * g.W + x0;
    const scalar_t* src = tile + u * g.m;
    for (int64_t v = va; v < ve; ++v) dst[v] += static_cast<acc_t>(src[v]);
  }
}

Tensor ps_assemble_cpu(const Tensor& scores, const Tensor& windows_in, int64_t k, int64_t m, double pad_value) {
  check_float(scores, "scores");
  check_windows(windows_in, scores);
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, 1);
  const Tensor windows = windows_in.contiguous();
  const int64_t R = windows.size(0);
  Tensor out = new_output({R, g.G, m, m}, scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> cb = cell_table(g);
  const int64_t* win = windows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_cpu", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    at::parallel_for(0, R * g.G, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / g.G, gi = t % g.G;
        copy_tile(g, src, cb.data(), win[3 * r], win[3 * r + 1], win[3 * r + 2], gi, pad, dst + t * m * m);
      }
    });
  });
  return out;
}

Tensor ps_assemble_dense_cpu(const Tensor& scores, int64_t k, int64_t m, int64_t stride, double pad_value) {
  check_float(scores, "scores");
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, stride);
  Tensor out = new_output({g.N, g.G, g.Ho, g.Wo, m, m}, scores.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> cb = cell_table(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_dense_cpu", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    const int64_t tiles = g.N * g.G * g.Ho * g.Wo;
    at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t ox = t % g.Wo, oy = (t / g.Wo) % g.Ho, gi = (t / (g.Wo * g.Ho)) % g.G;
        const int64_t b = t / (g.Wo * g.Ho * g.G);
        copy_tile(g, src, cb.data(), b, oy * stride - g.half(), ox * stride - g.half(), gi, pad, dst + t * m * m);
      }
    });
  });
  return out;
}

// Per score plane (b, ch): zero an accumulator, let `each_window(b, fn)` call fn(tile, y0, x0)
// in summation order, write the plane out.
template <typename scalar_t, typename Windows>
void accumulate_planes(const Geometry& g, const std::vector<int64_t>& cb, scalar_t* grad_scores,
                       const Windows& each_window) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane_size = g.H * g.W;
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> plane(plane_size);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / g.C, ch = t % g.C;
      const int64_t gi = ch / g.kk(), i = (ch % g.kk()) / g.k, j = ch % g.k;
      std::fill(plane.begin(), plane.end(), acc_t(0));
      each_window(b, gi, i, [&](const scalar_t* tile, int64_t y0, int64_t x0) {
        add_cell(g, cb.data(), tile, i, j, y0, x0, plane.data());
      });
      scalar_t* dst = grad_scores + t * plane_size;
      for (int64_t p = 0; p < plane_size; ++p) dst[p] = static_cast<scalar_t>(plane[p]);
    }
  });
}

Tensor ps_assemble_backward_cpu(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                int64_t k, int64_t m) {
  const Geometry g = contiguous_geometry(scores_size, k, m, 1);
  check_windows(windows_in, grad_in);
  check_grad_output(grad_in, {windows_in.size(0), g.G, m, m}, "ps_assemble_backward");
  const Tensor grad = grad_in.contiguous();
  const Tensor windows = windows_in.contiguous();
  const int64_t R = windows.size(0);
  Tensor out = new_output(scores_size, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  Tensor keys, order;
  std::tie(keys, order) = sort_windows(g, windows);
  const int64_t* kp = keys.const_data_ptr<int64_t>();
  const int64_t* op = order.const_data_ptr<int64_t>();
  const int64_t* win = windows.const_data_ptr<int64_t>();
  // Segment of image b in the sorted windows.
  std::vector<int64_t> seg(g.N + 1);
  for (int64_t b = 0; b <= g.N; ++b) seg[b] = search_sorted(kp, R, b * g.key_rows(), false);
  const std::vector<int64_t> cb = cell_table(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_planes<scalar_t>(g, cb, out.mutable_data_ptr<scalar_t>(), [&](int64_t b, int64_t gi, int64_t i, auto&& fn) {
      // Only windows whose cell row i can reach the map: y0 in [-cb[i+1] + 1, H - 1 - cb[i]].
      const int64_t first = search_sorted(kp + seg[b], seg[b + 1] - seg[b], g.key(b, -cb[i + 1] + 1), false);
      const int64_t last = search_sorted(kp + seg[b], seg[b + 1] - seg[b], g.key(b, g.H - 1 - cb[i]), true);
      for (int64_t p = seg[b] + first; p < seg[b] + last; ++p) {
        const int64_t r = op[p];
        fn(go + (r * g.G + gi) * mm, win[3 * r + 1], win[3 * r + 2]);
      }
    });
  });
  return out;
}

Tensor ps_assemble_dense_backward_cpu(const Tensor& grad_in, at::IntArrayRef scores_size, int64_t k, int64_t m,
                                      int64_t stride) {
  const Geometry g = contiguous_geometry(scores_size, k, m, stride);
  check_grad_output(grad_in, {g.N, g.G, g.Ho, g.Wo, m, m}, "ps_assemble_dense_backward");
  const Tensor grad = grad_in.contiguous();
  Tensor out = new_output(scores_size, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const std::vector<int64_t> cb = cell_table(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_dense_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_planes<scalar_t>(g, cb, out.mutable_data_ptr<scalar_t>(), [&](int64_t b, int64_t gi, int64_t i, auto&& fn) {
      const scalar_t* plane = go + (b * g.G + gi) * g.Ho * g.Wo * mm;
      // Window rows whose cell row i meets the map.
      int64_t oy0 = 0, oy1 = 0;
      dense_range(0, cb[i] - (g.H - 1), cb[i + 1], stride, g.half(), g.Ho, oy0, oy1);
      for (int64_t oy = oy0; oy < oy1; ++oy)
        for (int64_t ox = 0; ox < g.Wo; ++ox)
          fn(plane + (oy * g.Wo + ox) * mm, oy * stride - g.half(), ox * stride - g.half());
    });
  });
  return out;
}

// Test-only: the CUDA kernels' per-element gathers, run on the CPU.
Tensor ps_assemble_backward_gather_cpu(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                       int64_t k, int64_t m) {
  const Geometry g = contiguous_geometry(scores_size, k, m, 1);
  check_windows(windows_in, grad_in);
  check_grad_output(grad_in, {windows_in.size(0), g.G, m, m}, "ps_assemble_backward");
  const Tensor grad = grad_in.contiguous();
  const Tensor windows = windows_in.contiguous();
  Tensor out = new_output(scores_size, grad.options().memory_format(at::MemoryFormat::Contiguous));
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
  const Geometry g = contiguous_geometry(scores_size, k, m, stride);
  check_grad_output(grad_in, {g.N, g.G, g.Ho, g.Wo, m, m}, "ps_assemble_dense_backward");
  const Tensor grad = grad_in.contiguous();
  Tensor out = new_output(scores_size, grad.options().memory_format(at::MemoryFormat::Contiguous));
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
  Tensor out = new_output(sizes, scores.options().memory_format(at::MemoryFormat::Contiguous));
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

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("ps_assemble", &ps_assemble_cpu);
  m.impl("ps_assemble_backward", &ps_assemble_backward_cpu);
  m.impl("ps_assemble_dense", &ps_assemble_dense_cpu);
  m.impl("ps_assemble_dense_backward", &ps_assemble_dense_backward_cpu);
  m.impl("_ps_assemble_backward_gather", &ps_assemble_backward_gather_cpu);
  m.impl("_ps_assemble_dense_backward_gather", &ps_assemble_dense_backward_gather_cpu);
  m.impl("_ps_assemble_elementwise", &ps_assemble_elementwise_cpu);
}

}  // namespace ps_assemble
}  // namespace segkernels
