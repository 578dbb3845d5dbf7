// CPU kernels of cross_entropy over bilinearly upsampled logits (cross_entropy.h): the loss of
// F.cross_entropy(F.interpolate(input, (H, W), mode="bilinear"), target) and its gradient with
// respect to input, without the upsampled logits, their softmax or their gradient.
//
// F.interpolate blends along the columns, then along the rows. The forward keeps that order: a
// task runs over output rows in order and upsamples each low-resolution row along the columns
// once (ColumnBlendCache, upsample_argmax_cpu_blend.h), so an output row is two contiguous
// blends, not four gathers per logit. The backward transposes it: output rows add their gradient, scaled by their row
// weights, into full-width accumulators of the low-resolution rows they read, and each of those
// is reduced along the columns once, when complete. Per pixel the softmax runs over the classes
// of a tile of columns, with the columns in the inner (vectorised) loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common_host.h"

// Lets the selects in the inner loops become vector blends (they have no side effects).
#pragma GCC optimize("no-trapping-math")
#include "cross_entropy/cross_entropy.h"
#include "kd_loss/kd_loss.h"
#include "upsample_argmax/upsample_argmax.h"

namespace segkernels {
namespace cross_entropy {
namespace {

using at::Tensor;
using kd_loss::exp_nonpos;

constexpr int64_t kTile = 256;  // columns per softmax tile: the C x kTile logits stay in L1/L2

// Sizes, strides, interpolation taps and loss parameters shared by every task.
template <typename acc_t>
struct Geometry {
  int64_t N, C, h, w, H, W;
  int64_t sN, sC, sH, sW;  // input strides
  int64_t gN, gC, gH, gW;  // input-gradient strides
  const int64_t* y0;
  const int64_t* y1;
  const acc_t* wy0;
  const acc_t* wy1;
  const int32_t* x0;
  const int32_t* x1;
  const acc_t* wx0;
  const acc_t* wx1;
  // Output columns whose first (second) column tap reads input column x: [run0_begin[x], run0_end[x]).
  const int64_t* run0_begin;
  const int64_t* run0_end;
  const int64_t* run1_begin;
  const int64_t* run1_end;
  const acc_t* weight;  // C class weights, or null
  acc_t w_total;        // their sum (C without)
  acc_t smoothing;
  int64_t ignore;
};

// The taps of both axes, as upsample_argmax computes them (F.interpolate's).
template <typename acc_t>
struct Taps {
  std::vector<int64_t> y0, y1;
  std::vector<acc_t> wy0, wy1;
  std::vector<int32_t> x0, x1;
  std::vector<acc_t> wx0, wx1;
  std::vector<int64_t> run0_begin, run0_end, run1_begin, run1_end;

  Taps(int64_t h, int64_t w, int64_t H, int64_t W, bool align_corners)
      : y0(H), y1(H), wy0(H), wy1(H), x0(W), x1(W), wx0(W), wx1(W),
        run0_begin(w, 0), run0_end(w, 0), run1_begin(w, 0), run1_end(w, 0) {
    for (int64_t Y = 0; Y < H; ++Y) {
      const auto t = upsample_argmax::linear_tap<acc_t>(Y, h, H, align_corners);
      y0[Y] = t.i0;
      y1[Y] = t.i1;
      wy0[Y] = t.w0;
      wy1[Y] = t.w1;
    }
    for (int64_t X = 0; X < W; ++X) {
      const auto t = upsample_argmax::linear_tap<acc_t>(X, w, W, align_corners);
      x0[X] = static_cast<int32_t>(t.i0);
      x1[X] = static_cast<int32_t>(t.i1);
      wx0[X] = t.w0;
      wx1[X] = t.w1;
    }
    // Taps are non-decreasing in X, so the columns reading x in each role are one run.
    for (int64_t X = W - 1; X >= 0; --X) {
      run0_begin[x0[X]] = X;
      run1_begin[x1[X]] = X;
    }
    for (int64_t X = 0; X < W; ++X) {
      run0_end[x0[X]] = X + 1;
      run1_end[x1[X]] = X + 1;
    }
  }

