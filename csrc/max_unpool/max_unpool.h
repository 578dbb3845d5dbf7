// Index math for max-pooling with indices and max-unpooling, shared by the CPU (C++) and
// CUDA kernels so that the CPU tests exercise exactly the logic the GPU runs.
//
// Everything is written for three spatial axes (z, y, x); 2-D maps use a depth-1 z axis
// with kernel 1, stride 1, padding 0, dilation 1, which reduces every formula to 2-D.
//
// Layouts: a tensor is addressed as ((outer * D + z) * H + y) * W + x) * inner + c where
//   channels-first (NCHW / NCDHW): outer = n * C + c, inner = 1, c = 0
//   channels-last  (NHWC / NDHWC): outer = n,         inner = C
// so one code path serves both without copies.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace segkernels {
namespace max_unpool {

// One spatial axis. "full" is the large map (pooling input / unpooling output),
// "pooled" the small one. I is the index arithmetic type: int64 everywhere, and int32 for the
// CUDA kernels that run one thread per element, when every offset fits (a GPU emulates 64-bit
// integer arithmetic, and a 64-bit division is a subroutine call).
template <typename I>
struct AxisOf {
  I full;
  I pooled;
  I kernel;
  I stride;
  I padding;
  I dilation;
};
using Axis = AxisOf<int64_t>;

template <typename I>
struct GeometryOf {
  AxisOf<I> ax[3];  // z, y, x
  I inner;          // 1 for channels-first, C for channels-last

