// CPU kernels of the tempered-softmax distillation losses: pixel-wise (softmax over channels,
// optional ignore mask), channel-wise (softmax over all spatial positions of each (n, c) row),
// several students against one teacher read once, and seg_kd_loss (hard CE + soft KD in one
// pass). Each kernel returns the loss and the student gradient, computed in the same pass and
// stored in the input dtype; the Python autograd backward only scales it.
//
// Channel axis: tiles of up to kMaxTile contiguous positions; loops over C with the positions in the
// inner (contiguous, vectorisable) loop for NCHW; channels-last is read in place. The teacher's
// exponentials of a tile are kept in a scratch buffer and reused for every student.
// Spatial axis: one task per (n, c) row, a chunked online softmax (running max and rescaled sum)
// then a second pass for the terms and the gradient: rows of any length in two reads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "common_host.h"

// Lets the selects in the inner loops become vector blends (they have no side effects).
#pragma GCC optimize("no-trapping-math")
#include "kd_loss/kd_loss.h"

namespace segkernels {
namespace kd_loss {
namespace {

using at::Tensor;

// Positions per task on the channel axis. Long runs along each of the C rows keep the hardware
// prefetchers streaming: tiles of 64 positions ran at half the speed of 256-512 on the 2-core
// EPYC VM (C = 19, bfloat16). The C x tile scratch of exponentials (two or three of them) should
// still stay in L2, hence fewer positions for many classes.
constexpr int64_t kMaxTile = 512;
constexpr int64_t kScratchFloats = 16384;
inline int64_t channel_tile(int64_t C) {
  int64_t tile = kMaxTile;
  while (tile > 64 && C * tile > kScratchFloats) tile /= 2;
  return tile;
}
constexpr int64_t kChunk = 2048;  // row elements per online-softmax step on the spatial axis
// Spatial rows up to this length keep their exponentials (two rows of floats per thread, 256 KiB
// at most, within L2) instead of recomputing them.
constexpr int64_t kStoredRow = 32768;

template <typename acc_t>
struct HardPart {  // seg_kd_loss's cross-entropy part (K == 1 only)
  const acc_t* weight = nullptr;  // C class weights or null
  acc_t hard_coef = 0;            // hard_weight / sum of the valid positions' weights
  acc_t soft_coef = 1;            // soft_weight / number of valid positions
  double* partials = nullptr;     // one partial loss per task, summed in order afterwards
};

namespace generic {
#include "kd_loss/kd_loss_cpu_kernels.h"
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define SEGKERNELS_KD_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kd_loss/kd_loss_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef SEGKERNELS_KD_AVX2
  return cpu_has_avx2();
#else
  return false;
#endif
}

#ifdef SEGKERNELS_KD_AVX2
// float16 stays on the baseline build: its conversions are out-of-line c10 code, and calling
// non-VEX code from AVX loops costs far more than it saves.
#define SK_KD_DISPATCH(fn, ...)                                        \
  ((use_avx2() && !std::is_same_v<scalar_t, c10::Half>) ? avx2::fn(__VA_ARGS__) \
                                                         : generic::fn(__VA_ARGS__))
#else
#define SK_KD_DISPATCH(fn, ...) generic::fn(__VA_ARGS__)
#endif

bool all_channels_last(const std::vector<Tensor>& ts) {
  for (const Tensor& x : ts) {
    if (x.dim() != 4 && x.dim() != 5) return false;
    if (x.is_contiguous()) return false;
    if (!x.is_contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d))
      return false;
  }
  return true;
}

// A fresh tensor of x's sizes, in NCHW-contiguous or channels-last order.
Tensor new_like(const Tensor& x, bool channels_last) {
  if (!channels_last) return new_output(x.sizes(), x.options());
  std::vector<int64_t> perm_sizes{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) perm_sizes.push_back(x.size(d));
  perm_sizes.push_back(x.size(1));
  std::vector<int64_t> back{0, x.dim() - 1};
  for (int64_t d = 1; d < x.dim() - 1; ++d) back.push_back(d);
  return new_output(perm_sizes, x.options()).permute(back);
}

void check_inputs(const char* op, const std::vector<Tensor>& students, const Tensor& teacher) {
  TORCH_CHECK_VALUE(!students.empty(), "segkernels.", op, ": needs at least one student");
  TORCH_CHECK_VALUE(teacher.dim() >= 2, "segkernels.", op, ": teacher must be (N, C, *spatial), got ",
                    teacher.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(teacher.scalar_type()), "segkernels.", op,
                   ": logits must be floating point, got ", teacher.scalar_type());
  for (const Tensor& s : students) {
    TORCH_CHECK_VALUE(s.sizes() == teacher.sizes(), "segkernels.", op, ": student ", s.sizes(),
                      " and teacher ", teacher.sizes(), " must have the same shape");
    TORCH_CHECK_TYPE(s.scalar_type() == teacher.scalar_type(), "segkernels.", op, ": student ",
                     s.scalar_type(), " and teacher ", teacher.scalar_type(), " must have the same dtype");
    TORCH_CHECK_VALUE(s.device() == teacher.device(), "segkernels.", op, ": inputs must share a device");
  }
}

void check_labels(const char* op, const Tensor& labels, const Tensor& teacher) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "segkernels.", op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == teacher.dim() - 1 && labels.size(0) == teacher.size(0) &&
                        labels.sizes().slice(1) == teacher.sizes().slice(2),
                    "segkernels.", op, ": labels must be (N, *spatial) = ", teacher.size(0), " x ",
                    teacher.sizes().slice(2), ", got ", labels.sizes());
}

