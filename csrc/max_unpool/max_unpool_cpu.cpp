// CPU kernels of max-unpooling and of the max-pool backward (2-D and 3-D, NC(D)HW and
// channels-last without copies). The per-element logic lives in max_unpool.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <cstring>
#include <type_traits>

#include "max_unpool/max_unpool_cpu.h"

namespace segkernels {
namespace max_unpool {
namespace {

using at::Tensor;

// Writes (v, 0), (0, v) or (0, 0) for rel = 0, 1 or anything else. For 2- and 4-byte elements
// the pair is built in one wider integer and stored once: left to itself the compiler packs the
// two narrow stores through the stack and stalls on store forwarding.
// With kStream the store bypasses the cache (movnti): a large output is written once and not
// read back soon, and streaming saves the read-for-ownership of every line.
template <bool kStream, typename wide_t>
inline void store_wide(void* out, wide_t value) {
#if defined(__SSE2__)
  if constexpr (kStream && sizeof(wide_t) == 8) {
    _mm_stream_si64(static_cast<long long*>(out), static_cast<long long>(value));
    return;
  } else if constexpr (kStream && sizeof(wide_t) == 4) {
    _mm_stream_si32(static_cast<int*>(out), static_cast<int>(value));
    return;
  }
#endif
  std::memcpy(out, &value, sizeof(value));
}

template <bool kStream, typename bits_t>
inline void store_pair(bits_t* out, bits_t v, int64_t rel) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "pair packing assumes little-endian");
  const bool hit = static_cast<uint64_t>(rel) < 2;
  if constexpr (sizeof(bits_t) < 8) {
    using wide_t = std::conditional_t<sizeof(bits_t) == 2, uint32_t, uint64_t>;
    const wide_t pair = (static_cast<wide_t>(v) << ((rel & 1) * 8 * sizeof(bits_t))) & keep_mask<wide_t>(hit);
    store_wide<kStream>(out, pair);
  } else {
    out[0] = v & keep_mask<bits_t>(rel == 0);
    out[1] = v & keep_mask<bits_t>(rel == 1);
  }
}

// The only window (pc, tap) holding each coordinate of a disjoint axis, or pc = -1 for a gap:
// computed once per call, since recomputing it per row costs divisions that dominate short rows.
struct AxisWindows {
  std::vector<int64_t> pc, tap;
  explicit AxisWindows(const Axis& a) : pc(a.full), tap(a.full) {
    for (int64_t q = 0; q < a.full; ++q)
      if (!single_window(a, q, pc[q], tap[q])) pc[q] = -1;
  }
};

#if SEGKERNELS_CPU_AVX2
// The SegNet pair path of unpool_row_disjoint_cpu, 4 entries per step (8 for 2-byte elements):
// compare the indices with the two taps' targets in 64-bit lanes, mask the value into both
// halves of each output pair, store 16 or 32 bytes at once. With kTwoRows it also writes the
// pairs of the window's second row to out1 (targets `second` further on), so short rows share
// the loads and the loop. Returns the number of entries done; adds the hits to `hits`.
#define SK_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

template <typename index_t>
SK_AVX2_INLINE __m256i load_index4(const index_t* p) {
  if constexpr (sizeof(index_t) == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else {
    int32_t four;
    std::memcpy(&four, p, 4);
    return _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
  }
}

// Output pairs (v, 0) / (0, v) / (0, 0) in each 64-bit lane for rel == t, t + 1 or neither;
// `shift` is the element width in bits.
// Hits are counted in the lanes set in `lanes` only.
SK_AVX2_INLINE __m256i masked_pairs(__m256i v, __m256i rel, __m256i t, __m256i t1, int shift, int& hits,
                                    int lanes = 0xF) {
  const __m256i m0 = _mm256_cmpeq_epi64(rel, t), m1 = _mm256_cmpeq_epi64(rel, t1);
  hits += __builtin_popcount(_mm256_movemask_pd(_mm256_castsi256_pd(_mm256_or_si256(m0, m1))) & lanes);
  return _mm256_or_si256(_mm256_and_si256(v, m0), _mm256_and_si256(_mm256_sll_epi64(v, _mm_cvtsi32_si128(shift)), m1));
}

// Each 64-bit lane of a and b holds one 32-bit pair: keep the low halves, a's then b's.
SK_AVX2_INLINE __m256i pack_low_halves(__m256i a, __m256i b) {
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(a, low_halves),
                                   _mm256_permutevar8x32_epi32(b, low_halves), 0x20);
}

// Four entries from px on, either width; hits counted in `lanes` only.
template <bool kTwoRows, typename bits_t, typename index_t>
SK_AVX2_INLINE void unpool_pairs4_avx2(const bits_t* vals, const index_t* idx, bits_t* out0, bits_t* out1, int64_t px,
                                       __m256i want, __m256i t0, __m256i t0b, __m256i t1, __m256i t1b, int lanes,
                                       int& h) {
  const __m256i rel = _mm256_sub_epi64(load_index4(idx + px), want);
  if constexpr (sizeof(bits_t) == 4) {
    const __m256i v = _mm256_cvtepu32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vals + px)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out0 + 2 * px), masked_pairs(v, rel, t0, t0b, 32, h, lanes));
    if constexpr (kTwoRows)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out1 + 2 * px), masked_pairs(v, rel, t1, t1b, 32, h, lanes));
  } else {
    const __m256i v = _mm256_cvtepu16_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(vals + px)));
    const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out0 + 2 * px),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(masked_pairs(v, rel, t0, t0b, 16, h, lanes),
                                                                        low_halves)));
    if constexpr (kTwoRows)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out1 + 2 * px),
                       _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(masked_pairs(v, rel, t1, t1b, 16, h, lanes),
                                                                          low_halves)));
  }
}

