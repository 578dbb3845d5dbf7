// Index math for InstanceFCN position-sensitive assembly, shared by the CPU (C++) and CUDA
// kernels so that the CPU tests exercise exactly the per-element logic the GPU runs.
//
// An m x m window is split into a k x k grid of cells; cell i along an axis covers the offsets
// u with floor(u * k / m) == i, i.e. [cell_begin(i), cell_begin(i + 1)), cell_begin(i) =
// ceil(i * m / k). Output element (r, g, u, v) of window r = (b, y0, x0) copies
//   scores[b, g * k * k + cell(u) * k + cell(v), y0 + u, x0 + v]
// or pad_value where (y0 + u, x0 + v) lies outside the map or b is not an image of the batch.
//
// Backward (a gather, no atomics): every score element (b, ch, y, x) sums the gradients of the
// output elements that copied it. For ch's cell (i, j) those come from windows of image b with
// y0 in (y - cell_begin(i + 1), y - cell_begin(i)] and x0 in (x - cell_begin(j + 1),
// x - cell_begin(j)]. The sparse op finds them by binary search in the windows sorted by
// key(b, y0) (stable, so equal keys keep window order); the dense op's windows form a regular
// grid and are enumerated directly. Both sum in ascending (y0, window index) order, the same
// order the CPU's per-plane accumulation uses, so CPU and CUDA gradients agree bitwise.
#pragma once

#include <cstdint>

#include "common.h"

namespace segkernels {
namespace ps_assemble {

SK_HD int64_t cell_of(int64_t u, int64_t k, int64_t m) { return u * k / m; }
SK_HD int64_t cell_begin(int64_t i, int64_t k, int64_t m) { return (i * m + k - 1) / k; }

// origin + off in [0, size), without forming origin + off (origin may be any int64).
SK_HD bool inside(int64_t origin, int64_t off, int64_t size) { return origin >= -off && origin < size - off; }

struct Geometry {
  int64_t N, C, H, W;      // scores
  int64_t sN, sC, sH, sW;  // scores strides, in elements (any layout)
  int64_t G, k, m;         // groups, grid, window
  int64_t stride;          // dense op: window grid stride
  int64_t Ho, Wo;          // dense op: window grid extent (ceil(H / stride), ceil(W / stride))