  SK_HD I full_plane() const { return ax[0].full * ax[1].full * ax[2].full; }
  SK_HD I pooled_plane() const { return ax[0].pooled * ax[1].pooled * ax[2].pooled; }
  SK_HD I window_size() const { return ax[0].kernel * ax[1].kernel * ax[2].kernel; }
};
using Geometry = GeometryOf<int64_t>;

// The same geometry in a narrower index type; callers check first that every offset fits.
template <typename I>
inline GeometryOf<I> narrow_geometry(const Geometry& g) {
  GeometryOf<I> n;
  for (int i = 0; i < 3; ++i) {
    const Axis& a = g.ax[i];
    n.ax[i] = AxisOf<I>{static_cast<I>(a.full),    static_cast<I>(a.pooled),  static_cast<I>(a.kernel),
                        static_cast<I>(a.stride),  static_cast<I>(a.padding), static_cast<I>(a.dilation)};
  }
  n.inner = static_cast<I>(g.inner);
  return n;
}

// A map's extents (D, H, W) and channels-last channel count as dividers, for decoding flat
// element numbers.
template <typename I>
struct MapDividers {
  typename DividerFor<I>::type z, y, x, inner;
};

// What the one-thread-per-element kernels need: the geometry in index type I, and its
// divisors prepared once on the host (FastDivider in 32 bits).
template <typename I>
struct IndexPlan {
  using Div = typename DividerFor<I>::type;
  GeometryOf<I> g;
  MapDividers<I> full, pooled;
  Div kernel[3];  // z, y, x
};

template <typename I>
inline IndexPlan<I> index_plan(const Geometry& geometry) {
  using Div = typename DividerFor<I>::type;
  IndexPlan<I> p;
  p.g = narrow_geometry<I>(geometry);
  const AxisOf<I>* a = p.g.ax;
  // One map may be empty while the other is not (an unpool to a 0 x 0 output, a pooling of a
  // zero-height map with padding); no element of an empty map is decoded, but its divider is
  // still built, and a divider needs d >= 1.
  const auto div = [](I extent) { return Div(extent > 0 ? extent : I(1)); };
  p.full = MapDividers<I>{div(a[0].full), div(a[1].full), div(a[2].full), div(p.g.inner)};
  p.pooled = MapDividers<I>{div(a[0].pooled), div(a[1].pooled), div(a[2].pooled), div(p.g.inner)};
  for (int i = 0; i < 3; ++i) p.kernel[i] = div(a[i].kernel);
  return p;
}

// Element e of a map as (outer, z, y, x, channel).
template <typename I>
SK_HD void decode_element(I e, const MapDividers<I>& m, I& o, I& z, I& y, I& x, I& c) {
  I rest = e;
  c = 0;
  if (m.inner.divisor != 1) {
    rest = m.inner.div(e);
    c = e - rest * m.inner.divisor;
  }
  const I s = m.x.div(rest);
  x = rest - s * m.x.divisor;
  const I t = m.y.div(s);
  y = s - t * m.y.divisor;
  o = m.z.div(t);
  z = t - o * m.z.divisor;
}

// Position of element e of a tensor in the Geometry's layout: outer index, channel (within
// `inner`) and spatial coordinates, on the pooled map (pooled = true) or the full one.
struct Position {
  int64_t o, c, z, y, x;
  int64_t flat;  // (z * H + y) * W + x on that map
};

SK_HD Position decode_position(const Geometry& g, int64_t e, bool pooled) {
  const int64_t D = pooled ? g.ax[0].pooled : g.ax[0].full;
  const int64_t H = pooled ? g.ax[1].pooled : g.ax[1].full;
  const int64_t W = pooled ? g.ax[2].pooled : g.ax[2].full;
  const int64_t per_outer = D * H * W * g.inner;
  Position p;
  p.o = e / per_outer;
  const int64_t rem = e - p.o * per_outer;
  p.flat = rem / g.inner;
  p.c = rem - p.flat * g.inner;
  p.x = p.flat % W;
  p.y = (p.flat / W) % H;
  p.z = p.flat / (W * H);
  return p;
}

// Row r = (outer * D + z) * H + y of a map with extents D, H.
SK_HD void decode_row(int64_t r, int64_t D, int64_t H, int64_t& o, int64_t& z, int64_t& y) {
  y = r % H;
  z = (r / H) % D;
  o = r / (H * D);
}

// Coordinate of tap t of window pc on the full map (may lie in the padding).
SK_HD int64_t tap_coord(const Axis& a, int64_t pc, int64_t t) {
  return pc * a.stride - a.padding + t * a.dilation;
}

// Tap number of full coordinate q inside window pc, or -1 when q is not one of its taps.
SK_HD int64_t window_tap(const Axis& a, int64_t pc, int64_t q) {
  const int64_t off = q - (pc * a.stride - a.padding);
  if (off < 0 || off % a.dilation != 0) return -1;
  const int64_t t = off / a.dilation;
  return t < a.kernel ? t : -1;
}

// Taps [first, last) of window pc that fall inside the full map along one axis (loops over
// them cost the map's extent, not the kernel's, whatever the kernel size).
SK_HD void valid_taps(const Axis& a, int64_t pc, int64_t& first, int64_t& last) {
  const int64_t start = pc * a.stride - a.padding;
  first = start < 0 ? ceil_div(-start, a.dilation) : 0;
  const int64_t room = a.full - 1 - start;  // last in-bounds offset from the window start
  last = room < 0 ? 0 : (room / a.dilation + 1 < a.kernel ? room / a.dilation + 1 : a.kernel);
}

// Pooled coordinates [lo, hi] whose window span may contain full coordinate q
// (empty when lo > hi); callers confirm each with window_tap.
SK_HD void window_candidates(const Axis& a, int64_t q, int64_t& lo, int64_t& hi) {
  hi = floor_div(q + a.padding, a.stride);
  lo = ceil_div(q + a.padding - (a.kernel - 1) * a.dilation, a.stride);
  if (lo < 0) lo = 0;
  if (hi > a.pooled - 1) hi = a.pooled - 1;
}

// Windows on this axis never share a coordinate.
SK_HD bool axis_disjoint(const Axis& a) { return a.stride >= (a.kernel - 1) * a.dilation + 1; }

// For a disjoint axis: the only window holding q as a tap, or false when q is a gap.
SK_HD bool single_window(const Axis& a, int64_t q, int64_t& pc, int64_t& tap) {
  int64_t lo, hi;
  window_candidates(a, q, lo, hi);
  for (int64_t p = hi; p >= lo; --p) {
    const int64_t t = window_tap(a, p, q);
    if (t >= 0) {
      pc = p;
      tap = t;
      return true;
    }
  }
  return false;
}

template <typename index_t>
struct IndexKind {
  // compact = uint8 in-window offsets (dz * kH + dy) * kW + dx; otherwise int64 plane-flat indices.
  static constexpr bool compact = sizeof(index_t) == 1;
};

// What a stored index says, for checking and for the slow paths.
enum EntryStatus : int { kInWindow = 0, kOutOfRange = 1, kOutsideWindow = 2 };

// Classifies entry (pz, py, px) holding `id` and returns its plane-flat target on the full map.
// kOutOfRange: the index names no element of the full map (or a compact offset >= window size,
// or a compact tap that falls in the padding / past the output). kOutsideWindow (int64 only):
// a valid element of the full map that is not one of the entry's own window taps.
template <typename index_t>
SK_HD int entry_status(const Geometry& g, int64_t pz, int64_t py, int64_t px, index_t id, int64_t& target) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  if (IndexKind<index_t>::compact) {
    const int64_t off = static_cast<int64_t>(id);
    if (off >= g.window_size()) return kOutOfRange;
    const int64_t tz = off / (ay.kernel * ax.kernel);
    const int64_t rem = off - tz * ay.kernel * ax.kernel;
    const int64_t ty = rem / ax.kernel;
    const int64_t tx = rem - ty * ax.kernel;
    const int64_t z = tap_coord(az, pz, tz), y = tap_coord(ay, py, ty), x = tap_coord(ax, px, tx);
    if (z < 0 || z >= az.full || y < 0 || y >= ay.full || x < 0 || x >= ax.full) return kOutOfRange;
    target = (z * ay.full + y) * ax.full + x;
    return kInWindow;
  } else {
    const int64_t flat = static_cast<int64_t>(id);
    if (flat < 0 || flat >= g.full_plane()) return kOutOfRange;
    target = flat;
    const int64_t z = flat / (ay.full * ax.full);
    const int64_t rem = flat - z * ay.full * ax.full;
    const int64_t y = rem / ax.full;
    const int64_t x = rem - y * ax.full;
    const bool inside = window_tap(az, pz, z) >= 0 && window_tap(ay, py, y) >= 0 && window_tap(ax, px, x) >= 0;
    return inside ? kInWindow : kOutsideWindow;
  }
}

