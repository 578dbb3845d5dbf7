// CPU kernels for InstanceFCN position-sensitive assembly (sparse windows and the dense grid).
// The index math lives in ps_assemble.h and is shared with the CUDA kernels.
//
// Forward, two orders. Few or sparse windows: one task per (image, group, cell row i, window
// chunk): the k score planes of cells (i, 0..k-1) stay cache-resident while the windows write
// their tile rows of cell row i, one contiguous run per column cell; pads around. Heavily
// overlapping windows (output >= 4x the scores, the dense grid): one task per (image, group,
// window chunk), each tile written whole, since cell-row passes fetched every output line k
// times.
// Backward: one task per (image, group, cell row i, band of map rows): k accumulator planes
// (the channels of cells (i, 0..k-1); the output itself for float32/64, a float scratch for
// 16-bit types) are zeroed, then every window reaching the band adds the rows of cell row i of
// its gradient tile, windows taken in ascending (y0, window index) order, the tiles a few
// windows ahead prefetched. That is the order the CUDA gather sums in, so both devices give
// the same bits whatever the bands, and nothing is shared between tasks: deterministic, no
// atomics. The per-element functions the CUDA kernels run are exposed on the CPU as test-only
// ops in testing builds (ps_assemble_testing.cpp).
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

std::vector<int64_t> cell_table(const Geometry& g) {
  std::vector<int64_t> cb(g.k + 1);
  for (int64_t i = 0; i <= g.k; ++i) cb[i] = cell_begin(i, g.k, g.m);
  return cb;
}

// Cell boundaries cb[0..k]: cell i covers tile rows (and columns) [cb[i], cb[i + 1]).
struct Tables {
  std::vector<int64_t> cb;
  explicit Tables(const Geometry& g) : cb(cell_table(g)) {}
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
  for (int64_t u = t.cb[i]; u < t.cb[i + 1]; ++u) {
    scalar_t* row = out + u * m;
    if (u < ulo || u >= uhi) {
      for (int64_t v = 0; v < m; ++v) row[v] = pad;
      continue;
    }
    for (int64_t v = 0; v < vlo; ++v) row[v] = pad;
    const scalar_t* src = planes + (y0 + u) * g.sH;
    // One run per column cell, read from that cell's plane.
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t va = std::max(t.cb[j], vlo), ve = std::min(t.cb[j + 1], vhi);
      const scalar_t* __restrict cell_src = src + j * g.sC + x0 * g.sW;
      if (g.sW == 1) {
        for (int64_t v = va; v < ve; ++v) row[v] = cell_src[v];
      } else {
        for (int64_t v = va; v < ve; ++v) row[v] = cell_src[v * g.sW];
      }
    }
    for (int64_t v = vhi; v < m; ++v) row[v] = pad;
  }
}

// Brings the rows [u0, u1) of a gradient tile towards the cache ahead of use. The backward reads
// each tile in short runs (one cell row, a few hundred bytes, tiles apart): without this the
// dense backward waited on those loads most of its time (EPYC VM).
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* tile, int64_t u0, int64_t u1, int64_t m) {
#if defined(__GNUC__)
  const char* p = reinterpret_cast<const char*>(tile + u0 * m);
  const char* e = reinterpret_cast<const char*>(tile + u1 * m);
  for (; p < e; p += 64) __builtin_prefetch(p, 0, 0);
#else
  (void)tile;
  (void)u0;
  (void)u1;
  (void)m;
#endif
}

// Tiles ahead that the backward prefetches.
constexpr int64_t kPrefetchTiles = 4;

// Parts to split each (image, group, cell row) task into (window chunks forward, row bands
// backward) so that small inputs, one image of one group being only k tasks, still occupy
// every thread (5 tasks on 2 threads left one idle 40% of the time).
inline int64_t task_parts(const Geometry& g, int64_t limit) {
  const int64_t tasks = g.N * g.G * g.k;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  if (tasks >= want || limit <= 1) return 1;
  return std::min<int64_t>(limit, ceil_div(want, tasks));
}