template <bool kTwoRows, typename bits_t, typename index_t>
__attribute__((target("avx2"))) int64_t unpool_pairs_avx2(const bits_t* vals, const index_t* idx, bits_t* out0,
                                                          bits_t* out1, int64_t n, int64_t want0, int64_t want_step,
                                                          int64_t second, int64_t& hits) {
  const __m256i t0 = _mm256_setzero_si256(), t0b = _mm256_set1_epi64x(1);
  const __m256i t1 = _mm256_set1_epi64x(second), t1b = _mm256_set1_epi64x(second + 1);
  const __m256i step = _mm256_set1_epi64x(4 * want_step);
  __m256i want = _mm256_setr_epi64x(want0, want0 + want_step, want0 + 2 * want_step, want0 + 3 * want_step);
  int h = 0;
  int64_t px = 0;
  if constexpr (sizeof(bits_t) == 4) {
    for (; px + 4 <= n; px += 4) {
      unpool_pairs4_avx2<kTwoRows>(vals, idx, out0, out1, px, want, t0, t0b, t1, t1b, 0xF, h);
      want = _mm256_add_epi64(want, step);
    }
  } else if constexpr (sizeof(bits_t) == 2) {
    for (; px + 8 <= n; px += 8) {
      const __m256i rel_a = _mm256_sub_epi64(load_index4(idx + px), want);
      want = _mm256_add_epi64(want, step);
      const __m256i rel_b = _mm256_sub_epi64(load_index4(idx + px + 4), want);
      want = _mm256_add_epi64(want, step);
      const __m128i v8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vals + px));
      const __m256i va = _mm256_cvtepu16_epi64(v8), vb = _mm256_cvtepu16_epi64(_mm_srli_si128(v8, 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out0 + 2 * px),
                          pack_low_halves(masked_pairs(va, rel_a, t0, t0b, 16, h), masked_pairs(vb, rel_b, t0, t0b, 16, h)));
      if constexpr (kTwoRows)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out1 + 2 * px),
                            pack_low_halves(masked_pairs(va, rel_a, t1, t1b, 16, h), masked_pairs(vb, rel_b, t1, t1b, 16, h)));
    }
    if (px + 4 <= n) {
      unpool_pairs4_avx2<kTwoRows>(vals, idx, out0, out1, px, want, t0, t0b, t1, t1b, 0xF, h);
      px += 4;
    }
  }
  if (px < n && n >= 4) {
    // The last 1-3 entries: redo the last four, which rewrites equal values over the
    // overlap, and count hits in the new lanes only (short rows of deep layers have no room
    // to amortise a scalar tail).
    const int64_t q = n - 4;
    const __m256i want_q = _mm256_setr_epi64x(want0 + q * want_step, want0 + (q + 1) * want_step,
                                              want0 + (q + 2) * want_step, want0 + (q + 3) * want_step);
    unpool_pairs4_avx2<kTwoRows>(vals, idx, out0, out1, q, want_q, t0, t0b, t1, t1b, (0xF << (px - q)) & 0xF, h);
    px = n;
  }
  hits += h;
  return px;
}
#endif