// ---------------------------------------------------------------------------------------------
// First tap of window pc that lies inside the map on this axis (the window may start in the
// padding; the numerator is then positive, so the division rounds up).
template <typename I>
SK_HD I first_valid_tap(const AxisOf<I>& a, I pc) {
  const I before = a.padding - pc * a.stride;
  return before > 0 ? (before + a.dilation - 1) / a.dilation : I(0);
}

// Max-pooling forward: one pooled element. Matches ATen exactly: taps are scanned in (z, y, x)
// order, a value replaces the running max when it is strictly greater or NaN (so the first of
// equal maxima wins, and the last NaN wins), and a window of -inf reports its first valid tap.
// The CPU kernels run their own row-wise version of this (max_unpool_cpu.cpp); the CUDA kernel
// runs this one, in I = int32 when pool_fits_int32 allows, and the CPU tests reach it through
// the test-only op _max_pool_logic.
template <typename scalar_t, typename acc_t, typename I>
SK_HD void pool_max_element(const GeometryOf<I>& g, const scalar_t* input, I outer, I pz, I py, I px, I c,
                            scalar_t& max_value, I& flat_index, I& tap_index) {
  const AxisOf<I>& az = g.ax[0];
  const AxisOf<I>& ay = g.ax[1];
  const AxisOf<I>& ax = g.ax[2];
  const I tz0 = first_valid_tap(az, pz), ty0 = first_valid_tap(ay, py), tx0 = first_valid_tap(ax, px);
  const I z0 = pz * az.stride - az.padding, y0 = py * ay.stride - ay.padding, x0 = px * ax.stride - ax.padding;
  const scalar_t* base = input + outer * g.full_plane() * g.inner + c;
  acc_t best = -static_cast<acc_t>(INFINITY);
  I best_flat = ((z0 + tz0 * az.dilation) * ay.full + y0 + ty0 * ay.dilation) * ax.full + x0 + tx0 * ax.dilation;
  I best_tap = (tz0 * ay.kernel + ty0) * ax.kernel + tx0;
  for (I tz = tz0; tz < az.kernel; ++tz) {
    const I z = z0 + tz * az.dilation;
    if (z >= az.full) break;
    for (I ty = ty0; ty < ay.kernel; ++ty) {
      const I y = y0 + ty * ay.dilation;
      if (y >= ay.full) break;
      const I row = (z * ay.full + y) * ax.full;
      const I tap_row = (tz * ay.kernel + ty) * ax.kernel;
      for (I tx = tx0; tx < ax.kernel; ++tx) {
        const I x = x0 + tx * ax.dilation;
        if (x >= ax.full) break;
        const acc_t v = static_cast<acc_t>(base[(row + x) * g.inner]);
        if (v > best || v != v) {
          best = v;
          best_flat = row + x;
          best_tap = tap_row + tx;
        }
      }
    }
  }
  max_value = static_cast<scalar_t>(best);
  flat_index = best_flat;
  tap_index = best_tap;
}