// Forward driver: one task per (image b, group gi, cell row i, window chunk c of `chunks`);
// `each_window(b, gi, c, chunks, fn)` calls fn(tile_index, y0, x0) for that chunk of the
// windows of image b.
template <typename scalar_t, typename Windows>
void assemble_cell_rows(const Geometry& g, const Tables& tables, int64_t windows_per_image, const scalar_t* scores,
                        scalar_t pad, scalar_t* out, const Windows& each_window) {
  const int64_t mm = g.m * g.m;
  const int64_t chunks = task_parts(g, windows_per_image);
  const int64_t work = windows_per_image / chunks * (g.m / g.k + 1) * g.m;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work));
  at::parallel_for(0, g.N * g.G * g.k * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % chunks, task = t / chunks;
      const int64_t i = task % g.k, gi = (task / g.k) % g.G, b = task / (g.k * g.G);
      const scalar_t* planes = scores + b * g.sN + (gi * g.kk() + i * g.k) * g.sC;
      each_window(b, gi, c, chunks, [&](int64_t tile, int64_t y0, int64_t x0) {
        copy_cell_row(g, tables, planes, i, y0, x0, pad, out + tile * mm);
      });
    }
  });
}

// The whole tile of window (y0, x0) from the k * k planes of its group.
template <typename scalar_t>
inline void copy_tile(const Geometry& g, const Tables& t, const scalar_t* group_planes, int64_t y0, int64_t x0,
                      scalar_t pad, scalar_t* out) {
  for (int64_t i = 0; i < g.k; ++i) copy_cell_row(g, t, group_planes + i * g.k * g.sC, i, y0, x0, pad, out);
}

// Forward driver for heavily overlapping windows (the dense grid): one task per (image, group,
// chunk of about 32K output elements), each tile written whole. When the output is many times
// the scores it reads, writing it in cell-row passes (assemble_cell_rows) fetched and evicted
// every output line k times: 2x slower for the dense benchmark on the EPYC VM. The group's
// k * k planes are re-read by every window and stay cached.
template <typename scalar_t, typename Windows>
void assemble_tiles(const Geometry& g, const Tables& tables, int64_t windows_per_image, const scalar_t* scores,
                    scalar_t pad, scalar_t* out, const Windows& each_window) {
  const int64_t mm = g.m * g.m;
  const int64_t chunks = std::max<int64_t>(1, windows_per_image * mm / 32768);
  at::parallel_for(0, g.N * g.G * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % chunks, bg = t / chunks, gi = bg % g.G, b = bg / g.G;
      const scalar_t* planes = scores + b * g.sN + gi * g.kk() * g.sC;
      each_window(b, gi, c, chunks, [&](int64_t tile, int64_t y0, int64_t x0) {
        copy_tile(g, tables, planes, y0, x0, pad, out + tile * mm);
      });
    }
  });
}

// Tile order when the windows read each score many times over (output >= 4x the scores).
inline bool write_whole_tiles(const Geometry& g, int64_t windows_per_image) {
  return windows_per_image * g.m * g.m >= 4 * g.kk() * g.H * g.W;
}

// Adds the rows of cell row i of one gradient tile that fall in rows [y_lo, y_hi) of the map
// into k accumulator planes, one per column cell j (plane j holds channel
// gi * k * k + i * k + j): `planes` points at row y_lo of plane 0, planes are `pstride` apart.
template <typename scalar_t, typename acc_t>
inline void add_cell_row(const Geometry& g, const Tables& t, const scalar_t* tile, int64_t i, int64_t y0, int64_t x0,
                         acc_t* planes, int64_t pstride, int64_t y_lo, int64_t y_hi) {
  int64_t ulo, uhi, vlo, vhi;
  valid_span(y0, g.m, g.H, ulo, uhi);
  valid_span(x0, g.m, g.W, vlo, vhi);
  const int64_t ua = std::max({t.cb[i], ulo, y_lo - y0}), ue = std::min({t.cb[i + 1], uhi, y_hi - y0});
  for (int64_t u = ua; u < ue; ++u) {
    const scalar_t* src = tile + u * g.m;
    acc_t* row = planes + (y0 + u - y_lo) * g.W + x0;
    for (int64_t j = 0; j < g.k; ++j) {
      const int64_t va = std::max(t.cb[j], vlo), ve = std::min(t.cb[j + 1], vhi);
      acc_t* dst = row + j * pstride;
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
  const Tables tables(g);
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
    const auto windows_of = [&](int64_t b, int64_t gi, int64_t c, int64_t chunks, auto&& fn) {
      const int64_t n = start[b + 1] - start[b];
      for (int64_t p = start[b] + n * c / chunks; p < start[b] + n * (c + 1) / chunks; ++p) {
        const int64_t r = by_image[p];
        fn(r * g.G + gi, win[3 * r + 1], win[3 * r + 2]);
      }
    };
    const int64_t per_image = R / std::max<int64_t>(1, g.N);
    if (write_whole_tiles(g, per_image))
      assemble_tiles<scalar_t>(g, tables, per_image, src, pad, dst, windows_of);
    else
      assemble_cell_rows<scalar_t>(g, tables, per_image, src, pad, dst, windows_of);
    for (const int64_t r : invalid) std::fill(dst + r * g.G * m * m, dst + (r + 1) * g.G * m * m, pad);
  });
  return out;
}