// Disjoint-window unpooling of one full-map row (z, y given by their windows; pz < 0 or py < 0
// for a gap row). Same result as unpool_row_disjoint (max_unpool.h), with loops ordered for the
// CPU: channels innermost for channels-last, and the SegNet case (NCHW, kernel = stride = 2
// along x, no dilation) as branch-free pair stores.
template <bool kStream, typename bits_t, typename index_t>
int64_t unpool_row_disjoint_cpu(const Geometry& g, const bits_t* vals, const index_t* idx, bits_t* orow, int64_t o,
                                int64_t z, int64_t pz, int64_t tz, int64_t y, int64_t py, int64_t ty,
                                const std::vector<int64_t>& x_gaps, bool avx2) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t C = g.inner;
  const int64_t W = ax.full;
  if (pz < 0 || py < 0) {
    std::fill(orow, orow + W * C, bits_t(0));
    return 0;
  }
  const int64_t prow = ((o * az.pooled + pz) * ay.pooled + py) * ax.pooled * C;
  const bits_t* vrow = vals + prow;
  const index_t* irow = idx + prow;
  const int64_t row_flat = (z * ay.full + y) * W;
  const int64_t tap_row = (tz * ay.kernel + ty) * ax.kernel;
  const bool compact = IndexKind<index_t>::compact;
  int64_t matches = 0;
  auto entry = [&](int64_t px) {
    int64_t first, last;
    valid_taps(ax, px, first, last);
    for (int64_t tx = first; tx < last; ++tx) {
      const int64_t x = tap_coord(ax, px, tx);
      const int64_t want = compact ? tap_row + tx : row_flat + x;
      const index_t* ip = irow + px * C;
      const bits_t* vp = vrow + px * C;
      bits_t* op = orow + x * C;
      int64_t hits = 0;
      for (int64_t c = 0; c < C; ++c) {
        const bool hit = static_cast<int64_t>(ip[c]) == want;
        op[c] = vp[c] & keep_mask<bits_t>(hit);
        hits += hit;
      }
      matches += hits;
    }
  };
  int64_t lo = 0, hi = 0;  // entries [lo, hi) take the pair-store path
  if (C == 1 && ax.kernel == 2 && ax.stride == 2 && ax.dilation == 1) {
    lo = std::min<int64_t>(ax.pooled, ceil_div(ax.padding, 2));
    hi = std::max<int64_t>(lo, std::min<int64_t>(ax.pooled, floor_div(W - 2 + ax.padding, 2) + 1));
    const int64_t base = compact ? tap_row : row_flat - ax.padding;
    int64_t hits = 0, px = lo;
#if SEGKERNELS_CPU_AVX2
    if (avx2 && sizeof(bits_t) < 8 && !kStream)
      px += unpool_pairs_avx2<false>(vrow + lo, irow + lo, orow + 2 * lo - ax.padding, static_cast<bits_t*>(nullptr), hi - lo,
                                     compact ? base : base + 2 * lo, compact ? 0 : 2, 0, hits);
#endif
    for (; px < hi; ++px) {
      // Offset of the stored index from the entry's first tap: 0 or 1 when it names a tap.
      const int64_t rel = static_cast<int64_t>(irow[px]) - (compact ? base : base + 2 * px);
      store_pair<kStream>(orow + 2 * px - ax.padding, vrow[px], rel);
      hits += static_cast<uint64_t>(rel) < 2;
    }
    matches += hits;
  }
  for (int64_t px = 0; px < lo; ++px) entry(px);
  for (int64_t px = hi; px < ax.pooled; ++px) entry(px);
  for (const int64_t x : x_gaps) std::fill(orow + x * C, orow + (x + 1) * C, bits_t(0));
  return matches;
}

#if SEGKERNELS_CPU_AVX2
// One row of n 2x2 windows into its two output rows: the vector pairs, then a scalar tail
// (only when n < 4). Entry px's first tap is base + step * px; its lower taps lie `second`
// beyond. Returns the entries that found their target.
template <typename bits_t, typename index_t>
inline int64_t unpool_window_row(const bits_t* vrow, const index_t* irow, bits_t* orow0, bits_t* orow1, int64_t n,
                                 int64_t base, int64_t step, int64_t second) {
  int64_t hits = 0;
  int64_t px = unpool_pairs_avx2<true>(vrow, irow, orow0, orow1, n, base, step, second, hits);
  for (; px < n; ++px) {
    const int64_t rel = static_cast<int64_t>(irow[px]) - (base + step * px);
    store_pair<false>(orow0 + 2 * px, vrow[px], rel);
    store_pair<false>(orow1 + 2 * px, vrow[px], rel - second);
    hits += (static_cast<uint64_t>(rel) < 2) + (static_cast<uint64_t>(rel - second) < 2);
  }
  return hits;
}

// Both full rows of a 2x2-stride-2 window row at once (NCHW, no x padding, every x window
// inside): one pass over the pooled row's values and indices writes the two output rows.
// Same result as two unpool_row_disjoint_cpu calls; short rows (deep layers) gain most.
template <typename bits_t, typename index_t>
int64_t unpool_two_rows_avx2(const Geometry& g, const bits_t* vals, const index_t* idx, bits_t* orow, int64_t o,
                             int64_t z, int64_t pz, int64_t tz, int64_t y, int64_t py,
                             const std::vector<int64_t>& x_gaps) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t W = ax.full;
  const bool compact = IndexKind<index_t>::compact;
  const int64_t prow = ((o * az.pooled + pz) * ay.pooled + py) * ax.pooled;
  const bits_t* vrow = vals + prow;
  const index_t* irow = idx + prow;
  bits_t* orow1 = orow + W;
  // First tap of entry 0 in the upper row, and how far the lower row's taps lie beyond.
  const int64_t base = compact ? tz * ay.kernel * 2 : (z * ay.full + y) * W;
  const int64_t step = compact ? 0 : 2;
  const int64_t second = compact ? 2 : W;
  const int64_t hits = unpool_window_row(vrow, irow, orow, orow1, ax.pooled, base, step, second);
  for (const int64_t x : x_gaps) orow[x] = orow1[x] = bits_t(0);
  return hits;
}
#endif