// ---------------------------------------------------------------------------------------------
// Max-pooling of wide or overlapping windows on NCHW 2-D maps without dilation, a tile of
// kSeparableTileRows x kSeparableTileCols pooled outputs of one plane at a time (the CUDA
// kernel; the CPU runs the same two passes plane by plane, pool_plane_separable). The row
// pass takes, for every input row the tile's windows reach, the maximum over each window's
// columns into a scratch tile (shared memory on CUDA); the column pass takes the maximum of
// those over each window's rows: kh + kw compares per output instead of kh * kw. The first
// maximum in scan order (rows, then columns) is the first one of the first row reaching the
// window's maximum, and the last NaN the last one of the last row holding a NaN, so values and
// indices are pool_max_element's. The CPU tests run these functions through the test-only op
// _max_pool_separable_logic.
constexpr int kSeparableTileRows = 16;
constexpr int kSeparableTileCols = 32;

// Input rows a tile's windows reach: the scratch tile's height.
template <typename I>
SK_HD I separable_tile_rows(const AxisOf<I>& ay) {
  return (kSeparableTileRows - 1) * ay.stride + ay.kernel;
}

// Row pass, item r * kSeparableTileCols + j of the tile whose first output is (py0, px0): the
// maximum over the valid columns of window px0 + j in input row py0 * stride - padding + r,
// and its column tap. Rows outside the map and columns past the last window are never read.
template <typename scalar_t, typename acc_t, typename I>
SK_HD void separable_row_item(const GeometryOf<I>& g, const scalar_t* plane, I py0, I px0, I item, acc_t* scratch_max,
                              int32_t* scratch_tap) {
  const AxisOf<I>& ay = g.ax[1];
  const AxisOf<I>& ax = g.ax[2];
  const I r = item / kSeparableTileCols;
  const I px = px0 + (item - r * kSeparableTileCols);
  const I y = py0 * ay.stride - ay.padding + r;
  acc_t best = -static_cast<acc_t>(INFINITY);
  I tap = 0;
  if (y >= 0 && y < ay.full && px < ax.pooled) {
    const I tx0 = first_valid_tap(ax, px);
    const I x0 = px * ax.stride - ax.padding;
    const scalar_t* row = plane + y * ax.full;
    tap = tx0;
    for (I tx = tx0; tx < ax.kernel; ++tx) {
      const I x = x0 + tx;
      if (x >= ax.full) break;
      const acc_t v = static_cast<acc_t>(row[x]);
      if (v > best || v != v) {
        best = v;
        tap = tx;
      }
    }
  }
  scratch_max[item] = best;
  scratch_tap[item] = static_cast<int32_t>(tap);
}

// Column pass, item i * kSeparableTileCols + j: pooled output (py0 + i, px0 + j) of the plane,
// from the row pass's scratch tile. Items past the plane's last row or column write nothing.
template <typename scalar_t, typename acc_t, typename index_t, typename I>
SK_HD void separable_column_item(const GeometryOf<I>& g, const acc_t* scratch_max, const int32_t* scratch_tap, I py0,
                                 I px0, I item, scalar_t* plane_values, index_t* plane_indices) {
  const AxisOf<I>& ay = g.ax[1];
  const AxisOf<I>& ax = g.ax[2];
  const I i = item / kSeparableTileCols;
  const I j = item - i * kSeparableTileCols;
  const I py = py0 + i, px = px0 + j;
  if (py >= ay.pooled || px >= ax.pooled) return;
  const I ty0 = first_valid_tap(ay, py);
  const I y0 = py * ay.stride - ay.padding;
  const I r0 = i * ay.stride;  // scratch row of the window's tap 0
  acc_t best = -static_cast<acc_t>(INFINITY);
  I best_ty = ty0;
  for (I ty = ty0; ty < ay.kernel; ++ty) {
    if (y0 + ty >= ay.full) break;
    const acc_t v = scratch_max[(r0 + ty) * kSeparableTileCols + j];
    if (v > best || v != v) {
      best = v;
      best_ty = ty;
    }
  }
  const I tx = static_cast<I>(scratch_tap[(r0 + best_ty) * kSeparableTileCols + j]);
  const I out = py * ax.pooled + px;
  plane_values[out] = static_cast<scalar_t>(best);
  plane_indices[out] = IndexKind<index_t>::compact
                           ? static_cast<index_t>(best_ty * ax.kernel + tx)
                           : static_cast<index_t>((y0 + best_ty) * ax.full + px * ax.stride - ax.padding + tx);
}

