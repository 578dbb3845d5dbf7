// CPU kernel of max-pooling with indices (2-D and 3-D, NC(D)HW and channels-last without
// copies): a row of pooled outputs at a time, with SegNet's 2x2 window vectorised. The
// per-element rule (scan order, NaN) is pool_max_element's in max_unpool.h.
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

#if SEGKERNELS_CPU_AVX2
// Taps x = 2q and 2q + 1 of 8 windows q as two float vectors (even, odd), in window order.
__attribute__((target("avx2"), always_inline)) inline void load_tap_pairs(const float* p, __m256& even, __m256& odd) {
  const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
  // shuffle_ps works per 128-bit lane: (lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6); the 64-bit permute
  // puts the lanes' halves back in order.
  even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
  odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
}
__attribute__((target("avx2"), always_inline)) inline void load_tap_pairs(const c10::BFloat16* p, __m256& even,
                                                                          __m256& odd) {
  // A bfloat16 pair is one 32-bit word: the even element widens by a shift, the odd one by a mask.
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
__attribute__((target("avx2"), always_inline)) inline void store_values8(float* p, __m256 m) { _mm256_storeu_ps(p, m); }
__attribute__((target("avx2"), always_inline)) inline void store_values8(c10::BFloat16* p, __m256 m) {
  // m holds widened bfloat16 values (low halves zero), so the high halves are the exact bits.
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(m), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

// Windows [0, n) of a row of 2x2 (or 2x2x2 with planes == 2) windows, stride 2 along x, all taps
// inside, 8 at a time: the same scan order and NaN rule as the scalar chain (a tap replaces
// the maximum when greater or NaN). r0: tap (0, 0, 0) of window 0; W: row length; plane_step:
// the z step. Writes values and the winning tap (0..7) of each window; returns windows done.
template <typename scalar_t>
__attribute__((target("avx2"))) int64_t pool_quads_avx2(const scalar_t* r0, int64_t W, int64_t plane_step, int64_t planes,
                                                         int64_t n, scalar_t* vo, int32_t* taps) {
  int64_t q = 0;
  for (; q + 8 <= n; q += 8) {
    __m256 m, v;
    __m256 t[8];
    load_tap_pairs(r0 + 2 * q, t[0], t[1]);
    load_tap_pairs(r0 + W + 2 * q, t[2], t[3]);
    if (planes == 2) {
      load_tap_pairs(r0 + plane_step + 2 * q, t[4], t[5]);
      load_tap_pairs(r0 + plane_step + W + 2 * q, t[6], t[7]);
    }
    m = t[0];
    __m256 a = _mm256_setzero_ps();  // tap numbers as int32 bits
    const int count = planes == 2 ? 8 : 4;
    for (int k = 1; k < count; ++k) {
      v = t[k];
      const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      m = _mm256_blendv_ps(m, v, take);
      a = _mm256_blendv_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(k)), take);
    }
    store_values8(vo + q, m);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(taps + q), _mm256_castps_si256(a));
  }
  return q;
}
#endif