#if SEGKERNELS_CPU_AVX2
// SegNet's windows (NCHW; kernel = stride = 2 along x and y, and along z in 3-D, or a unit z
// axis; no padding or dilation; every window inside the map): whole z-slices at a time, with
// pointer steps instead of the per-row window lookups of unpool_disjoint_cpu. Deep layers'
// rows are short (15 entries for a 30-wide map), so that bookkeeping cost as much as the stores.
inline bool segnet_slices_apply(const Geometry& g) {
  auto pairs = [](const Axis& a) {
    return a.kernel == 2 && a.stride == 2 && a.padding == 0 && a.dilation == 1 && 2 * a.pooled <= a.full;
  };
  const Axis& az = g.ax[0];
  const bool z_unit = az.kernel == 1 && az.stride == 1 && az.padding == 0 && az.pooled == az.full;
  return g.inner == 1 && pairs(g.ax[1]) && pairs(g.ax[2]) && (z_unit || pairs(az));
}

// Slices [begin, end) of the (outer * D) z-slices; returns the entries that found their target.
template <typename bits_t, typename index_t>
int64_t unpool_segnet_slices_avx2(const Geometry& g, const bits_t* vals, const index_t* idx, bits_t* out, int64_t begin,
                                  int64_t end) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t D = az.full, H = ay.full, W = ax.full, Hp = ay.pooled, Wp = ax.pooled;
  const int64_t z_kernel = az.kernel;  // 1 (2-D maps) or 2
  const bool compact = IndexKind<index_t>::compact;
  int64_t hits = 0;
  for (int64_t s = begin; s < end; ++s) {
    const int64_t o = s / D, z = s - o * D;
    bits_t* slice = out + s * H * W;
    const int64_t pz = z / z_kernel, tz = z - pz * z_kernel;
    if (pz >= az.pooled) {  // a slice no window reaches
      std::fill(slice, slice + H * W, bits_t(0));
      continue;
    }
    const int64_t first = (o * az.pooled + pz) * Hp * Wp;
    const bits_t* vrow = vals + first;
    const index_t* irow = idx + first;
    bits_t* orow = slice;
    // First tap of entry 0 of the window row, its step per entry, and the lower row's offset.
    int64_t base = compact ? tz * 4 : z * H * W;
    const int64_t step = compact ? 0 : 2, second = compact ? 2 : W, row_step = compact ? 0 : 2 * W;
    for (int64_t py = 0; py < Hp; ++py, vrow += Wp, irow += Wp, orow += 2 * W, base += row_step) {
      hits += unpool_window_row(vrow, irow, orow, orow + W, Wp, base, step, second);
      for (int64_t x = 2 * Wp; x < W; ++x) orow[x] = orow[W + x] = bits_t(0);
    }
    std::fill(slice + 2 * Hp * W, slice + H * W, bits_t(0));  // rows below the last window
  }
  return hits;
}
#endif

// Calls fn(bits_t*) with the tensor's storage viewed as raw bit patterns of its element width.
// Unpooling and its gradient only move values (all-zero bits are +0.0), so they run on bits:
// one instantiation per width instead of per dtype, and integer selects that vectorise.
template <typename Fn>
void with_bits(int64_t element_size, Fn&& fn) {
  switch (element_size) {
    case 2:
      fn(uint16_t{});
      break;
    case 4:
      fn(uint32_t{});
      break;
    case 8:
      fn(uint64_t{});
      break;
    default:
      TORCH_CHECK(false, "segkernels: unsupported element size ", element_size);
  }
}