// Returns the loss map (K, N, *spatial) for spatial=False or (K, N, C) for spatial=True, in the
// accumulation dtype (float32 for 16-bit inputs), each student's gradient of its map's sum, and
// with teacher_grad the teacher's gradient of each student's map sum (else none).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> kd_loss_cpu(
    at::TensorList students_in, const Tensor& teacher_in, const std::optional<Tensor>& labels_in, double temperature,
    bool spatial, int64_t divergence, bool scale_by_t2, int64_t ignore_index, bool teacher_grad, double beta) {
  std::vector<Tensor> students(students_in.begin(), students_in.end());
  check_inputs("kd_loss", students, teacher_in);
  TORCH_CHECK_VALUE(divergence >= kKL && divergence <= kJS, "segkernels.kd_loss: divergence must be 0 (kl), 1 (ce), ",
                    "2 (reverse_kl) or 3 (js), got ", divergence);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "segkernels.kd_loss: beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "segkernels.kd_loss: temperature must be ",
                    "positive and finite, got ", temperature);
  TORCH_CHECK_VALUE(!(spatial && labels_in.has_value()),
                    "segkernels.kd_loss: labels are only supported with axis='channel'");
  const int64_t K = static_cast<int64_t>(students.size());
  const int64_t N = teacher_in.size(0), C = teacher_in.size(1);
  const int64_t P = N == 0 || C == 0 ? 0 : teacher_in.numel() / (N * C);
  std::vector<Tensor> all(students);
  all.push_back(teacher_in);
  const bool cl = !spatial && all_channels_last(all);
  for (Tensor& x : all) x = cl ? x : x.contiguous();
  const Tensor teacher = all.back();
  Tensor labels;
  if (labels_in.has_value()) {
    check_labels("kd_loss", *labels_in, teacher_in);
    labels = labels_in->contiguous();
  }
  const auto acc_type = teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> map_sizes{K, N};
  if (spatial) {
    map_sizes.push_back(C);
  } else {
    for (int64_t d = 2; d < teacher.dim(); ++d) map_sizes.push_back(teacher.size(d));
  }
  Tensor loss = new_output(map_sizes, teacher.options().dtype(acc_type));
  std::vector<Tensor> grads, teacher_grads;
  for (int64_t k = 0; k < K; ++k) grads.push_back(new_like(all[k], cl));
  if (teacher_grad)
    for (int64_t k = 0; k < K; ++k) teacher_grads.push_back(new_like(teacher, cl));
  if (N * C * P == 0) {  // nothing to read; an empty distribution has zero loss
    loss.zero_();
    for (Tensor& gr : grads) gr.zero_();
    for (Tensor& gr : teacher_grads) gr.zero_();
    return {loss, grads, teacher_grads};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> sp;
    std::vector<scalar_t*> gp, tgp;
    for (int64_t k = 0; k < K; ++k) {
      sp.push_back(all[k].const_data_ptr<scalar_t>());
      gp.push_back(grads[k].mutable_data_ptr<scalar_t>());
      if (teacher_grad) tgp.push_back(teacher_grads[k].mutable_data_ptr<scalar_t>());
    }
    scalar_t* const* tg = teacher_grad ? tgp.data() : nullptr;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t scale = static_cast<acc_t>(scale_by_t2 ? temperature * temperature : 1.0);
    const scalar_t* tp = teacher.const_data_ptr<scalar_t>();
    acc_t* lossp = loss.mutable_data_ptr<acc_t>();
    const int64_t* lp = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
    if (spatial) {
      SK_KD_DISPATCH(run_spatial<scalar_t>, static_cast<int>(divergence), N * C, P, K, sp.data(), tp, gp.data(), lossp,
                     inv_t, scale, tg, static_cast<acc_t>(beta));
    } else {
      SK_KD_DISPATCH(run_channel<scalar_t>, !cl, static_cast<int>(divergence), N, C, P, K, sp.data(), tp, gp.data(),
                     lossp, lp, ignore_index, inv_t, scale, tg, static_cast<acc_t>(beta));
    }
  });
  return {loss, grads, teacher_grads};
}

