// CPU kernels of the convolution over a label map (one_hot_conv2d.h) and of label_fractions.
//
// Forward: one task per run of output rows; for a chunk of positions of a row, each position
// sums the weight columns its taps' classes select (contiguous over the output channels, from
// the weight transposed once to (taps, classes, O)) in registers, into a small position-major
// buffer that goes to the NCHW output a channel at a time. C times fewer operations than a
// convolution over the one-hot map, and no N * C * H * W tensor.
//
// Weight backward: the class at every (position, tap) is looked up once, into a table of
// P * taps indices (class * taps + tap, or -1). Then one task per block of 16 or 32 output
// channels walks the positions in order and adds their gradients to the rows its table names
// (partial sums over chunks of positions, float64 totals): a fixed order per weight element
// whatever the threads, so the gradient is bitwise repeatable. The bias gradient is summed in
// the same pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common_host.h"
#include "one_hot_conv2d/one_hot_conv2d.h"

namespace segkernels {
namespace one_hot_conv2d {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 64;        // output positions whose channel sums stay in L1
constexpr int64_t kRegisterBytes = 256;  // channels a position sums in registers (independent adds)

void check_labels(const Tensor& labels, const char* op) {
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "segkernels.", op, ": labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 3, "segkernels.", op, ": labels must be (N, H, W), got ", labels.sizes());
}

void check_float(const Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   "segkernels.one_hot_conv2d: ", name, " must be float16, bfloat16, float32 or float64, got ", s);
}

Geometry make_geometry(const Tensor& labels, at::IntArrayRef weight_size, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t ignore_index) {
  check_labels(labels, "one_hot_conv2d");
  TORCH_CHECK_VALUE(weight_size.size() == 4, "segkernels.one_hot_conv2d: weight must be (O, C, kh, kw), got ",
                    weight_size);
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                    "segkernels.one_hot_conv2d: stride, padding and dilation need 2 entries each");
  Geometry g;
  g.N = labels.size(0);
  g.H = labels.size(1);
  g.W = labels.size(2);
  g.sN = labels.stride(0);
  g.sH = labels.stride(1);
  g.sW = labels.stride(2);
  g.O = weight_size[0];
  g.C = weight_size[1];
  g.kh = weight_size[2];
  g.kw = weight_size[3];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.ignore_index = ignore_index;
  TORCH_CHECK_VALUE(g.O >= 0 && g.C >= 1 && g.kh >= 1 && g.kw >= 1,
                    "segkernels.one_hot_conv2d: weight must have at least one class and a non-empty kernel, got ",
                    weight_size);
  TORCH_CHECK_VALUE(g.sh >= 1 && g.sw >= 1 && g.ph >= 0 && g.pw >= 0 && g.dh >= 1 && g.dw >= 1,
                    "segkernels.one_hot_conv2d: need stride >= 1, padding >= 0 and dilation >= 1, got ", stride, ", ",
                    padding, ", ", dilation);
  g.Ho = output_extent(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = output_extent(g.W, g.kw, g.sw, g.pw, g.dw);
  TORCH_CHECK_VALUE(g.Ho >= 1 && g.Wo >= 1, "segkernels.one_hot_conv2d: the dilated kernel (", g.dh * (g.kh - 1) + 1,
                    ", ", g.dw * (g.kw - 1) + 1, ") is larger than the padded labels (", g.H + 2 * g.ph, ", ",
                    g.W + 2 * g.pw, ")");
  return g;
}

// Invalid labels (outside [0, classes), not ignore_index) in rows [y0, y1) and columns [x0, x1)
// of every image.
int64_t count_invalid_labels(const Tensor& labels, int64_t classes, int64_t ignore_index, int64_t y0, int64_t y1,
                             int64_t x0, int64_t x1) {
  if (y1 <= y0 || x1 <= x0 || labels.size(0) == 0) return 0;
  std::atomic<int64_t> invalid{0};
  const int64_t rows = y1 - y0;
  const int64_t sN = labels.stride(0), sH = labels.stride(1), sW = labels.stride(2);
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "one_hot_conv2d_count_invalid", [&] {
    const scalar_t* lab = labels.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 65536 / (x1 - x0));
    at::parallel_for(0, labels.size(0) * rows, grain, [&](int64_t begin, int64_t end) {
      int64_t bad = 0;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = lab + (r / rows) * sN + (y0 + r % rows) * sH;
        for (int64_t x = x0; x < x1; ++x)
          bad += classify(static_cast<int64_t>(row[x * sW]), classes, ignore_index) == kInvalid;
      }
      if (bad) invalid += bad;
    });
  });
  return invalid.load();
}