  template <typename G>
  void fill(G& g) const {
    g.y0 = y0.data();
    g.y1 = y1.data();
    g.wy0 = wy0.data();
    g.wy1 = wy1.data();
    g.x0 = x0.data();
    g.x1 = x1.data();
    g.wx0 = wx0.data();
    g.wx1 = wx1.data();
    g.run0_begin = run0_begin.data();
    g.run0_end = run0_end.data();
    g.run1_begin = run1_begin.data();
    g.run1_end = run1_end.data();
  }
};

// The label map, any integer dtype (uint8 label images are read as they are), contiguous; rows
// are widened to int64 one at a time.
struct Labels {
  const void* data;
  at::ScalarType type;
  int64_t W;

  void load_row(int64_t r, int64_t* out) const {
    AT_DISPATCH_INTEGRAL_TYPES(type, "cross_entropy_labels", [&] {
      const scalar_t* p = static_cast<const scalar_t*>(data) + r * W;
      for (int64_t X = 0; X < W; ++X) out[X] = static_cast<int64_t>(p[X]);
    });
  }
};

#define SK_ISA_KERNELS "cross_entropy/cross_entropy_cpu_kernels.h"
#include "cpu_isa_builds.h"

void check_args(const char* op, const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                double smoothing) {
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), "segkernels.", op, ": input must be floating, got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() == 4, "segkernels.", op, ": input must be (N, C, h, w), got ", input.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), "segkernels.", op,
                   ": target must be an integer tensor, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 3 && target.size(0) == input.size(0) && target.size(1) >= input.size(2) &&
                        target.size(2) >= input.size(3),
                    "segkernels.", op, ": target must be (N, H, W) with H >= h and W >= w for input ", input.sizes(),
                    ", got ", target.sizes());
  TORCH_CHECK_VALUE(target.is_contiguous(), "segkernels.", op, ": target must be contiguous");
  TORCH_CHECK_VALUE(input.size(1) >= 1 && (target.numel() == 0 || (input.size(2) >= 1 && input.size(3) >= 1)),
                    "segkernels.", op, ": input needs at least one class and position, got ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) < (int64_t{1} << 31), "segkernels.", op, ": too many classes");
  TORCH_CHECK_VALUE(smoothing >= 0.0 && smoothing <= 1.0, "segkernels.", op,
                    ": label_smoothing must be in [0, 1], got ", smoothing);
  if (weight.has_value()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == input.size(1), "segkernels.", op,
                      ": weight must be (C,) = (", input.size(1), ",), got ", weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), "segkernels.", op, ": weight must be floating, got ",
                     weight->scalar_type());
  }
}

template <typename acc_t>
Geometry<acc_t> make_geometry(const Tensor& input, const Tensor& target, const std::vector<acc_t>& weight,
                              bool has_weight, double smoothing, int64_t ignore_index) {
  Geometry<acc_t> g{};
  g.N = input.size(0);
  g.C = input.size(1);
  g.h = input.size(2);
  g.w = input.size(3);
  g.H = target.size(1);
  g.W = target.size(2);
  g.sN = input.stride(0);
  g.sC = input.stride(1);
  g.sH = input.stride(2);
  g.sW = input.stride(3);
  g.weight = has_weight ? weight.data() : nullptr;
  acc_t total = 0;
  for (int64_t c = 0; c < g.C; ++c) total += has_weight ? weight[c] : acc_t(1);
  g.w_total = total;
  g.smoothing = static_cast<acc_t>(smoothing);
  g.ignore = ignore_index;
  return g;
}