// hard_weight * cross_entropy(student, labels, weight, ignore_index) (mean over the valid
// positions' weights) + soft_weight * T^2 * KL(teacher || student at T) (mean over the valid
// positions). Returns the 0-d loss (accumulation dtype), the student's gradient of it, and with
// teacher_grad the teacher's (else an empty tensor). A part whose denominator is zero (every
// position ignored) contributes 0 and no gradient.
std::tuple<Tensor, Tensor, Tensor> seg_kd_loss_cpu(const Tensor& student_in, const Tensor& teacher_in,
                                                   const Tensor& labels_in, const std::optional<Tensor>& class_weight,
                                                   double temperature, double hard_weight, double soft_weight,
                                                   int64_t ignore_index, bool teacher_grad) {
  check_inputs("seg_kd_loss", {student_in}, teacher_in);
  check_labels("seg_kd_loss", labels_in, teacher_in);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "segkernels.seg_kd_loss: temperature must be ",
                    "positive and finite, got ", temperature);
  const int64_t N = teacher_in.size(0), C = teacher_in.size(1);
  const int64_t P = N == 0 || C == 0 ? 0 : teacher_in.numel() / (N * C);
  const bool cl = all_channels_last({student_in, teacher_in});
  const Tensor student = cl ? student_in : student_in.contiguous();
  const Tensor teacher = cl ? teacher_in : teacher_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const auto acc_type = teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor weight;
  if (class_weight.has_value()) {
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == C,
                      "segkernels.seg_kd_loss: class_weight must be (C,) = (", C, ",), got ", class_weight->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(class_weight->scalar_type()),
                     "segkernels.seg_kd_loss: class_weight must be floating point");
    weight = class_weight->to(acc_type).contiguous();
  }
  // Pre-pass over the labels: the denominators of both means, and the label range check.
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  const int64_t positions = labels.numel();
  int64_t count = 0;
  double weight_sum = 0;
  AT_DISPATCH_FLOATING_TYPES(acc_type, "seg_kd_loss_denominators", [&] {
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < positions; ++i) {
      const int64_t y = lp[i];
      if (y == ignore_index) continue;
      TORCH_CHECK_INDEX(y >= 0 && y < C, "segkernels.seg_kd_loss: label ", y, " outside [0, ", C,
                        ") and not ignore_index=", ignore_index);
      ++count;
      weight_sum += w ? static_cast<double>(w[y]) : 1.0;
    }
  });
  Tensor grad = new_like(student, cl);
  Tensor tgrad = teacher_grad ? new_like(teacher, cl) : at::empty({0}, teacher.options());
  Tensor loss = new_output({}, teacher.options().dtype(acc_type));
  if (N * C * P == 0) {
    grad.zero_();
    tgrad.zero_();
    loss.zero_();
    return {loss, grad, tgrad};
  }
  const int64_t tile = channel_tile(C);
  const int64_t tasks = N * ((P + tile - 1) / tile);
  std::vector<double> partials(tasks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "seg_kd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    HardPart<acc_t> hard;
    hard.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    hard.hard_coef = weight_sum != 0 ? static_cast<acc_t>(hard_weight / weight_sum) : acc_t(0);
    hard.soft_coef = count > 0 ? static_cast<acc_t>(soft_weight / static_cast<double>(count)) : acc_t(0);
    hard.partials = partials.data();
    const scalar_t* sp = student.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t scale = static_cast<acc_t>(temperature * temperature);
    SK_KD_DISPATCH(run_hard<scalar_t>, !cl, N, C, P, sp, teacher.const_data_ptr<scalar_t>(), gp, lp, ignore_index,
                   inv_t, scale, &hard, teacher_grad ? tgrad.mutable_data_ptr<scalar_t>() : nullptr);
  });
  double total = 0;
  for (double v : partials) total += v;
  // A total past the float range reads inf, as a float32 sum would; fill_ refuses to narrow it.
  if (acc_type == at::kFloat && std::abs(total) > static_cast<double>(std::numeric_limits<float>::max()))
    total = std::copysign(std::numeric_limits<double>::infinity(), total);
  loss.fill_(total);
  return {loss, grad, tgrad};
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("kd_loss", &kd_loss_cpu);
  m.impl("seg_kd_loss", &seg_kd_loss_cpu);
}

}  // namespace kd_loss
}  // namespace segkernels