Tensor ps_assemble_dense_cpu(const Tensor& scores, int64_t k, int64_t m, int64_t stride, double pad_value) {
  check_float(scores, "scores");
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, stride);
  Tensor out = fresh_output({g.N, g.G, g.Ho, g.Wo, m, m}, scores.options());
  if (out.numel() == 0) return out;
  const Tables tables(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_dense_cpu", [&] {
    const scalar_t* src = scores.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t pad = static_cast<scalar_t>(pad_value);
    const int64_t total = g.Ho * g.Wo;
    const auto windows_of = [&](int64_t b, int64_t gi, int64_t c, int64_t chunks, auto&& fn) {
      const int64_t first = (b * g.G + gi) * total;
      for (int64_t j = total * c / chunks; j < total * (c + 1) / chunks; ++j) {
        const int64_t oy = j / g.Wo, ox = j - oy * g.Wo;
        fn(first + j, oy * stride - g.half(), ox * stride - g.half());
      }
    };
    if (write_whole_tiles(g, total))
      assemble_tiles<scalar_t>(g, tables, total, src, pad, dst, windows_of);
    else
      assemble_cell_rows<scalar_t>(g, tables, total, src, pad, dst, windows_of);
  });
  return out;
}

// Per task (b, g, i, band): rows [y_lo, y_hi) of the k score planes of cell row i of group g
// of image b (channels g * k * k + i * k + [0, k), contiguous in NCHW). Zero k accumulators,
// let `each_window(b, gi, i, y_lo, y_hi, fn)` call fn(tile, y0, x0) in summation order for the
// windows that reach those rows, write the rows out. Every score element is summed over the
// same windows in the same order whatever the bands, so the bits do not depend on the threads.
// float32 and float64 accumulate in the output itself; 16-bit types in a float scratch.
template <typename scalar_t, typename Windows>
void accumulate_cell_rows(const Geometry& g, const Tables& tables, int64_t windows_per_image, scalar_t* grad_scores,
                          const Windows& each_window) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool in_place = std::is_same_v<acc_t, scalar_t>;
  const int64_t plane = g.H * g.W;
  const int64_t bands = task_parts(g, g.H);
  const int64_t band_rows = ceil_div(g.H, bands);
  // Enough work per parallel chunk to pay for waking the thread pool (tiny inputs run inline).
  const int64_t work = (g.k * plane + windows_per_image * (g.m / g.k + 1) * g.m) / bands;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work));
  at::parallel_for(0, g.N * g.G * g.k * bands, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(in_place ? 0 : g.k * band_rows * g.W);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t band = t % bands, task = t / bands;
      const int64_t i = task % g.k, gi = (task / g.k) % g.G, b = task / (g.k * g.G);
      const int64_t y_lo = band * band_rows, y_hi = std::min(g.H, y_lo + band_rows);
      if (y_lo >= y_hi) continue;
      const int64_t rows = (y_hi - y_lo) * g.W;
      scalar_t* dst = grad_scores + task * g.k * plane + y_lo * g.W;
      acc_t* acc = in_place ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      const int64_t pstride = in_place ? plane : rows;
      for (int64_t j = 0; j < g.k; ++j) std::fill(acc + j * pstride, acc + j * pstride + rows, acc_t(0));
      each_window(b, gi, i, y_lo, y_hi, [&](const scalar_t* tile, int64_t y0, int64_t x0) {
        add_cell_row(g, tables, tile, i, y0, x0, acc, pstride, y_lo, y_hi);
      });
      if (!in_place) {
        for (int64_t j = 0; j < g.k; ++j)
          for (int64_t p = 0; p < rows; ++p) dst[j * plane + p] = static_cast<scalar_t>(acc[j * pstride + p]);
      }
    }
  });
}