template <typename index_t>
int64_t unpool_disjoint_cpu(UnpoolArgs& a, const index_t* idx) {
  const Geometry& g = a.geometry;
  const int64_t rows = full_rows(g, a.outer);
  const AxisWindows zw(g.ax[0]), yw(g.ax[1]), xw(g.ax[2]);
  std::vector<int64_t> x_gaps;
  for (int64_t x = 0; x < g.ax[2].full; ++x)
    if (xw.pc[x] < 0) x_gaps.push_back(x);
  const bool avx2 = cpu_has_avx2();
  std::atomic<int64_t> matches{0};
  // Without vector stores, stream outputs well beyond the last-level cache; smaller ones are
  // likely read next from it. (Unaligned 32-byte stores cannot stream, and measured no slower.)
  const bool stream = !avx2 && a.out.nbytes() > (int64_t{16} << 20);
  const Axis& ax = g.ax[2];
  const Axis& ay = g.ax[1];
  // SegNet's window along x and y, with every x window inside the map: two rows per pass.
  const bool two_rows = avx2 && g.inner == 1 && ax.kernel == 2 && ax.stride == 2 && ax.dilation == 1 &&
                        ax.padding == 0 && ax.full >= 2 * ax.pooled && ay.kernel == 2 && ay.stride == 2 &&
                        ay.dilation == 1;
  const int64_t row_len = g.ax[2].full * g.inner;
  auto run = [&](auto* vals, auto* out) {
    using bits_t = std::remove_const_t<std::remove_pointer_t<decltype(out)>>;
#if SEGKERNELS_CPU_AVX2
    if constexpr (sizeof(bits_t) < 8) {
      if (avx2 && segnet_slices_apply(g)) {
        const int64_t slice = g.ax[1].full * g.ax[2].full;
        at::parallel_for(0, a.outer * g.ax[0].full, row_grain(slice), [&](int64_t begin, int64_t end) {
          matches += unpool_segnet_slices_avx2<bits_t, index_t>(g, vals, idx, out, begin, end);
        });
        return;
      }
    }
#endif
    at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      RowCursor row(begin, g.ax[0].full, g.ax[1].full);
      for (int64_t r = begin; r < end; ++r, row.next()) {
        const int64_t o = row.o, z = row.z, y = row.y;
        bits_t* orow = out + r * row_len;
#if SEGKERNELS_CPU_AVX2
        if constexpr (sizeof(bits_t) < 8) {
          if (two_rows && r + 1 < end && zw.pc[z] >= 0 && yw.pc[y] >= 0 && yw.tap[y] == 0 && y + 1 < g.ax[1].full &&
              yw.pc[y + 1] == yw.pc[y]) {
            local += unpool_two_rows_avx2<bits_t, index_t>(g, vals, idx, orow, o, z, zw.pc[z], zw.tap[z], y, yw.pc[y],
                                                           x_gaps);
            ++r;  // the lower row is done too
            row.next();
            continue;
          }
        }
#endif
        local += stream ? unpool_row_disjoint_cpu<true, bits_t, index_t>(g, vals, idx, orow, o, z, zw.pc[z], zw.tap[z], y,
                                                                         yw.pc[y], yw.tap[y], x_gaps, avx2)
                        : unpool_row_disjoint_cpu<false, bits_t, index_t>(g, vals, idx, orow, o, z, zw.pc[z], zw.tap[z],
                                                                          y, yw.pc[y], yw.tap[y], x_gaps, avx2);
      }
#if defined(__SSE2__)
      if (stream) _mm_sfence();  // order the streamed stores before the task reports done
#endif
      matches += local;
    });
  };
  with_bits(a.values.element_size(), [&](auto zero) {
    using bits_t = decltype(zero);
    run(static_cast<const bits_t*>(a.values.const_data_ptr()), static_cast<bits_t*>(a.out.mutable_data_ptr()));
  });
  return matches.load();
}

// Gathers pooled values into the full map; returns how many entries found their target.
template <bool kSum>
int64_t gather_into_full(UnpoolArgs& a) {
  const Geometry& g = a.geometry;
  const int64_t rows = full_rows(g, a.outer);
  const int64_t row_len = g.ax[2].full * g.inner;
  std::atomic<int64_t> matches{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_unpool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vals = a.values.const_data_ptr<scalar_t>();
    scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto* idx) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      if (all_axes_disjoint(g)) {
        // At most one entry per element: the sum (max-pool backward) is that entry's value.
        matches += unpool_disjoint_cpu<index_t>(a, idx);
      } else {
        at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
          int64_t local = 0;
          for (int64_t r = begin; r < end; ++r) {
            int64_t o, z, y;
            decode_row(r, g.ax[0].full, g.ax[1].full, o, z, y);
            for (int64_t i = 0; i < row_len; ++i) {
              const int64_t x = i / g.inner;
              out[r * row_len + i] =
                  unpool_gather_element<scalar_t, acc_t, index_t, kSum>(g, vals, idx, o, z, y, x, i - x * g.inner, local);
            }
          }
          matches += local;
        });
      }
    };
    if (a.indices.scalar_type() == at::kByte)
      run(a.indices.const_data_ptr<uint8_t>());
    else
      run(a.indices.const_data_ptr<int64_t>());
  });
  return matches.load();
}