void raise_invalid(int64_t count, int64_t classes, int64_t ignore_index) {
  TORCH_CHECK_INDEX(count == 0, "labels hold ", count, " value(s) outside [0, ", classes,
                    ") that are not ignore_index=", ignore_index);
}

// Every pixel of labels is checked, read by a tap or not (a label map with an invalid value is
// refused whatever the stride), in one pass before the convolution kernels, which then treat an
// invalid label as no class.
void check_label_values(const Tensor& labels, int64_t classes, int64_t ignore_index) {
  raise_invalid(count_invalid_labels(labels, classes, ignore_index, 0, labels.size(1), 0, labels.size(2)), classes,
                ignore_index);
}

// ---------------------------------------------------------------------------------------------
// Forward

#define SK_ALWAYS_INLINE __attribute__((always_inline)) inline

// The vector helpers below are always inlined, so no vector crosses a call boundary whose ABI
// would differ between the baseline and the AVX2 entry points.
#pragma GCC diagnostic ignored "-Wpsabi"

// Vectors of kBytes bytes (GCC/Clang vector extensions): 32 in the baseline (two xmm halves)
// and AVX2 (ymm) entry points, 64 in the AVX-512 ones (zmm: half the loads and stores, which
// bound these loops). The compilers left these short fixed-length adds scalar.
template <typename T, int kBytes = 32>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int64_t lanes = kBytes / sizeof(T);
  static SK_ALWAYS_INLINE type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static SK_ALWAYS_INLINE void store(T* p, type v) { __builtin_memcpy(p, &v, sizeof v); }
};

#if SEGKERNELS_CPU_AVX2
#define SK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SK_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#endif