// One pooled row (outer, pz, py, all px, all c). Same scan order and NaN rule as
// pool_max_element (max_unpool.h) with the per-element tap-range divisions hoisted out; for
// channels-last the channel loop is innermost so the compare-select vectorises.
template <typename scalar_t, typename index_t>
void pool_row_cpu(const Geometry& g, const scalar_t* in, scalar_t* vout, index_t* iout, int64_t o, int64_t pz,
                  int64_t py, const std::vector<int64_t>& x_taps, std::vector<at::opmath_type<scalar_t>>& best,
                  std::vector<int64_t>& arg, std::vector<int32_t>& taps, bool avx2) {
  using acc_t = at::opmath_type<scalar_t>;
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t C = g.inner;
  const bool compact = IndexKind<index_t>::compact;
  int64_t tz0, tz1, ty0, ty1;
  valid_taps(az, pz, tz0, tz1);
  valid_taps(ay, py, ty0, ty1);
  const scalar_t* base = in + o * g.full_plane() * C;
  const int64_t out_row = ((o * az.pooled + pz) * ay.pooled + py) * ax.pooled * C;
  // SegNet's 2x2 window and its 3-D 2x2x2 sibling (no dilation) with the two y taps, and one
  // or both z taps, inside: the taps are read at fixed offsets. `planes` is 1 or 2.
  const int64_t planes = tz1 - tz0;
  const bool quad = ty0 == 0 && ty1 == 2 && ay.kernel == 2 && ax.kernel == 2 && ax.dilation == 1 &&
                    ay.dilation == 1 && (planes == 1 || (planes == 2 && az.kernel == 2 && az.dilation == 1));
  const int64_t row0 = (tap_coord(az, pz, tz0) * ay.full + tap_coord(ay, py, 0)) * ax.full;
  const int64_t W = ax.full, plane_step = ay.full * ax.full;
  const int64_t tap0 = (tz0 * ay.kernel) * ax.kernel;  // compact offset of (tz0, 0, 0)
  // Index of a quad window's winning tap a (bits: z, y, x) whose x tap lies at column x.
  const auto quad_index = [&](int64_t a, int64_t x) {
    return static_cast<index_t>(compact ? tap0 + a : row0 + (a & 4 ? plane_step : 0) + (a & 2 ? W : 0) + x);
  };
  int64_t px_first = 0;
#if SEGKERNELS_CPU_AVX2
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (avx2 && C == 1 && quad && ax.stride == 2 && ax.padding == 0) {
      // Windows px < W / 2 have both x taps inside.
      const int64_t inside = std::min<int64_t>(ax.pooled, W / 2);
      const scalar_t* r0 = base + row0;
      px_first = pool_quads_avx2(r0, W, plane_step, planes, inside, vout + out_row, taps.data());
      index_t* io = iout + out_row;
      for (int64_t px = 0; px < px_first; ++px) io[px] = quad_index(taps[px], 2 * px + (taps[px] & 1));
    }
  }
#endif
  for (int64_t px = px_first; px < ax.pooled; ++px) {
    const int64_t tx0 = x_taps[2 * px], tx1 = x_taps[2 * px + 1];
    const int64_t z0 = tap_coord(az, pz, tz0), y0 = tap_coord(ay, py, ty0), x0 = tap_coord(ax, px, tx0);
    const int64_t first_flat = (z0 * ay.full + y0) * ax.full + x0;
    const int64_t first_tap = (tz0 * ay.kernel + ty0) * ax.kernel + tx0;
    scalar_t* vo = vout + out_row + px * C;
    index_t* io = iout + out_row + px * C;
    if (C == 1 && quad && tx0 == 0 && tx1 == 2) {
      // A branch-free compare-select chain in scan order (z, y, x), since which tap wins is
      // random and a branch would mispredict half the time.
      const scalar_t* r0 = base + row0 + tap_coord(ax, px, 0);
      acc_t m = static_cast<acc_t>(r0[0]);
      int a = 0;
      const auto tap = [&](const scalar_t& x, int t) {
        const acc_t v = static_cast<acc_t>(x);
        const bool take = v > m || v != v;
        m = take ? v : m;
        a = take ? t : a;
      };
      tap(r0[1], 1);
      tap(r0[W], 2);
      tap(r0[W + 1], 3);
      if (planes == 2) {
        const scalar_t* r1 = r0 + plane_step;
        tap(r1[0], 4);
        tap(r1[1], 5);
        tap(r1[W], 6);
        tap(r1[W + 1], 7);
      }
      vo[0] = static_cast<scalar_t>(m);
      io[0] = quad_index(a, tap_coord(ax, px, a & 1));
      continue;
    }
    if (C == 1) {
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      int64_t a = compact ? first_tap : first_flat;
      for (int64_t tz = tz0; tz < tz1; ++tz) {
        for (int64_t ty = ty0; ty < ty1; ++ty) {
          const int64_t row = (tap_coord(az, pz, tz) * ay.full + tap_coord(ay, py, ty)) * ax.full;
          const int64_t tap_row = (tz * ay.kernel + ty) * ax.kernel;
          for (int64_t tx = tx0; tx < tx1; ++tx) {
            const int64_t flat = row + tap_coord(ax, px, tx);
            const acc_t v = static_cast<acc_t>(base[flat]);
            const bool take = v > m || v != v;
            m = take ? v : m;
            a = take ? (compact ? tap_row + tx : flat) : a;
          }
        }
      }
      vo[0] = static_cast<scalar_t>(m);
      io[0] = static_cast<index_t>(a);
      continue;
    }
    std::fill(best.begin(), best.begin() + C, -std::numeric_limits<acc_t>::infinity());
    std::fill(arg.begin(), arg.begin() + C, compact ? first_tap : first_flat);
    acc_t* bp = best.data();
    int64_t* ap = arg.data();
    for (int64_t tz = tz0; tz < tz1; ++tz) {
      for (int64_t ty = ty0; ty < ty1; ++ty) {
        const int64_t row = (tap_coord(az, pz, tz) * ay.full + tap_coord(ay, py, ty)) * ax.full;
        const int64_t tap_row = (tz * ay.kernel + ty) * ax.kernel;
        for (int64_t tx = tx0; tx < tx1; ++tx) {
          const int64_t flat = row + tap_coord(ax, px, tx);
          const int64_t label = compact ? tap_row + tx : flat;
          const scalar_t* src = base + flat * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(src[c]);
            const bool take = v > bp[c] || v != v;
            bp[c] = take ? v : bp[c];
            ap[c] = take ? label : ap[c];
          }
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      vo[c] = static_cast<scalar_t>(bp[c]);
      io[c] = static_cast<index_t>(ap[c]);
    }
  }
}