  SK_HD int64_t kk() const { return k * k; }
  SK_HD int64_t half() const { return m / 2; }
  // Sort key of a window for the sparse backward: rows of image b occupy
  // [b * key_rows(), (b + 1) * key_rows()); windows of an invalid image sort last.
  SK_HD int64_t key_rows() const { return H + m + 1; }
  SK_HD int64_t key(int64_t b, int64_t y0) const {
    if (b < 0 || b >= N) return N * key_rows();
    const int64_t yc = y0 < -m ? -m : (y0 > H ? H : y0);
    return b * key_rows() + yc + m;
  }
};

// Value of window (b, y0, x0) at (g, u, v).
template <typename scalar_t>
SK_HD scalar_t window_value(const Geometry& g, const scalar_t* __restrict__ scores, int64_t b, int64_t y0,
                            int64_t x0, int64_t gi, int64_t u, int64_t v, scalar_t pad) {
  if (b < 0 || b >= g.N || !inside(y0, u, g.H) || !inside(x0, v, g.W)) return pad;
  const int64_t ch = gi * g.kk() + cell_of(u, g.k, g.m) * g.k + cell_of(v, g.k, g.m);
  return scores[b * g.sN + ch * g.sC + (y0 + u) * g.sH + (x0 + v) * g.sW];
}

// The outputs are sequences of m x m tiles: tile t of the sparse output is (window t / G,
// group t % G); tile t of the dense output is (b, g, oy, ox) in row-major order. The CUDA
// forward gives each tile to a thread block (window decoded once per tile).
struct Tile {
  int64_t b, y0, x0, gi;
};

SK_HD Tile sparse_tile(const Geometry& g, const int64_t* __restrict__ windows, int64_t t) {
  const int64_t r = t / g.G;
  return Tile{windows[3 * r], windows[3 * r + 1], windows[3 * r + 2], t - r * g.G};
}

SK_HD Tile dense_tile(const Geometry& g, int64_t t) {
  const int64_t ox = t % g.Wo;
  t /= g.Wo;
  const int64_t oy = t % g.Ho;
  t /= g.Ho;
  const int64_t gi = t % g.G;
  return Tile{t / g.G, oy * g.stride - g.half(), ox * g.stride - g.half(), gi};
}

// Element idx in [0, m * m) of a tile.
template <typename scalar_t>
SK_HD scalar_t tile_element(const Geometry& g, const scalar_t* __restrict__ scores, const Tile& tile, int64_t idx,
                            scalar_t pad) {
  const int64_t u = idx / g.m;
  return window_value(g, scores, tile.b, tile.y0, tile.x0, tile.gi, u, idx - u * g.m, pad);
}

// Sparse forward: element e of the contiguous (R, G, m, m) output.
template <typename scalar_t>
SK_HD scalar_t forward_element(const Geometry& g, const scalar_t* __restrict__ scores,
                               const int64_t* __restrict__ windows, int64_t e, scalar_t pad) {
  const int64_t mm = g.m * g.m;
  const int64_t t = e / mm;
  return tile_element(g, scores, sparse_tile(g, windows, t), e - t * mm, pad);
}

// Dense forward: element e of the contiguous (N, G, Ho, Wo, m, m) output.
template <typename scalar_t>
SK_HD scalar_t dense_forward_element(const Geometry& g, const scalar_t* __restrict__ scores, int64_t e, scalar_t pad) {
  const int64_t mm = g.m * g.m;
  const int64_t t = e / mm;
  return tile_element(g, scores, dense_tile(g, t), e - t * mm, pad);
}

// Decoded score element (b, ch, y, x) of the contiguous (N, C, H, W) gradient, with its group
// and cell.
struct ScoreElement {
  int64_t b, ch, y, x, gi, i, j;
};

SK_HD ScoreElement decode_score(const Geometry& g, int64_t e) {
  ScoreElement s;
  s.x = e % g.W;
  int64_t t = e / g.W;
  s.y = t % g.H;
  t /= g.H;
  s.ch = t % g.C;
  s.b = t / g.C;
  s.gi = s.ch / g.kk();
  const int64_t cell = s.ch - s.gi * g.kk();
  s.i = cell / g.k;
  s.j = cell - s.i * g.k;
  return s;
}

// First position in sorted[0, n) whose value is >= key (upper = false) or > key (upper = true).
SK_HD int64_t search_sorted(const int64_t* __restrict__ sorted, int64_t n, int64_t key, bool upper) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    const bool go_right = upper ? sorted[mid] <= key : sorted[mid] < key;
    if (go_right)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Sparse backward: gradient of score element e (contiguous NCHW) from grad_output (R, G, m, m)
// contiguous. keys: the windows' keys sorted ascending (stable); order: window index of each.
template <typename scalar_t, typename acc_t>
SK_HD acc_t backward_gather_element(const Geometry& g, const scalar_t* __restrict__ grad,
                                    const int64_t* __restrict__ windows, const int64_t* __restrict__ keys,
                                    const int64_t* __restrict__ order, int64_t R, int64_t e) {
  const ScoreElement s = decode_score(g, e);
  const int64_t u_lo = cell_begin(s.i, g.k, g.m), u_hi = cell_begin(s.i + 1, g.k, g.m);
  const int64_t v_lo = cell_begin(s.j, g.k, g.m), v_hi = cell_begin(s.j + 1, g.k, g.m);
  // y0 in [y - u_hi + 1, y - u_lo], a sub-range of [-m + 1, H - 1] where key() does not clamp.
  const int64_t first = search_sorted(keys, R, g.key(s.b, s.y - u_hi + 1), false);
  const int64_t last = search_sorted(keys, R, g.key(s.b, s.y - u_lo), true);
  acc_t acc = acc_t(0);
  for (int64_t p = first; p < last; ++p) {
    const int64_t r = order[p];
    const int64_t x0 = windows[3 * r + 2];
    if (x0 > s.x - v_lo || x0 <= s.x - v_hi) continue;
    const int64_t u = s.y - windows[3 * r + 1], v = s.x - x0;
    acc += static_cast<acc_t>(grad[((r * g.G + s.gi) * g.m + u) * g.m + v]);
  }
  return acc;
}

// Window-grid indices o with o * stride - half + [lo, hi) covering position p: o in [first, last).
SK_HD void dense_range(int64_t p, int64_t lo, int64_t hi, int64_t stride, int64_t half, int64_t count,
                       int64_t& first, int64_t& last) {
  // o * stride in [p + half - hi + 1, p + half - lo]
  first = ceil_div(p + half - hi + 1, stride);
  last = floor_div(p + half - lo, stride) + 1;
  if (first < 0) first = 0;
  if (last > count) last = count;
  if (last < first) last = first;
}

// Dense backward: gradient of score element e (contiguous NCHW) from grad_output
// (N, G, Ho, Wo, m, m) contiguous, summed in (oy, ox) order.
template <typename scalar_t, typename acc_t>
SK_HD acc_t dense_backward_gather_element(const Geometry& g, const scalar_t* __restrict__ grad, int64_t e) {
  const ScoreElement s = decode_score(g, e);
  const int64_t u_lo = cell_begin(s.i, g.k, g.m), u_hi = cell_begin(s.i + 1, g.k, g.m);
  const int64_t v_lo = cell_begin(s.j, g.k, g.m), v_hi = cell_begin(s.j + 1, g.k, g.m);
  int64_t oy0, oy1, ox0, ox1;
  dense_range(s.y, u_lo, u_hi, g.stride, g.half(), g.Ho, oy0, oy1);
  dense_range(s.x, v_lo, v_hi, g.stride, g.half(), g.Wo, ox0, ox1);
  const int64_t mm = g.m * g.m;
  const scalar_t* plane = grad + (s.b * g.G + s.gi) * g.Ho * g.Wo * mm;
  acc_t acc = acc_t(0);
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const int64_t u = s.y + g.half() - oy * g.stride;
    for (int64_t ox = ox0; ox < ox1; ++ox) {
      const int64_t v = s.x + g.half() - ox * g.stride;
      acc += static_cast<acc_t>(plane[(oy * g.Wo + ox) * mm + u * g.m + v]);
    }
  }
  return acc;
}

}  // namespace ps_assemble
}  // namespace segkernels