template <typename acc_t>
std::vector<acc_t> weight_values(const std::optional<Tensor>& weight) {
  std::vector<acc_t> out;
  if (!weight.has_value()) return out;
  const Tensor wv = weight->to(at::kCPU, c10::CppTypeToScalarType<acc_t>::value).contiguous();
  out.assign(wv.const_data_ptr<acc_t>(), wv.const_data_ptr<acc_t>() + wv.numel());
  return out;
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_cpu(const Tensor& input, const Tensor& target,
                                                     const std::optional<Tensor>& weight, int64_t ignore_index,
                                                     double label_smoothing, bool align_corners, bool per_pixel,
                                                     bool save_log_sum) {
  check_args("cross_entropy", input, target, weight, label_smoothing);
  const int64_t N = target.size(0), H = target.size(1), W = target.size(2);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = input.options().dtype(acc_type);
  Tensor loss = per_pixel ? new_output({N, H, W}, opts) : new_output({N, H}, opts);
  Tensor weight_sum = new_output({N, H}, opts);
  Tensor log_sum = save_log_sum ? new_output({N, H, W}, opts) : at::empty({0}, opts);
  if (target.numel() == 0) return {loss, weight_sum, log_sum};
  int64_t invalid = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> wv = weight_values<acc_t>(weight);
    Geometry<acc_t> g = make_geometry<acc_t>(input, target, wv, weight.has_value(), label_smoothing, ignore_index);
    const Taps<acc_t> taps(g.h, g.w, H, W, align_corners);
    taps.fill(g);
    const Labels labels{target.const_data_ptr(), target.scalar_type(), W};
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    acc_t* loss_p = loss.mutable_data_ptr<acc_t>();
    acc_t* wsum_p = weight_sum.mutable_data_ptr<acc_t>();
    acc_t* log_sum_p = save_log_sum ? log_sum.mutable_data_ptr<acc_t>() : nullptr;
    std::atomic<int64_t> bad{0};
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, g.C * W));
    at::parallel_for(0, N * H, grain, [&](int64_t begin, int64_t end) {
      int64_t local = 0;
      SK_ISA_DISPATCH(forward_rows, g, x, labels, loss_p, per_pixel, wsum_p, log_sum_p, begin, end,
                     &local);
      bad += local;
    });
    invalid = bad.load();
  });
  TORCH_CHECK_INDEX(invalid == 0, invalid, " labels outside [0, ", input.size(1),
                    ") that are not ignore_index=", ignore_index);
  return {loss, weight_sum, log_sum};
}

// A fresh tensor of x's sizes in x's layout when that is NCHW or channels-last, else NCHW.
Tensor new_grad_like(const Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return new_output({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options()).permute({0, 3, 1, 2});
  }
  return new_output(x.sizes(), x.options());
}

Tensor cross_entropy_backward_cpu(const Tensor& grad, const Tensor& input, const Tensor& target,
                                  const std::optional<Tensor>& weight, const Tensor& log_sum, int64_t ignore_index,
                                  double label_smoothing, bool align_corners) {
  check_args("cross_entropy_backward", input, target, weight, label_smoothing);
  const int64_t N = target.size(0), H = target.size(1), W = target.size(2);
  const auto acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(grad.dim() == 3 && grad.size(0) == N && grad.size(1) == H && grad.size(2) == W,
                    "segkernels.cross_entropy_backward: grad must be (N, H, W) = ", target.sizes(), ", got ",
                    grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == acc_type && log_sum.scalar_type() == acc_type,
                   "segkernels.cross_entropy_backward: grad and log_sum must be ", acc_type);
  TORCH_CHECK_VALUE(log_sum.sizes() == target.sizes() && log_sum.is_contiguous(),
                    "segkernels.cross_entropy_backward: log_sum must be contiguous (N, H, W) = ", target.sizes(),
                    ", got ", log_sum.sizes());
  Tensor grad_in = new_grad_like(input);
  if (grad_in.numel() == 0) return grad_in;
  if (target.numel() == 0) return grad_in.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> wv = weight_values<acc_t>(weight);
    Geometry<acc_t> g = make_geometry<acc_t>(input, target, wv, weight.has_value(), label_smoothing, ignore_index);
    g.gN = grad_in.stride(0);
    g.gC = grad_in.stride(1);
    g.gH = grad_in.stride(2);
    g.gW = grad_in.stride(3);
    const Taps<acc_t> taps(g.h, g.w, H, W, align_corners);
    taps.fill(g);
    const Labels labels{target.const_data_ptr(), target.scalar_type(), W};
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const acc_t* log_s_p = log_sum.const_data_ptr<acc_t>();
    const acc_t* go = grad.const_data_ptr<acc_t>();
    scalar_t* gi = grad_in.mutable_data_ptr<scalar_t>();
    // Tasks of whole low-resolution rows; output rows on a boundary between two are computed
    // by both, so a handful of tasks, not one per row.
    const int64_t rows = N * g.h;
    const int64_t grain = std::max<int64_t>(1, rows / (4 * std::max(1, at::get_num_threads())));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      SK_ISA_DISPATCH(backward_rows, g, x, labels, log_s_p, go, grad.stride(0), grad.stride(1),
                     grad.stride(2), gi, begin, end);
    });
  });
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("cross_entropy", &cross_entropy_cpu);
  m.impl("cross_entropy_backward", &cross_entropy_backward_cpu);
}

}  // namespace cross_entropy
}  // namespace segkernels