// Wide or overlapping windows (separable_applies): the maximum over each window's columns per
// input row first, then over its rows, in loops over output columns that vectorise; a whole
// plane at a time, where CUDA takes a tile (separable_row_item, separable_column_item in
// max_unpool.h, whose comment says why values and indices are pool_max_element's).
template <typename scalar_t, typename index_t>
void pool_plane_separable(const Geometry& g, const scalar_t* in, scalar_t* vout, index_t* iout,
                          const std::vector<int64_t>& x_taps, at::opmath_type<scalar_t>* rowmax, int32_t* rowtap,
                          at::opmath_type<scalar_t>* best, int32_t* best_ty) {
  using acc_t = at::opmath_type<scalar_t>;
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  const int64_t H = ay.full, W = ax.full, Ho = ay.pooled, Wo = ax.pooled;
  const int64_t kw = ax.kernel, sx = ax.stride, pad = ax.padding;
  const bool compact = IndexKind<index_t>::compact;
  // Output columns whose window lies inside the row: every tap valid, no bounds to check.
  const int64_t lo = std::min<int64_t>(Wo, ceil_div(pad, sx));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(Wo, W - kw + pad >= 0 ? floor_div(W - kw + pad, sx) + 1 : 0));
  for (int64_t y = 0; y < H; ++y) {
    const scalar_t* row = in + y * W;
    acc_t* __restrict__ m = rowmax + y * Wo;
    int32_t* __restrict__ t = rowtap + y * Wo;
    const auto border = [&](int64_t px) {
      const int64_t tx0 = x_taps[2 * px], tx1 = x_taps[2 * px + 1];
      acc_t mv = -std::numeric_limits<acc_t>::infinity();
      int32_t a = static_cast<int32_t>(tx0);
      for (int64_t tx = tx0; tx < tx1; ++tx) {
        const acc_t v = static_cast<acc_t>(row[px * sx - pad + tx]);
        const bool take = v > mv || v != v;
        mv = take ? v : mv;
        a = take ? static_cast<int32_t>(tx) : a;
      }
      m[px] = mv;
      t[px] = a;
    };
    for (int64_t px = 0; px < lo; ++px) border(px);
    for (int64_t px = hi; px < Wo; ++px) border(px);
    const scalar_t* r0 = row - pad;
    for (int64_t px = lo; px < hi; ++px) {
      m[px] = static_cast<acc_t>(r0[px * sx]);
      t[px] = 0;
    }
    for (int64_t tx = 1; tx < kw; ++tx) {
      const scalar_t* r = r0 + tx;
      for (int64_t px = lo; px < hi; ++px) {
        const acc_t v = static_cast<acc_t>(r[px * sx]);
        const bool take = v > m[px] || v != v;
        m[px] = take ? v : m[px];
        t[px] = take ? static_cast<int32_t>(tx) : t[px];
      }
    }
  }
  for (int64_t py = 0; py < Ho; ++py) {
    int64_t ty0, ty1;
    valid_taps(ay, py, ty0, ty1);
    const int64_t y0 = tap_coord(ay, py, 0);
    const acc_t* first = rowmax + (y0 + ty0) * Wo;
    for (int64_t px = 0; px < Wo; ++px) {
      best[px] = first[px];
      best_ty[px] = static_cast<int32_t>(ty0);
    }
    for (int64_t ty = ty0 + 1; ty < ty1; ++ty) {
      const acc_t* __restrict__ r = rowmax + (y0 + ty) * Wo;
      for (int64_t px = 0; px < Wo; ++px) {
        const acc_t v = r[px];
        const bool take = v > best[px] || v != v;
        best[px] = take ? v : best[px];
        best_ty[px] = take ? static_cast<int32_t>(ty) : best_ty[px];
      }
    }
    scalar_t* vo = vout + py * Wo;
    index_t* io = iout + py * Wo;
    for (int64_t px = 0; px < Wo; ++px) {
      const int64_t ty = best_ty[px];
      const int64_t tx = rowtap[(y0 + ty) * Wo + px];
      vo[px] = static_cast<scalar_t>(best[px]);
      io[px] = static_cast<index_t>(compact ? ty * kw + tx : (y0 + ty) * W + px * sx - pad + tx);
    }
  }
}