// ---------------------------------------------------------------------------------------------
// Unpooling (and the max-pool backward, which is the same gather with a sum): fills one row
// (outer, z, y, all x, all c) of the full map when every axis is disjoint. Each output element
// is written exactly once: the stored value where the entry's index names it, zero elsewhere.
// Items [begin, end) step `step` split the row between workers (CUDA threads or one CPU loop).
// Returns how many entries matched their target here; summed over the whole map this equals
// the number of entries exactly when every index lies inside its own window and the map.
template <typename scalar_t, typename index_t>
SK_HD int64_t unpool_row_disjoint(const Geometry& g, const scalar_t* values, const index_t* indices, scalar_t* out,
                                  int64_t outer, int64_t z, int64_t y, bool row_has_x_gaps, int64_t begin,
                                  int64_t step) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t C = g.inner;
  const int64_t W = ax.full;
  scalar_t* out_row = out + ((outer * az.full + z) * ay.full + y) * W * C;
  int64_t pz, tz, py, ty;
  if (!single_window(az, z, pz, tz) || !single_window(ay, y, py, ty)) {
    for (int64_t i = begin; i < W * C; i += step) out_row[i] = scalar_t(0);
    return 0;
  }
  const int64_t pooled_row = ((outer * az.pooled + pz) * ay.pooled + py) * ax.pooled * C;
  const int64_t row_flat = (z * ay.full + y) * W;
  const int64_t tap_row = (tz * ay.kernel + ty) * ax.kernel;
  int64_t matches = 0;
  for (int64_t i = begin; i < ax.pooled * C; i += step) {
    const int64_t px = C == 1 ? i : i / C;
    const int64_t c = i - px * C;
    const int64_t id = static_cast<int64_t>(indices[pooled_row + i]);
    const scalar_t v = values[pooled_row + i];
    int64_t first, last;
    valid_taps(ax, px, first, last);
    for (int64_t tx = first; tx < last; ++tx) {
      const int64_t x = tap_coord(ax, px, tx);
      const bool hit = IndexKind<index_t>::compact ? id == tap_row + tx : id == row_flat + x;
      out_row[x * C + c] = hit ? v : scalar_t(0);
      matches += hit;
    }
  }
  if (row_has_x_gaps) {
    for (int64_t i = begin; i < W * C; i += step) {
      const int64_t x = C == 1 ? i : i / C;
      int64_t pc, tap;
      if (!single_window(ax, x, pc, tap)) out_row[i] = scalar_t(0);
    }
  }
  return matches;
}

// General gather for one element of the full map (overlapping windows allowed). With kSum the
// values of every entry naming this element are added (max-pool backward); otherwise the entry
// latest in scan order wins (max-unpool: PyTorch's CPU rule, deterministic everywhere).
template <typename scalar_t, typename acc_t, typename index_t, bool kSum>
SK_HD scalar_t unpool_gather_element(const Geometry& g, const scalar_t* values, const index_t* indices, int64_t outer,
                                     int64_t z, int64_t y, int64_t x, int64_t c, int64_t& matches) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  int64_t lz, hz, ly, hy, lx, hx;
  window_candidates(az, z, lz, hz);
  window_candidates(ay, y, ly, hy);
  window_candidates(ax, x, lx, hx);
  const int64_t flat = (z * ay.full + y) * ax.full + x;
  acc_t acc = acc_t(0);
  bool found = false;
  for (int64_t pz = hz; pz >= lz; --pz) {
    const int64_t tz = window_tap(az, pz, z);
    if (tz < 0) continue;
    for (int64_t py = hy; py >= ly; --py) {
      const int64_t ty = window_tap(ay, py, y);
      if (ty < 0) continue;
      for (int64_t px = hx; px >= lx; --px) {
        const int64_t tx = window_tap(ax, px, x);
        if (tx < 0) continue;
        const int64_t e = (((outer * az.pooled + pz) * ay.pooled + py) * ax.pooled + px) * g.inner + c;
        const int64_t id = static_cast<int64_t>(indices[e]);
        const bool hit = IndexKind<index_t>::compact ? id == (tz * ay.kernel + ty) * ax.kernel + tx : id == flat;
        if (!hit) continue;
        ++matches;
        if (kSum) {
          acc += static_cast<acc_t>(values[e]);
        } else if (!found) {
          acc = static_cast<acc_t>(values[e]);
          found = true;
        }
      }
    }
  }
  return static_cast<scalar_t>(acc);
}