// d[o * ld + x] = s[x * ls + o] for an 8 x 8 float block: 24 shuffles instead of 64 scalar
// loads and stores (the masks are AVX's unpack, shufps and vperm2f128 patterns).
SK_ALWAYS_INLINE void transpose8x8(const float* s, int64_t ls, float* d, int64_t ld) {
  using V = Vec<float>;
  using M = int32_t __attribute__((vector_size(32)));
  V::type r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) r[k] = V::load(s + k * ls);
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int k = 0; k < 8; k += 4)
    for (int h = 0; h < 2; ++h) {
      u[k + h * 2] = __builtin_shuffle(t[k + h], t[k + h + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
      u[k + h * 2 + 1] = __builtin_shuffle(t[k + h], t[k + h + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int k = 0; k < 4; ++k) {
    V::store(d + k * ld, __builtin_shuffle(u[k], u[k + 4], M{0, 1, 2, 3, 8, 9, 10, 11}));
    V::store(d + (k + 4) * ld, __builtin_shuffle(u[k], u[k + 4], M{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

// d[a * ld + b] = s[b * ls + a] for a < na, b < nb (a transposed copy, with a conversion when
// the types differ): 8 x 8 float blocks by shuffles, the rest element by element.
template <typename S, typename D>
SK_ALWAYS_INLINE void transpose_block(const S* s, int64_t ls, int64_t na, int64_t nb, D* d, int64_t ld) {
  int64_t a0 = 0;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<D, float>) {
    for (; a0 + 8 <= na; a0 += 8) {
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8) transpose8x8(s + b * ls + a0, ls, d + a0 * ld + b, ld);
      for (; b < nb; ++b)
        for (int64_t a = a0; a < a0 + 8; ++a) d[a * ld + b] = s[b * ls + a];
    }
  }
  for (; a0 < na; ++a0)
    for (int64_t b = 0; b < nb; ++b) d[a0 * ld + b] = static_cast<D>(s[b * ls + a0]);
}

// The class each tap reads at output columns [x0, x0 + count) of output row (n, oy):
// emit(t, x, c) for every tap t and x in [0, count), c the class or kNoClass (padding, ignored).
// The labels were checked first (check_label_values), so the lookup is branch-free over the
// columns whose tap reads inside the map.
template <typename label_t, typename Emit>
SK_ALWAYS_INLINE void tap_classes(const Geometry& g, const label_t* labels, int64_t n, int64_t oy, int64_t x0,
                                  int64_t count, Emit&& emit) {
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t iy = g.in_y(oy, i);
    const bool row_inside = iy >= 0 && iy < g.H;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t t = i * g.kw + j;
      int64_t first = count, last = count;
      if (row_inside) inside_run(x0, count, j, g.sw, g.pw, g.dw, g.W, first, last);
      for (int64_t x = 0; x < first; ++x) emit(t, x, kNoClass);
      for (int64_t x = last; x < count; ++x) emit(t, x, kNoClass);
      if (first == last) continue;
      const label_t* read = labels + n * g.sN + iy * g.sH + g.in_x(x0, j) * g.sW;
      const int64_t step = g.sw * g.sW;
      for (int64_t x = first; x < last; ++x) {
        const int64_t label = static_cast<int64_t>(read[x * step]);
        emit(t, x, is_checked_class(label, g.C, g.ignore_index) ? label : kNoClass);
      }
    }
  }
}

// Rows [begin, end) of the flattened (N, Ho) output rows. wt: weight as (taps * C + 1, O) in
// acc_t, its last row zeros (the column of a tap that reads no class); bias: O values (that zero
// row when there is no bias). For a chunk of positions, the column each tap selects is looked up
// once; then each position sums its columns in registers, kRegisterBytes of channels at a time,
// bias first and taps in order (a fixed order: the output is bitwise repeatable). Inlined into
// the baseline, AVX2 and AVX-512 entry points: the column sum is the hot loop.
template <int kBytes, typename label_t, typename acc_t, typename out_t>
SK_ALWAYS_INLINE void forward_rows_impl(const Geometry& g, const label_t* labels, const acc_t* wt,
                                        const acc_t* bias, out_t* out, int64_t begin, int64_t end) {
  using V = Vec<acc_t, kBytes>;
  constexpr int64_t kRegisterVecs = kRegisterBytes / kBytes;
  constexpr int64_t L = V::lanes, kBlock = kRegisterVecs * L;
  const int64_t O = g.O, C = g.C, K = g.taps();
  const acc_t* zero_column = wt + K * C * O;
  std::vector<acc_t> acc(kChunk * O), by_channel(O * kChunk);
  std::vector<const acc_t*> columns(kChunk * K);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / g.Ho, oy = r - n * g.Ho;
    for (int64_t x0 = 0; x0 < g.Wo; x0 += kChunk) {
      const int64_t xs = std::min(kChunk, g.Wo - x0);
      tap_classes(g, labels, n, oy, x0, xs, [&](int64_t t, int64_t x, int64_t c) {
        columns[x * K + t] = c >= 0 ? wt + (t * C + c) * O : zero_column;
      });
      for (int64_t x = 0; x < xs; ++x) {
        const acc_t* const* col = columns.data() + x * K;
        acc_t* a = acc.data() + x * O;
        int64_t o = 0;
        for (; o + kBlock <= O; o += kBlock) {
          typename V::type s[kRegisterVecs];
          for (int64_t v = 0; v < kRegisterVecs; ++v) s[v] = V::load(bias + o + v * L);
          for (int64_t t = 0; t < K; ++t)
            for (int64_t v = 0; v < kRegisterVecs; ++v) s[v] += V::load(col[t] + o + v * L);
          for (int64_t v = 0; v < kRegisterVecs; ++v) V::store(a + o + v * L, s[v]);
        }
        for (; o + L <= O; o += L) {
          typename V::type s = V::load(bias + o);
          for (int64_t t = 0; t < K; ++t) s += V::load(col[t] + o);
          V::store(a + o, s);
        }
        for (; o < O; ++o) {
          acc_t s = bias[o];
          for (int64_t t = 0; t < K; ++t) s += col[t][o];
          a[o] = s;
        }
      }
      out_t* dst = out + (n * O * g.Ho + oy) * g.Wo + x0;  // channel 0 of this chunk
      if constexpr (std::is_same_v<out_t, acc_t>) {
        transpose_block(acc.data(), O, O, xs, dst, g.positions());
      } else {
        transpose_block(acc.data(), O, O, xs, by_channel.data(), kChunk);
        for (int64_t o = 0; o < O; ++o)
          for (int64_t x = 0; x < xs; ++x) dst[o * g.positions() + x] = static_cast<out_t>(by_channel[o * kChunk + x]);
      }
    }
  }
}

template <typename label_t, typename acc_t, typename out_t>
void forward_rows(const Geometry& g, const label_t* labels, const acc_t* wt, const acc_t* bias, out_t* out,
                     int64_t begin, int64_t end) {
  forward_rows_impl<32, label_t, acc_t, out_t>(g, labels, wt, bias, out, begin, end);
}

#if SEGKERNELS_CPU_AVX2
template <typename label_t, typename acc_t, typename out_t>
SK_TARGET_AVX2 void forward_rows_avx2(const Geometry& g, const label_t* labels, const acc_t* wt,
                                         const acc_t* bias, out_t* out, int64_t begin, int64_t end) {
  forward_rows_impl<32, label_t, acc_t, out_t>(g, labels, wt, bias, out, begin, end);
}

template <typename label_t, typename acc_t, typename out_t>
SK_TARGET_AVX512 void forward_rows_avx512(const Geometry& g, const label_t* labels, const acc_t* wt,
                                             const acc_t* bias, out_t* out, int64_t begin, int64_t end) {
  forward_rows_impl<64, label_t, acc_t, out_t>(g, labels, wt, bias, out, begin, end);
}
#endif

#if SEGKERNELS_CPU_AVX2
// Fewer than 32 classes, float32, AVX-512 (label autoencoders: 19 to 21 classes): the weights
// W[o, :, t] of one output channel and tap fit two registers, and one permutex2var picks the
// weight of each of 16 positions' classes at once. The sums come out channel-major, straight
// into the NCHW output rows: no column pointers, no transpose. wp: (O, taps, 32) with zeros at
// classes >= C; kNoClassSlot, a zero, is what a tap reading no class picks. The sums run in
// forward_rows_impl's order (bias, then the taps in order; a zero for no class): the same bits.
constexpr int32_t kNoClassSlot = 31;  // so the classes must stay below 31

// kVecs vectors of 16 positions of one output channel: bias, then each tap's weights picked by
// the positions' slots (rows of `width` slots per tap); the first `count` positions are stored.
template <int kVecs>
SK_TARGET_AVX512 SK_ALWAYS_INLINE void permute_block(const float* w, int64_t K, const int32_t* slots, int64_t width,
                                                     float bias, float* dst, int64_t count) {
  __m512 acc[kVecs];
  for (int v = 0; v < kVecs; ++v) acc[v] = _mm512_set1_ps(bias);
  for (int64_t t = 0; t < K; ++t) {
    const __m512 lo = _mm512_loadu_ps(w + t * 32), hi = _mm512_loadu_ps(w + t * 32 + 16);
    const int32_t* s = slots + t * width;
    for (int v = 0; v < kVecs; ++v)
      acc[v] = _mm512_add_ps(acc[v], _mm512_permutex2var_ps(lo, _mm512_loadu_si512(s + 16 * v), hi));
  }
  for (int v = 0; v < kVecs; ++v) {
    const int64_t left = count - 16 * v;
    if (left >= 16)
      _mm512_storeu_ps(dst + 16 * v, acc[v]);
    else if (left > 0)
      _mm512_mask_storeu_ps(dst + 16 * v, static_cast<__mmask16>((1u << left) - 1), acc[v]);
  }
}

template <typename label_t>
SK_TARGET_AVX512 void forward_rows_permute_avx512(const Geometry& g, const label_t* labels, const float* wp,
                                                  const float* bias, float* out, int64_t begin, int64_t end) {
  const int64_t O = g.O, K = g.taps(), Wo = g.Wo, P = g.positions();
  const int64_t width = ceil_div(Wo, 32) * 32;
  // Slot (class or kNoClassSlot) of every tap and output column of one output row; the columns
  // past Wo pick the zero too.
  std::vector<int32_t> slots(K * width, kNoClassSlot);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / g.Ho, oy = r - n * g.Ho;
    tap_classes(g, labels, n, oy, 0, Wo, [&](int64_t t, int64_t x, int64_t c) {
      slots[t * width + x] = c >= 0 ? static_cast<int32_t>(c) : kNoClassSlot;
    });
    float* row_out = out + n * O * P + oy * Wo;
    // One channel's weights (2 KiB at 16 taps) stay in L1 across the row's positions; 8 vectors
    // of positions at a time keep 8 independent add chains in flight.
    for (int64_t o = 0; o < O; ++o) {
      const float* w = wp + o * K * 32;
      float* dst = row_out + o * P;
      int64_t x0 = 0;
      for (; x0 + 128 <= Wo; x0 += 128) permute_block<8>(w, K, slots.data() + x0, width, bias[o], dst + x0, 128);
      for (; x0 < Wo; x0 += 32) permute_block<2>(w, K, slots.data() + x0, width, bias[o], dst + x0, Wo - x0);
    }
  }
}

// Runs forward_rows_permute_avx512 where it applies (float32, C < kNoClassSlot); false
// otherwise.
template <typename label_t, typename acc_t, typename out_t>
bool forward_permute(const Geometry& g, const Tensor& weight, const label_t* labels, const acc_t* bias, out_t* out,
                     int64_t grain) {
  if constexpr (std::is_same_v<out_t, float>) {
    if (g.C >= kNoClassSlot) return false;
    // (O, taps, 32): W[o, c, t] at [o, t, c], zeros from class C on.
    const Tensor wp = at::constant_pad_nd(weight.permute({0, 2, 3, 1}), {0, 32 - g.C}).contiguous();
    const float* w = wp.const_data_ptr<float>();
    at::parallel_for(0, g.N * g.Ho, grain, [&](int64_t begin, int64_t end) {
      forward_rows_permute_avx512<label_t>(g, labels, w, bias, out, begin, end);
    });
    return true;
  }
  return false;
}
#endif

Tensor one_hot_conv2d_cpu(const Tensor& labels, const Tensor& weight, const std::optional<Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t ignore_index) {
  check_float(weight, "weight");
  const Geometry g = make_geometry(labels, weight.sizes(), stride, padding, dilation, ignore_index);
  TORCH_CHECK_VALUE(labels.device() == weight.device(), "segkernels.one_hot_conv2d: labels must be on ",
                    weight.device(), ", got ", labels.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "segkernels.one_hot_conv2d: bias must be ",
                     weight.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.O, "segkernels.one_hot_conv2d: bias must be (", g.O,
                      ",), got ", bias->sizes());
  }
  check_label_values(labels, g.C, g.ignore_index);
  Tensor out = new_output({g.N, g.O, g.Ho, g.Wo}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "one_hot_conv2d_cpu", [&] {
    using out_t = scalar_t;
    using acc_t = at::opmath_type<out_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    // (taps * C, O): the column a tap's class selects is contiguous over the output channels;
    // then a zero column, for taps that read no class and as the bias when there is none.
    const Tensor wt = at::cat({weight.to(acc_type).permute({2, 3, 1, 0}).reshape({g.taps() * g.C, g.O}),
                               at::zeros({1, g.O}, weight.options().dtype(acc_type))});
    const Tensor b = has_bias ? bias->to(acc_type).contiguous() : Tensor();
    const acc_t* w = wt.const_data_ptr<acc_t>();
    const acc_t* bp = has_bias ? b.const_data_ptr<acc_t>() : w + g.taps() * g.C * g.O;
    out_t* dst = out.mutable_data_ptr<out_t>();
    AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "one_hot_conv2d_cpu_labels", [&] {
      const scalar_t* lab = labels.const_data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.Wo * g.taps() * g.O));
      const CpuLevel level = cpu_level();
#if SEGKERNELS_CPU_AVX2
      if (level == CpuLevel::kAvx512 && forward_permute(g, weight, lab, bp, dst, grain)) return;
#endif
      at::parallel_for(0, g.N * g.Ho, grain, [&](int64_t begin, int64_t end) {
#if SEGKERNELS_CPU_AVX2
        if (level == CpuLevel::kAvx512)
          return forward_rows_avx512<scalar_t, acc_t, out_t>(g, lab, w, bp, dst, begin, end);
        if (level == CpuLevel::kAvx2) return forward_rows_avx2<scalar_t, acc_t, out_t>(g, lab, w, bp, dst, begin, end);
#endif
        (void)level;
        forward_rows<scalar_t, acc_t, out_t>(g, lab, w, bp, dst, begin, end);
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Weight backward

// For every output position p (flattened n, oy, ox) and tap t: class * taps + t, or -1 where
// the tap reads padding or an ignored pixel.
template <typename label_t>
std::vector<int32_t> tap_table(const Geometry& g, const label_t* labels) {
  const int64_t K = g.taps(), P = g.N * g.positions();
  std::vector<int32_t> table(P * K);
  at::parallel_for(0, g.N * g.Ho, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.Wo * K)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       int32_t* row = table.data() + r * g.Wo * K;
                       tap_classes(g, labels, r / g.Ho, r % g.Ho, 0, g.Wo, [&](int64_t t, int64_t x, int64_t c) {
                         row[x * K + t] = c >= 0 ? static_cast<int32_t>(c * K + t) : -1;
                       });
                     }
                   });
  return table;
}

// Element strides of the output gradient over images, channels and flattened positions.
struct GradStrides {
  int64_t n, o, p;
};

template <typename scalar_t>
using grad_part_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Output-channel blocks [begin, end) of B channels each, of the weight (and bias) gradient; see
// the file comment. For each run of kChunk positions the block's gradients are first transposed
// to position-major rows (so each position loads whole vectors), then each position adds its row
// to the partial-sum rows its taps' entries name. The partials are added into float64 totals
// every `chunk` positions. Partials are float for 16- and 32-bit gradients (adds at twice the
// width of double ones, a float sum never longer than a chunk) and double for float64, whose
// gradient must stay float64-exact. Each element's sums run in the same order whatever B, the
// vector width and the threads: the gradient is bitwise repeatable.
template <int64_t B, int kBytes, typename scalar_t>
SK_ALWAYS_INLINE void weight_grad_blocks_impl(const Geometry& g, const scalar_t* go, const GradStrides& gs,
                                              const int32_t* table, scalar_t* gw, scalar_t* gb, int64_t begin,
                                              int64_t end) {
  using part_t = grad_part_t<scalar_t>;
  using V = Vec<part_t, kBytes>;
  constexpr int64_t L = V::lanes, kVecs = B / L;
  static_assert(B % L == 0, "a block is whole vectors");
  const int64_t K = g.taps(), P = g.positions(), CK = g.C * K;
  // Long enough that adding the partial table into the totals costs a fraction of the chunk.
  const int64_t chunk = std::max<int64_t>(512, CK);
  std::vector<part_t> part((CK + 1) * B);  // row CK: the bias
  std::vector<double> total((CK + 1) * B);
  std::vector<part_t> grads(kChunk * B);  // position-major gradients of kChunk positions
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t o0 = blk * B, os = std::min(B, g.O - o0);
    std::fill(total.begin(), total.end(), 0.0);
    std::fill(grads.begin(), grads.end(), part_t(0));  // channels past O stay zero
    for (int64_t n = 0; n < g.N; ++n) {
      const scalar_t* rows = go + n * gs.n + o0 * gs.o;
      const int32_t* tabs = table + n * P * K;
      for (int64_t p0 = 0; p0 < P; p0 += chunk) {
        std::fill(part.begin(), part.end(), part_t(0));
        part_t* bias_row = part.data() + CK * B;
        const int64_t p_end = std::min(P, p0 + chunk);
        for (int64_t q0 = p0; q0 < p_end; q0 += kChunk) {
          const int64_t qs = std::min(kChunk, p_end - q0);
          if (gs.p == 1) {  // NCHW: a transpose
            transpose_block(rows + q0, gs.o, qs, os, grads.data(), B);
          } else {  // channels_last: already position-major
            for (int64_t q = 0; q < qs; ++q)
              for (int64_t o = 0; o < os; ++o)
                grads[q * B + o] = static_cast<part_t>(rows[(q0 + q) * gs.p + o * gs.o]);
          }
          for (int64_t q = 0; q < qs; ++q) {
            typename V::type gv[kVecs];
            for (int64_t v = 0; v < kVecs; ++v) {
              gv[v] = V::load(grads.data() + q * B + v * L);
              V::store(bias_row + v * L, V::load(bias_row + v * L) + gv[v]);
            }
            const int32_t* tp = tabs + (q0 + q) * K;
            for (int64_t t = 0; t < K; ++t) {
              const int32_t idx = tp[t];
              if (idx < 0) continue;
              part_t* a = part.data() + static_cast<int64_t>(idx) * B;
              for (int64_t v = 0; v < kVecs; ++v) V::store(a + v * L, V::load(a + v * L) + gv[v]);
            }
          }
        }
        for (int64_t e = 0; e < (CK + 1) * B; ++e) total[e] += static_cast<double>(part[e]);
      }
    }
    for (int64_t o = 0; o < os; ++o) {
      scalar_t* dst = gw + (o0 + o) * CK;
      for (int64_t e = 0; e < CK; ++e) dst[e] = static_cast<scalar_t>(total[e * B + o]);
      gb[o0 + o] = static_cast<scalar_t>(total[CK * B + o]);
    }
  }
}

template <int64_t B, typename scalar_t>
void weight_grad_blocks(const Geometry& g, const scalar_t* go, const GradStrides& gs, const int32_t* table,
                        scalar_t* gw, scalar_t* gb, int64_t begin, int64_t end) {
  weight_grad_blocks_impl<B, 32, scalar_t>(g, go, gs, table, gw, gb, begin, end);
}

#if SEGKERNELS_CPU_AVX2
template <int64_t B, typename scalar_t>
SK_TARGET_AVX2 void weight_grad_blocks_avx2(const Geometry& g, const scalar_t* go, const GradStrides& gs,
                                            const int32_t* table, scalar_t* gw, scalar_t* gb, int64_t begin,
                                            int64_t end) {
  weight_grad_blocks_impl<B, 32, scalar_t>(g, go, gs, table, gw, gb, begin, end);
}

template <int64_t B, typename scalar_t>
SK_TARGET_AVX512 void weight_grad_blocks_avx512(const Geometry& g, const scalar_t* go, const GradStrides& gs,
                                                const int32_t* table, scalar_t* gw, scalar_t* gb, int64_t begin,
                                                int64_t end) {
  weight_grad_blocks_impl<B, 64, scalar_t>(g, go, gs, table, gw, gb, begin, end);
}
#endif

// One task per block of B output channels.
template <int64_t B, typename scalar_t>
void weight_grad(const Geometry& g, const scalar_t* go, const GradStrides& gs, const int32_t* table, scalar_t* gw,
                 scalar_t* gb) {
  const CpuLevel level = cpu_level();
  at::parallel_for(0, ceil_div(g.O, B), 1, [&](int64_t begin, int64_t end) {
#if SEGKERNELS_CPU_AVX2
    if (level == CpuLevel::kAvx512)
      return weight_grad_blocks_avx512<B, scalar_t>(g, go, gs, table, gw, gb, begin, end);
    if (level == CpuLevel::kAvx2) return weight_grad_blocks_avx2<B, scalar_t>(g, go, gs, table, gw, gb, begin, end);
#endif
    weight_grad_blocks<B, scalar_t>(g, go, gs, table, gw, gb, begin, end);
  });
}

std::tuple<Tensor, Tensor> one_hot_conv2d_weight_backward_cpu(const Tensor& grad_in, const Tensor& labels,
                                                              at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              int64_t ignore_index) {
  check_float(grad_in, "grad_output");
  const Geometry g = make_geometry(labels, weight_size, stride, padding, dilation, ignore_index);
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({g.N, g.O, g.Ho, g.Wo}),
                    "segkernels.one_hot_conv2d_weight_backward: grad_output must be (", g.N, ", ", g.O, ", ", g.Ho,
                    ", ", g.Wo, "), got ", grad_in.sizes());
  TORCH_CHECK_VALUE(g.C * g.taps() < (int64_t{1} << 31),
                    "segkernels.one_hot_conv2d_weight_backward: classes x taps must fit int32, got ", g.C * g.taps());
  check_label_values(labels, g.C, g.ignore_index);
  // Positions (Ho, Wo) must flatten to one stride: NCHW and channels_last gradients are read in
  // place (channels_last rows are already position-major), others are copied.
  const int64_t position_stride = g.Wo == 1 ? grad_in.stride(2) : grad_in.stride(3);
  const bool flat = g.Ho == 1 || grad_in.stride(2) == g.Wo * position_stride;
  const Tensor grad = flat ? grad_in : grad_in.contiguous();
  const GradStrides gs{grad.stride(0), grad.stride(1), flat ? position_stride : 1};
  const auto options = grad.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor grad_weight = new_output(weight_size, options);
  Tensor grad_bias = new_output({g.O}, options);
  if (g.O == 0) return {grad_weight, grad_bias};
  std::vector<int32_t> table;
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "one_hot_conv2d_tap_table",
                             [&] { table = tap_table(g, labels.const_data_ptr<scalar_t>()); });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "one_hot_conv2d_weight_backward", [&] {
    const scalar_t* go = grad.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    // Wide blocks (fewer passes over the table) when there are enough of them for every thread,
    // narrow ones otherwise; both give the same bits (see weight_grad_blocks_impl).
    if (ceil_div(g.O, 32) >= at::get_num_threads())
      weight_grad<32, scalar_t>(g, go, gs, table.data(), gw, gb);
    else
      weight_grad<16, scalar_t>(g, go, gs, table.data(), gw, gb);
  });
  return {grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// label_fractions

Tensor label_fractions_cpu(const Tensor& labels, int64_t classes, int64_t factor, int64_t ignore_index) {
  check_labels(labels, "label_fractions");
  TORCH_CHECK_VALUE(classes >= 1, "segkernels.label_fractions: num_classes must be >= 1, got ", classes);
  TORCH_CHECK_VALUE(factor >= 1, "segkernels.label_fractions: factor must be >= 1, got ", factor);
  const int64_t N = labels.size(0), H = labels.size(1), W = labels.size(2);
  const int64_t Ho = H / factor, Wo = W / factor;
  // The kernel reads (and checks) the pixels of whole cells; the rows and columns past the last
  // whole cell are checked here.
  const int64_t leftover = count_invalid_labels(labels, classes, ignore_index, Ho * factor, H, 0, W) +
                           count_invalid_labels(labels, classes, ignore_index, 0, Ho * factor, Wo * factor, W);
  Tensor out = new_output({N, classes, Ho, Wo}, labels.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    raise_invalid(leftover, classes, ignore_index);
    return out;
  }
  std::atomic<int64_t> invalid{leftover};
  const int64_t sN = labels.stride(0), sH = labels.stride(1), sW = labels.stride(2);
  // avg_pool2d's divisor, applied the same way (a float count divided by factor * factor).
  const float area = static_cast<float>(factor * factor);
  float* dst = out.mutable_data_ptr<float>();
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "label_fractions_cpu", [&] {
    const scalar_t* lab = labels.const_data_ptr<scalar_t>();
    const int64_t work = std::max<int64_t>(1, factor * factor * Wo + classes * Wo);
    at::parallel_for(0, N * Ho, std::max<int64_t>(1, 65536 / work), [&](int64_t begin, int64_t end) {
      std::vector<int32_t> counts(Wo * classes);  // counts[ox * classes + c]
      int64_t bad = 0;
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / Ho, oy = r - n * Ho;
        std::fill(counts.begin(), counts.end(), 0);
        for (int64_t fy = 0; fy < factor; ++fy) {
          const scalar_t* row = lab + n * sN + (oy * factor + fy) * sH;
          for (int64_t x = 0; x < Wo * factor; ++x) {
            const int64_t c = classify(static_cast<int64_t>(row[x * sW]), classes, ignore_index);
            if (c >= 0)
              ++counts[(x / factor) * classes + c];
            else
              bad += c == kInvalid;
          }
        }
        for (int64_t c = 0; c < classes; ++c) {
          float* plane = dst + ((n * classes + c) * Ho + oy) * Wo;
          for (int64_t ox = 0; ox < Wo; ++ox) plane[ox] = static_cast<float>(counts[ox * classes + c]) / area;
        }
      }
      if (bad) invalid += bad;
    });
  });
  raise_invalid(invalid.load(), classes, ignore_index);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("one_hot_conv2d", &one_hot_conv2d_cpu);
  m.impl("one_hot_conv2d_weight_backward", &one_hot_conv2d_weight_backward_cpu);
  m.impl("label_fractions", &label_fractions_cpu);
}

}  // namespace one_hot_conv2d
}  // namespace segkernels