// Counts entries by EntryStatus (slow path, only after a match-count mismatch).
template <typename index_t>
void classify_entries(const UnpoolArgs& a, int64_t& out_of_range, int64_t& outside_window) {
  const Geometry& g = a.geometry;
  const index_t* idx = a.indices.const_data_ptr<index_t>();
  std::atomic<int64_t> bad{0}, moved{0};
  at::parallel_for(0, a.indices.numel(), 4096, [&](int64_t begin, int64_t end) {
    int64_t b = 0, m = 0;
    for (int64_t e = begin; e < end; ++e) {
      const Position p = decode_position(g, e, true);
      int64_t target;
      const int s = entry_status<index_t>(g, p.z, p.y, p.x, idx[e], target);
      b += s == kOutOfRange;
      m += s == kOutsideWindow;
    }
    bad += b;
    moved += m;
  });
  out_of_range = bad.load();
  outside_window = moved.load();
}

// Arbitrary int64 indices: per (outer) slice, zero then write entries in scan order so the
// latest entry naming an element wins, as PyTorch's CPU kernel does.
void scatter_general(UnpoolArgs& a) {
  const Geometry& g = a.geometry;
  const int64_t C = g.inner;
  const int64_t pooled = g.pooled_plane() * C;
  const int64_t full = g.full_plane() * C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_unpool_scatter_cpu", [&] {
    const scalar_t* vals = a.values.const_data_ptr<scalar_t>();
    const int64_t* idx = a.indices.const_data_ptr<int64_t>();
    scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.outer, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        std::fill(out + o * full, out + (o + 1) * full, scalar_t(0));
        for (int64_t e = 0; e < pooled; ++e) {
          const int64_t t = idx[o * pooled + e];
          if (t >= 0 && t < g.full_plane()) out[o * full + t * C + e % C] = vals[o * pooled + e];
        }
      }
    });
  });
}

Tensor max_unpool_cpu(const Tensor& input, const Tensor& indices, at::IntArrayRef kernel, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef output_size,
                      bool check_indices) {
  UnpoolArgs a = prepare_unpool(input, indices, kernel, stride, padding, dilation, output_size, "max_unpool");
  if (a.out.numel() == 0) return a.out;
  const int64_t matches = gather_into_full<false>(a);
  if (!check_indices || matches == a.indices.numel()) return a.out;
  const bool compact = a.indices.scalar_type() == at::kByte;
  int64_t out_of_range, outside_window;
  if (compact)
    classify_entries<uint8_t>(a, out_of_range, outside_window);
  else
    classify_entries<int64_t>(a, out_of_range, outside_window);
  TORCH_CHECK_INDEX(out_of_range == 0, out_of_range_message("max_unpool", out_of_range, compact));
  if (outside_window > 0) scatter_general(a);
  return a.out;
}

// Max-pool backward for overlapping windows on NCHW maps: each plane's gradient summed entry
// by entry in output order, the order PyTorch's CPU kernel adds them in, one task per plane
// (no element is shared between tasks: deterministic, no atomics). The gather of
// gather_into_full visits every window covering each element instead, kh * kw of them at
// stride 1. An entry whose index is out of range or outside its window adds nothing, as there.
template <typename scalar_t, typename index_t>
void pool_backward_scatter_planes(UnpoolArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geometry;
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t FP = g.full_plane(), PP = g.pooled_plane(), K = g.window_size();
  const bool compact = IndexKind<index_t>::compact;
  const scalar_t* go = a.values.const_data_ptr<scalar_t>();
  const index_t* idx = a.indices.const_data_ptr<index_t>();
  scalar_t* gi = a.out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.outer, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, FP)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : FP);
    for (int64_t o = begin; o < end; ++o) {
      acc_t* acc = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(gi + o * FP) : buf.data();
      std::fill(acc, acc + FP, acc_t(0));
      const scalar_t* gp = go + o * PP;
      const index_t* ip = idx + o * PP;
      int64_t e = 0;
      for (int64_t pz = 0; pz < az.pooled; ++pz) {
        for (int64_t py = 0; py < ay.pooled; ++py) {
          for (int64_t px = 0; px < ax.pooled; ++px, ++e) {
            const int64_t id = static_cast<int64_t>(ip[e]);
            int64_t z, y, x;
            if (compact) {
              if (id >= K) continue;
              z = tap_coord(az, pz, id / (ay.kernel * ax.kernel));
              y = tap_coord(ay, py, (id / ax.kernel) % ay.kernel);
              x = tap_coord(ax, px, id % ax.kernel);
              if (z < 0 || z >= az.full || y < 0 || y >= ay.full || x < 0 || x >= ax.full) continue;
            } else {
              if (id < 0 || id >= FP) continue;
              z = id / (ay.full * ax.full);
              y = (id / ax.full) % ay.full;
              x = id % ax.full;
              if (window_tap(az, pz, z) < 0 || window_tap(ay, py, y) < 0 || window_tap(ax, px, x) < 0) continue;
            }
            acc[(z * ay.full + y) * ax.full + x] += static_cast<acc_t>(gp[e]);
          }
        }
      }
      if (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t i = 0; i < FP; ++i) gi[o * FP + i] = static_cast<scalar_t>(acc[i]);
      }
    }
  });
}