// Unpool backward: whether an in-window entry lost its target to a later entry (in scan order)
// of another window that names the same element. Such an entry had no effect on the output, so
// its gradient is zero. Only overlapping windows can produce this.
template <typename index_t>
SK_HD bool superseded(const Geometry& g, const index_t* indices, int64_t outer, int64_t c, int64_t pz, int64_t py,
                      int64_t px, int64_t target) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t z = target / (ay.full * ax.full);
  const int64_t y = (target / ax.full) % ay.full;
  const int64_t x = target % ax.full;
  const int64_t own = (pz * ay.pooled + py) * ax.pooled + px;
  int64_t lz, hz, ly, hy, lx, hx;
  window_candidates(az, z, lz, hz);
  window_candidates(ay, y, ly, hy);
  window_candidates(ax, x, lx, hx);
  for (int64_t qz = hz; qz >= lz; --qz) {
    const int64_t tz = window_tap(az, qz, z);
    if (tz < 0) continue;
    for (int64_t qy = hy; qy >= ly; --qy) {
      const int64_t ty = window_tap(ay, qy, y);
      if (ty < 0) continue;
      for (int64_t qx = hx; qx >= lx; --qx) {
        const int64_t tx = window_tap(ax, qx, x);
        if (tx < 0) continue;
        const int64_t other = (qz * ay.pooled + qy) * ax.pooled + qx;
        if (other <= own) continue;
        const int64_t id = static_cast<int64_t>(indices[(outer * g.pooled_plane() + other) * g.inner + c]);
        const bool names = IndexKind<index_t>::compact ? id == (tz * ay.kernel + ty) * ax.kernel + tx : id == target;
        if (names) return true;
      }
    }
  }
  return false;
}

// Gradient of unpooling for one entry: the output gradient at its target, zero when the
// index is invalid or the entry lost its target to a later one.
template <typename scalar_t, typename index_t>
SK_HD scalar_t unpool_backward_element(const Geometry& g, const scalar_t* grad_out, const index_t* indices,
                                       int64_t e, bool overlapping) {
  const Position p = decode_position(g, e, true);
  int64_t target;
  const int s = entry_status<index_t>(g, p.z, p.y, p.x, indices[e], target);
  if (s == kOutOfRange) return scalar_t(0);
  if (overlapping && s == kInWindow && superseded<index_t>(g, indices, p.o, p.c, p.z, p.y, p.x, target))
    return scalar_t(0);
  return grad_out[(p.o * g.full_plane() + target) * g.inner + p.c];
}


// ---------------------------------------------------------------------------------------------
// Tiling windows (kernel == stride and dilation 1 on every axis; SegNet's 2x2/2): every full
// coordinate lies in at most one window, found by one division, so an element's entry needs no
// candidate search. The element functions take the index type I (see AxisOf).
SK_HD bool axis_tiling(const Axis& a) { return a.kernel == a.stride && a.dilation == 1; }

// Unpool forward on tiling windows, one run of consecutive full-map elements per CUDA thread:
// only the run's first element is decoded (divisions); the others step one channel or one
// column on, carrying into the next row, plane or image, so their index math is additions.
// The run is as long as one 16-byte store (8 bytes for 16-bit types).
template <typename scalar_t>
SK_HD constexpr int unpool_run_length() {
  return sizeof(scalar_t) >= 8 ? 2 : 4;
}

// A coordinate of the full map on a tiling axis, with its window and tap.
template <typename I>
struct TiledCursor {
  I q, pc, tap;
};

template <typename I, typename Div>
SK_HD TiledCursor<I> tiled_cursor(const AxisOf<I>& a, const Div& kernel, I q) {
  TiledCursor<I> t;
  t.q = q;
  const I shifted = q + a.padding;
  t.pc = kernel.div(shifted);
  t.tap = shifted - t.pc * a.kernel;
  return t;
}

