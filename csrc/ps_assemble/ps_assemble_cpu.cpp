// CPU kernels for InstanceFCN position-sensitive assembly (sparse windows and the dense grid).
// The index math lives in ps_assemble.h and is shared with the CUDA kernels.
//
// Forward: one task per (image, group, cell row i): the k score planes of cells (i, 0..k-1)
// stay cache-resident while every window of the image writes its tile rows of cell row i
// (each column reads its cell's plane through a channel-offset table; pads around).
// Backward: one task per (image, group, cell row i): k float accumulator planes (the channels
// of cells (i, 0..k-1)) are zeroed, then every window of the image adds the rows of cell row i
// of its gradient tile (contiguous in the tile), windows taken in ascending (y0, window index)
// order. That is the order the CUDA gather sums in, so both devices give the same bits, and
// nothing is shared between tasks: deterministic, no atomics. The per-element functions the
// CUDA kernels run are exposed on the CPU as test-only ops (_ps_assemble_*).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
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

std::vector<int64_t> cell_table(const Geometry& g) {
  std::vector<int64_t> cb(g.k + 1);
  for (int64_t i = 0; i <= g.k; ++i) cb[i] = cell_begin(i, g.k, g.m);
  return cb;
}

// Per offset: its cell, and the channel offset of its column cell (cell(v) * channel stride).
struct Tables {
  std::vector<int64_t> cb, cell, col_off;
  Tables(const Geometry& g, int64_t channel_stride) : cb(cell_table(g)), cell(g.m), col_off(g.m) {
    for (int64_t u = 0; u < g.m; ++u) {
      cell[u] = cell_of(u, g.k, g.m);
      col_off[u] = cell[u] * channel_stride;
    }
  }
};

// Offsets [lo, hi) of [0, m) with origin + offset inside [0, size).
inline void valid_span(int64_t origin, int64_t m, int64_t size, int64_t& lo, int64_t& hi) {
  lo = origin >= 0 ? 0 : (origin <= -m ? m : -origin);
  hi = origin >= size ? 0 : std::min<int64_t>(m, size - origin);
  if (hi < lo) hi = lo;
}

// Rows [cb[i], cb[i + 1]) of the tile of window (b, y0, x0), group gi (b valid): the forward
// per (image, group, cell row) task, which reads only k score planes (contiguous in NCHW,
// cache-resident across the image's windows) instead of gathering from k * k planes per tile.
template <typename scalar_t>
inline void copy_cell_row(const Geometry& g, const Tables& t, const scalar_t* planes, int64_t i, int64_t y0,
                          int64_t x0, scalar_t pad, scalar_t* out) {
  const int64_t m = g.m;
  int64_t ulo, uhi, vlo, vhi;
  valid_span(y0, m, g.H, ulo, uhi);
  valid_span(x0, m, g.W, vlo, vhi);
  const int64_t* col_off = t.col_off.data();
  for (int64_t u = t.cb[i]; u < t.cb[i + 1]; ++u) {
    scalar_t* row = out + u * m;
    if (u < ulo || u >= uhi) {
      for (int64_t v = 0; v < m; ++v) row[v] = pad;
      continue;
    }
    for (int64_t v = 0; v < vlo; ++v) row[v] = pad;
    const scalar_t* src = planes + (y0 + u) * g.sH;
    if (g.sW == 1) {
      for (int64_t v = vlo; v < vhi; ++v) row[v] = src[col_off[v] + x0 + v];
    } else {
      for (int64_t v = vlo; v < vhi; ++v) row[v] = src[col_off[v] + (x0 + v) * g.sW];
    }
    for (int64_t v = vhi; v < m; ++v) row[v] = pad;
  }
}

// Forward driver: one task per (image b, group gi, cell row i); `each_window(b, fn)` calls
// fn(tile_index, y0, x0) for the windows of image b.
template <typename scalar_t, typename Windows>
void assemble_cell_rows(const Geometry& g, const Tables& tables, int64_t windows_per_image, const scalar_t* scores,
                        scalar_t pad, scalar_t* out, const Windows& each_window) {
  const int64_t mm = g.m * g.m;
  const int64_t work = windows_per_image * (g.m / g.k + 1) * g.m;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work));
  at::parallel_for(0, g.N * g.G * g.k, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % g.k, gi = (t / g.k) % g.G, b = t / (g.k * g.G);
      const scalar_t* planes = scores + b * g.sN + (gi * g.kk() + i * g.k) * g.sC;
      each_window(b, gi, [&](int64_t tile, int64_t y0, int64_t x0) {
        copy_cell_row(g, tables, planes, i, y0, x0, pad, out + tile * mm);
      });
    }
  });
}

// Adds the rows of cell row i of one gradient tile into k accumulator planes (H, W), one per
// column cell j (plane j holds channel gi * k * k + i * k + j).
template <typename scalar_t, typename acc_t>
inline void add_cell_row(const Geometry& g, const Tables& t, const scalar_t* tile, int64_t i, int64_t y0, int64_t x0,
                         acc_t* planes) {
  int64_t ulo, uhi, vlo, vhi;
  valid_span(y0, g.m, g.H, ulo, uhi);
  valid_span(x0, g.m, g.W, vlo, vhi);
  const int64_t ua = std::max(t.cb[i], ulo), ue = std::min(t.cb[i + 1], uhi);
  const int64_t plane = g.H * g.W;
  for (int64_t u = ua; u < ue; ++u) {
    const scalar_t* src = tile + u * g.m;
    acc_t* row = planes + (y0 + u) * g.W + x0;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t va = std::max(t.cb[j], vlo), ve = std::min(t.cb[j + 1], vhi);
      acc_t* dst = row + j * plane;
      for (int64_t v = va; v < ve; ++v) dst[v] += static_cast<acc_t>(src[v]);
    }
  }
}