// The windows' sort keys (Geometry::key) ascending and the window index of each, stable: the
// order the CUDA backward sums in. Host arrays; the CUDA path sorts on the device instead.
void sort_windows_host(const Geometry& g, const int64_t* win, int64_t R, std::vector<int64_t>& keys,
                       std::vector<int64_t>& order) {
  std::vector<int64_t> key(R);
  for (int64_t r = 0; r < R; ++r) key[r] = g.key(win[3 * r], win[3 * r + 1]);
  order.resize(R);
  for (int64_t r = 0; r < R; ++r) order[r] = r;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  keys.resize(R);
  for (int64_t p = 0; p < R; ++p) keys[p] = key[order[p]];
}

Tensor ps_assemble_backward_cpu(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                int64_t k, int64_t m) {
  const auto [g, grad, windows, out] = prepare_backward(grad_in, windows_in, scores_size, k, m);
  if (out.numel() == 0) return out;
  const int64_t R = windows.size(0);
  const int64_t* win = windows.const_data_ptr<int64_t>();
  std::vector<int64_t> keys, order;
  sort_windows_host(g, win, R, keys, order);
  const int64_t* kp = keys.data();
  const int64_t* op = order.data();
  // Segment of image b in the sorted windows.
  std::vector<int64_t> seg(g.N + 1);
  for (int64_t b = 0; b <= g.N; ++b) seg[b] = search_sorted(kp, R, b * g.key_rows(), false);
  const Tables tables(g);
  const std::vector<int64_t>& cb = tables.cb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_cell_rows<scalar_t>(
        g, tables, R / std::max<int64_t>(1, g.N), out.mutable_data_ptr<scalar_t>(),
        [&](int64_t b, int64_t gi, int64_t i, int64_t y_lo, int64_t y_hi, auto&& fn) {
          // Windows whose cell row i reaches rows [y_lo, y_hi): y0 in
          // [y_lo - cb[i+1] + 1, y_hi - 1 - cb[i]], inside the range where key() does not clamp.
          const int64_t n = seg[b + 1] - seg[b];
          const int64_t first = search_sorted(kp + seg[b], n, g.key(b, y_lo - cb[i + 1] + 1), false);
          const int64_t last = search_sorted(kp + seg[b], n, g.key(b, y_hi - 1 - cb[i]), true);
          for (int64_t p = seg[b] + first; p < seg[b] + last; ++p) {
            if (p + kPrefetchTiles < seg[b] + last)
              prefetch_rows(go + (op[p + kPrefetchTiles] * g.G + gi) * mm, cb[i], cb[i + 1], m);
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
  const Tables tables(g);
  const std::vector<int64_t>& cb = tables.cb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_dense_backward_cpu", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    const int64_t mm = m * m;
    accumulate_cell_rows<scalar_t>(
        g, tables, g.Ho * g.Wo, out.mutable_data_ptr<scalar_t>(),
        [&](int64_t b, int64_t gi, int64_t i, int64_t y_lo, int64_t y_hi, auto&& fn) {
          const scalar_t* plane = go + (b * g.G + gi) * g.Ho * g.Wo * mm;
          // Window rows oy whose cell row i meets rows [y_lo, y_hi): oy * stride - half +
          // [cb[i], cb[i + 1]) covers y_lo once stretched by the band's other rows.
          int64_t oy0 = 0, oy1 = 0;
          dense_range(y_lo, cb[i] - (y_hi - 1 - y_lo), cb[i + 1], stride, g.half(), g.Ho, oy0, oy1);
          const scalar_t* last = plane + (oy1 * g.Wo) * mm;
          for (int64_t oy = oy0; oy < oy1; ++oy)
            for (int64_t ox = 0; ox < g.Wo; ++ox) {
              const scalar_t* tile = plane + (oy * g.Wo + ox) * mm;
              if (tile + kPrefetchTiles * mm < last) prefetch_rows(tile + kPrefetchTiles * mm, cb[i], cb[i + 1], m);
              fn(tile, oy * stride - g.half(), ox * stride - g.half());
            }
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
}

}  // namespace ps_assemble
}  // namespace segkernels