// Moves the cursor one coordinate on; at the end of the axis it restarts at 0 and returns true
// (the carry into the next axis).
template <typename I, typename Div>
SK_HD bool step_cursor(TiledCursor<I>& t, const AxisOf<I>& a, const Div& kernel) {
  if (++t.q == a.full) {
    t = tiled_cursor(a, kernel, I(0));
    return true;
  }
  if (++t.tap == a.kernel) {
    t.tap = 0;
    ++t.pc;
  }
  return false;
}

// Elements e0 .. e0 + count - 1 (count <= kRun) into out[0 .. count): the value of the entry whose
// index names the element, else 0. Adds 1 to matches per element an entry names (summed over the
// map: the count of valid entries).
template <int kRun, typename scalar_t, typename index_t, typename I>
SK_HD void unpool_tiled_run(const IndexPlan<I>& p, const scalar_t* values, const index_t* indices, I e0, int count,
                            scalar_t (&out)[kRun], int64_t& matches) {
  const AxisOf<I>& az = p.g.ax[0];
  const AxisOf<I>& ay = p.g.ax[1];
  const AxisOf<I>& ax = p.g.ax[2];
  I o, z, y, x, c;
  decode_element(e0, p.full, o, z, y, x, c);
  TiledCursor<I> cz = tiled_cursor(az, p.kernel[0], z), cy = tiled_cursor(ay, p.kernel[1], y),
                 cx = tiled_cursor(ax, p.kernel[2], x);
  for (int k = 0; k < kRun; ++k) {
    if (k > 0 && ++c == p.g.inner) {
      c = 0;
      if (step_cursor(cx, ax, p.kernel[2]) && step_cursor(cy, ay, p.kernel[1]) && step_cursor(cz, az, p.kernel[0]))
        ++o;
    }
    scalar_t v = scalar_t(0);
    if (k < count && cz.pc < az.pooled && cy.pc < ay.pooled && cx.pc < ax.pooled) {
      const I entry = (((o * az.pooled + cz.pc) * ay.pooled + cy.pc) * ax.pooled + cx.pc) * p.g.inner + c;
      const int64_t id = static_cast<int64_t>(indices[entry]);
      // Both in I: a tap number and a flat offset of the full plane fit wherever I was chosen.
      const int64_t want = static_cast<int64_t>(IndexKind<index_t>::compact
                                                    ? (cz.tap * ay.kernel + cy.tap) * ax.kernel + cx.tap
                                                    : (cz.q * ay.full + cy.q) * ax.full + cx.q);
      if (id == want) {
        ++matches;
        v = values[entry];
      }
    }
    out[k] = v;
  }
}

// Unpool backward for pooled entry e on tiling windows (no two windows share a target): the
// output gradient at the entry's target; zero for an invalid index.
template <typename scalar_t, typename index_t, typename I>
SK_HD scalar_t unpool_backward_tiled_element(const IndexPlan<I>& p, const scalar_t* grad_out,
                                             const index_t* indices, I e) {
  const AxisOf<I>& az = p.g.ax[0];
  const AxisOf<I>& ay = p.g.ax[1];
  const AxisOf<I>& ax = p.g.ax[2];
  I o, pz, py, px, c;
  decode_element(e, p.pooled, o, pz, py, px, c);
  const I plane = az.full * ay.full * ax.full;
  const int64_t id = static_cast<int64_t>(indices[e]);
  int64_t target;
  if (IndexKind<index_t>::compact) {
    if (id >= static_cast<int64_t>(az.kernel * ay.kernel * ax.kernel)) return scalar_t(0);
    // off = (tz * kH + ty) * kW + tx
    const I off = static_cast<I>(id);
    const I zy = p.kernel[2].div(off), tx = off - zy * ax.kernel;
    const I tz = p.kernel[1].div(zy), ty = zy - tz * ay.kernel;
    const I z = pz * az.kernel - az.padding + tz, y = py * ay.kernel - ay.padding + ty,
            x = px * ax.kernel - ax.padding + tx;
    if (z < 0 || z >= az.full || y < 0 || y >= ay.full || x < 0 || x >= ax.full) return scalar_t(0);
    target = (static_cast<int64_t>(z) * ay.full + y) * ax.full + x;
  } else {
    if (id < 0 || id >= static_cast<int64_t>(plane)) return scalar_t(0);
    target = id;
  }
  return grad_out[(static_cast<int64_t>(o) * plane + target) * p.g.inner + c];
}

}  // namespace max_unpool
}  // namespace segkernels