Tensor max_pool_backward_cpu(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             at::IntArrayRef input_size) {
  UnpoolArgs a = prepare_unpool(grad_output, indices, kernel, stride, padding, dilation, input_size, "max_pool_backward");
  if (a.out.numel() == 0) return a.out;
  if (a.geometry.inner == 1 && !all_axes_disjoint(a.geometry)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_pool_backward_cpu", [&] {
      if (a.indices.scalar_type() == at::kByte)
        pool_backward_scatter_planes<scalar_t, uint8_t>(a);
      else
        pool_backward_scatter_planes<scalar_t, int64_t>(a);
    });
    return a.out;
  }
  gather_into_full<true>(a);
  return a.out;
}

// Flat-index displacement of each compact offset from its window's first tap; 256 entries so
// that any uint8 offset indexes it, zero for offsets >= the window size (callers mask those).
std::array<int64_t, 256> compact_displacements(const Geometry& g) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  std::array<int64_t, 256> disp{};
  for (int64_t off = 0; off < g.window_size(); ++off) {
    const int64_t tz = off / (ay.kernel * ax.kernel), ty = (off / ax.kernel) % ay.kernel, tx = off % ax.kernel;
    disp[off] = (tz * az.dilation * ay.full + ty * ay.dilation) * ax.full + tx * ax.dilation;
  }
  return disp;
}

// Unpool backward for compact indices, one pooled row at a time: each entry adds its offset's
// displacement to its window's first tap, checking bounds only for windows that reach past
// the map. Same result as unpool_backward_element (max_unpool.h), which still serves
// overlapping windows, where entries that lost their target get zero.
template <typename bits_t>
void unpool_backward_compact_rows_cpu(const Geometry& g, int64_t outer, const bits_t* go, const uint8_t* idx,
                                      bits_t* gi) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t C = g.inner;
  const int64_t FP = g.full_plane();
  const int64_t K = g.window_size();
  const std::array<int64_t, 256> disp = compact_displacements(g);
  auto inside = [](const Axis& a, int64_t start) { return start >= 0 && start + (a.kernel - 1) * a.dilation < a.full; };
  const int64_t rows = outer * az.pooled * ay.pooled;
  at::parallel_for(0, rows, row_grain(ax.pooled * C), [&](int64_t begin, int64_t end) {
    RowCursor row(begin, az.pooled, ay.pooled);
    for (int64_t r = begin; r < end; ++r, row.next()) {
      const int64_t o = row.o, pz = row.z, py = row.y;
      const int64_t z0 = tap_coord(az, pz, 0), y0 = tap_coord(ay, py, 0);
      const bool zy_inside = inside(az, z0) && inside(ay, y0);
      const bits_t* gplane = go + o * FP * C;
      for (int64_t px = 0; px < ax.pooled; ++px) {
        const int64_t x0 = tap_coord(ax, px, 0);
        const bool window_inside = zy_inside && inside(ax, x0);
        const int64_t first = (z0 * ay.full + y0) * ax.full + x0;
        const int64_t e0 = (r * ax.pooled + px) * C;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t id = idx[e0 + c];
          int64_t t;
          bool valid;
          if (window_inside) {
            valid = id < K;
            t = first + disp[id];
          } else {
            valid = entry_status<uint8_t>(g, pz, py, px, idx[e0 + c], t) != kOutOfRange;
          }
          // Always load (element 0 of the plane when invalid) and mask: no branch in the loop.
          gi[e0 + c] = gplane[(valid ? t : 0) * C + c] & keep_mask<bits_t>(valid);
        }
      }
    }
  });
}

// n entries of one NCHW plane: gp[j] = plane[ip[j]], zero where the index is outside the plane
// (always load, element 0 when invalid, and mask: no branch in the loop). A function of its
// own so the loop's few values stay in registers.
template <typename bits_t>
__attribute__((noinline)) void gather_flat_plane(const bits_t* plane, const int64_t* ip, bits_t* gp, int64_t n,
                                                 int64_t plane_size) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = ip[j];
    const bool valid = static_cast<uint64_t>(t) < static_cast<uint64_t>(plane_size);
    gp[j] = plane[valid ? t : 0] & keep_mask<bits_t>(valid);
  }
}