std::tuple<Tensor, Tensor> max_pool_with_indices_cpu(const Tensor& input, at::IntArrayRef kernel,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, bool ceil_mode, bool compact) {
  PoolArgs a = prepare_pool(input, kernel, stride, padding, dilation, ceil_mode, compact);
  if (a.values.numel() == 0) return {a.values, a.indices};
  const Geometry& g = a.geometry;
  const int64_t outer = a.values.size(0) * (g.inner == 1 ? a.values.size(1) : 1);
  const int64_t rows = outer * g.ax[0].pooled * g.ax[1].pooled;
  const int64_t row_len = g.ax[2].pooled * g.inner;
  // Valid x taps of every window, [first, last) pairs: the same for every row, and a division
  // per element if recomputed.
  std::vector<int64_t> x_taps(2 * g.ax[2].pooled);
  for (int64_t px = 0; px < g.ax[2].pooled; ++px) valid_taps(g.ax[2], px, x_taps[2 * px], x_taps[2 * px + 1]);
  const bool avx2 = cpu_has_avx2();
  const bool separable = separable_applies(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "max_pool_with_indices_cpu", [&] {
    const scalar_t* src = a.input.const_data_ptr<scalar_t>();
    scalar_t* vout = a.values.mutable_data_ptr<scalar_t>();
    auto run = [&](auto* iout) {
      using index_t = std::remove_pointer_t<decltype(iout)>;
      if (separable) {  // one task per plane (N * C of them)
        const Axis& ay = g.ax[1];
        const Axis& ax = g.ax[2];
        const int64_t planes = a.values.size(0) * a.values.size(1);
        const int64_t in_plane = ay.full * ax.full, out_plane = ay.pooled * ax.pooled;
        at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in_plane)),
                         [&](int64_t begin, int64_t end) {
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<acc_t> rowmax(ay.full * ax.pooled), best(ax.pooled);
          std::vector<int32_t> rowtap(ay.full * ax.pooled), best_ty(ax.pooled);
          for (int64_t o = begin; o < end; ++o)
            pool_plane_separable<scalar_t, index_t>(g, src + o * in_plane, vout + o * out_plane, iout + o * out_plane,
                                                    x_taps, rowmax.data(), rowtap.data(), best.data(), best_ty.data());
        });
        return;
      }
      at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
        std::vector<at::opmath_type<scalar_t>> best(g.inner);
        std::vector<int64_t> arg(g.inner);
        std::vector<int32_t> taps(g.ax[2].pooled);
        RowCursor row(begin, g.ax[0].pooled, g.ax[1].pooled);
        for (int64_t r = begin; r < end; ++r, row.next())
          pool_row_cpu<scalar_t, index_t>(g, src, vout, iout, row.o, row.z, row.y, x_taps, best, arg, taps, avx2);
      });
    };
    if (compact)
      run(a.indices.mutable_data_ptr<uint8_t>());
    else
      run(a.indices.mutable_data_ptr<int64_t>());
  });
  return {a.values, a.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) { m.impl("max_pool_with_indices", &max_pool_with_indices_cpu); }

}  // namespace max_unpool
}  // namespace segkernels