Tensor ps_assemble_cpu(const Tensor& scores, const Tensor& windows_in, int64_t k, int64_t m, double pad_value) {
  check_float(scores, "scores");
  check_windows(windows_in, scores);
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, 1);
  const Tensor windows = windows_in.contiguous();
  const int64_t R = windows.size(0);
  Tensor out = fresh_output({R, g.G, m, m}, scores.options());
  if (out.numel() == 0) return out;
  const Tables tables(g, g.sC);
  const int64_t* win = windows.const_data_ptr<int64_t>();
  // Windows grouped by image (stable); rows with an invalid batch index are all pad.
  std::vector<int64_t> start(g.N + 1, 0), by_image, invalid;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = win[3 * r];
    if (b >= 0 && b < g.N) ++start[b + 1];
  }
  for (int64_t b = 0; b < g.N; ++b) start[b + 1] += start[b];
  by_image.resize(start[g.N]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t b = win[3 * r];
      if (b >= 0 && b < g.N)
        by_image[fill[b]++] = r;
      else
        invalid.push_back(r);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_cpu", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    assemble_cell_rows<scalar_t>(g, tables, R / std::max<int64_t>(1, g.N), src, pad, dst,
                                 [&](int64_t b, int64_t gi, auto&& fn) {
                                   for (int64_t p = start[b]; p < start[b + 1]; ++p) {
                                     const int64_t r = by_image[p];
                                     fn(r * g.G + gi, win[3 * r + 1], win[3 * r + 2]);
                                   }
                                 });
    for (const int64_t r : invalid) std::fill(dst + r * g.G * m * m, dst + (r + 1) * g.G * m * m, pad);
  });
  return out;
}

Tensor ps_assemble_dense_cpu(const Tensor& scores, int64_t k, int64_t m, int64_t stride, double pad_value) {
  check_float(scores, "scores");
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, stride);
  Tensor out = fresh_output({g.N, g.G, g.Ho, g.Wo, m, m}, scores.options());
  if (out.numel() == 0) return out;
  const Tables tables(g, g.sC);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_dense_cpu", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    assemble_cell_rows<scalar_t>(g, tables, g.Ho * g.Wo, src, pad, dst, [&](int64_t b, int64_t gi, auto&& fn) {
      const int64_t first = (b * g.G + gi) * g.Ho * g.Wo;
      for (int64_t oy = 0; oy < g.Ho; ++oy)
        for (int64_t ox = 0; ox < g.Wo; ++ox)
          fn(first + oy * g.Wo + ox, oy * stride - g.half(), ox * stride - g.half());
    });
  });
  return out;
}

// Per task (b, g, i): the k score planes of cell row i of group g of image b (channels
// g * k * k + i * k + [0, k), contiguous in NCHW). Zero k accumulator planes, let
// `each_window(b, gi, i, fn)` call fn(tile, y0, x0) in summation order, write the planes out.
template <typename scalar_t, typename Windows>
void accumulate_cell_rows(const Geometry& g, const Tables& tables, int64_t windows_per_image, scalar_t* grad_scores,
                          const Windows& each_window) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t span = g.k * g.H * g.W;
  // Enough work per parallel chunk to pay for waking the thread pool (tiny inputs run inline).
  const int64_t work = span + windows_per_image * (g.m / g.k + 1) * g.m;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work));
  at::parallel_for(0, g.N * g.G * g.k, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> planes(span);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t % g.k, gi = (t / g.k) % g.G, b = t / (g.k * g.G);
      std::fill(planes.begin(), planes.end(), acc_t(0));
      each_window(b, gi, i, [&](const scalar_t* tile, int64_t y0, int64_t x0) {
        add_cell_row(g, tables, tile, i, y0, x0, planes.data());
      });
      scalar_t* dst = grad_scores + t * span;
      for (int64_t p = 0; p < span; ++p) dst[p] = static_cast<scalar_t>(planes[p]);
    }
  });
}

Tensor ps_assemble_backward_cpu(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                int64_t k, int64_t m) {
  const auto [g, grad, windows, out] = prepare_backward(grad_in, windows_in, scores_size, k, m);
  if (out.numel() == 0) return out;
  const int64_t R = windows.size(0);
  Tensor keys, order;
  std::tie(keys, order) = sort_windows(g, windows);
  const int64_t* kp = keys.const_data_ptr<int64_t>();
  const int64_t* op = order.const_data_ptr<int64_t>();
  const int64_t* win = windows.const_data_ptr<int64_t>();
  // Segment of image b in the sorted windows.
  std::vector<int64_t> seg(g.N + 1);
  for (int64_t b = 0; b <= g.N; ++b) seg[b] = search_sorted(kp, R, b * g.key_rows(), false);
  const Tables tables(g, 1);
  const std::vector<int64_t>& cb = tables.cb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_cell_rows<scalar_t>(g, tables, R / std::max<int64_t>(1, g.N), out.mutable_data_ptr<scalar_t>(), [&](int64_t b, int64_t gi, int64_t i, auto&& fn) {
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
  const auto [g, grad, windows, out] = prepare_dense_backward(grad_in, scores_size, k, m, stride);
  if (out.numel() == 0) return out;
  const Tables tables(g, 1);
  const std::vector<int64_t>& cb = tables.cb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_dense_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_cell_rows<scalar_t>(g, tables, g.Ho * g.Wo, out.mutable_data_ptr<scalar_t>(), [&](int64_t b, int64_t gi, int64_t i, auto&& fn) {
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