// Unpool backward for int64 indices: each entry reads its target straight from the index, so
// no window arithmetic is needed; one plane at a time (a plain gather, zero where invalid).
template <typename bits_t>
void unpool_backward_flat_cpu(const Geometry& g, int64_t outer, const bits_t* go, const int64_t* idx, bits_t* gi) {
  const int64_t C = g.inner;
  const int64_t FP = g.full_plane();
  const int64_t PP = g.pooled_plane();
  at::parallel_for(0, outer, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, PP * C)), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const bits_t* gplane = go + o * FP * C;
      const int64_t* ip = idx + o * PP * C;
      bits_t* gp = gi + o * PP * C;
      if (C == 1) {
        gather_flat_plane(gplane, ip, gp, PP, FP);
        continue;
      }
      // Always load (element 0 of the plane when invalid) and mask: no branch in the loop.
      for (int64_t j = 0; j < PP; ++j) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t t = ip[j * C + c];
          const bool valid = static_cast<uint64_t>(t) < static_cast<uint64_t>(FP);
          gp[j * C + c] = gplane[(valid ? t : 0) * C + c] & keep_mask<bits_t>(valid);
        }
      }
    }
  });
}

// One (o, pz) slab of unpool_backward_compact_inside_cpu: `rows` pooled rows of n entries,
// window rows `row_step` apart. A function of its own so that the compiler keeps this loop's
// few values in registers instead of spilling the outer loops' ones.
template <typename bits_t>
__attribute__((noinline)) void gather_compact_slab(const bits_t* first, const uint8_t* ip, bits_t* gp, int64_t rows,
                                                   int64_t n, int64_t row_step, int64_t stride, const int64_t* disp,
                                                   int64_t K) {
  for (int64_t r = 0; r < rows; ++r, first += row_step, ip += n, gp += n) {
    for (int64_t px = 0; px < n; ++px) {
      const int64_t off = ip[px];
      const bool valid = off < K;
      gp[px] = first[px * stride + disp[off]] & keep_mask<bits_t>(valid);
    }
  }
}

// Unpool backward for compact indices when every window lies inside the map (NCHW): the
// target is the window's first tap plus a per-offset displacement, stepped along the plane
// with no bounds checks or divisions; an offset >= the window size reads zero.
template <typename bits_t>
void unpool_backward_compact_inside_cpu(const Geometry& g, int64_t outer, const bits_t* go, const uint8_t* idx,
                                        bits_t* gi) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t FP = g.full_plane();
  const int64_t PP = g.pooled_plane();
  const int64_t K = g.window_size();
  const std::array<int64_t, 256> disp = compact_displacements(g);
  // Locals, so that the stores through gi need not reload the geometry.
  const int64_t Dp = az.pooled, Hp = ay.pooled, Wp = ax.pooled, H = ay.full, W = ax.full;
  const int64_t sz = az.stride, sy = ay.stride, sx = ax.stride;
  at::parallel_for(0, outer, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, PP)), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const bits_t* gplane = go + o * FP;
      const uint8_t* ip = idx + o * PP;
      bits_t* gp = gi + o * PP;
      for (int64_t pz = 0; pz < Dp; ++pz)
        gather_compact_slab(gplane + pz * sz * H * W, ip + pz * Hp * Wp, gp + pz * Hp * Wp, Hp, Wp, sy * W, sx,
                            disp.data(), K);
    }
  });
}

// d(unpool)/d(input): each entry reads the output gradient at its target (zero when invalid).
Tensor max_unpool_backward_cpu(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool only_winners) {
  UnpoolBackwardArgs a = prepare_unpool_backward(grad_output, indices, kernel, stride, padding, dilation);
  const Geometry& g = a.geometry;
  const int64_t total = a.grad_input.numel();
  if (total == 0) return a.grad_input;
  const int64_t outer = a.grad_input.size(0) * (g.inner == 1 ? a.grad_input.size(1) : 1);
  const bool overlapping = only_winners && !all_axes_disjoint(g);
  with_bits(a.grad_output.element_size(), [&](auto zero) {
    using bits_t = decltype(zero);
    const bits_t* go = static_cast<const bits_t*>(a.grad_output.const_data_ptr());
    bits_t* gi = static_cast<bits_t*>(a.grad_input.mutable_data_ptr());
    auto run = [&](const auto* idx) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      if (!overlapping) {
        if constexpr (std::is_same_v<index_t, int64_t>)
          unpool_backward_flat_cpu<bits_t>(g, outer, go, idx, gi);
        else if (g.inner == 1 && all_windows_inside(g))
          unpool_backward_compact_inside_cpu<bits_t>(g, outer, go, idx, gi);
        else
          unpool_backward_compact_rows_cpu<bits_t>(g, outer, go, idx, gi);
        return;
      }
      at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e) gi[e] = unpool_backward_element<bits_t, index_t>(g, go, idx, e, true);
      });
    };
    if (a.indices.scalar_type() == at::kByte)
      run(a.indices.const_data_ptr<uint8_t>());
    else
      run(a.indices.const_data_ptr<int64_t>());
  });
  return a.grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("max_unpool", &max_unpool_cpu);
  m.impl("max_unpool_backward", &max_unpool_backward_cpu);
  m.impl("max_pool_backward", &max_pool_backward_cpu);
}

}  // namespace max_unpool
}  // namespace segkernels
