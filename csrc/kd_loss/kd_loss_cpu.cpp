// CPU kernels of the tempered-softmax distillation losses: pixel-wise (softmax over channels,
// optional ignore mask), channel-wise (softmax over all spatial positions of each (n, c) row),
// several students against one teacher read once, and seg_kd_loss (hard CE + soft KD in one
// pass). Each kernel returns the loss and the student gradient, computed in the same pass and
// stored in the input dtype; the Python autograd backward only scales it.
//
// Channel axis: tiles of kTile contiguous positions; loops over C with the positions in the
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
#include <limits>
#include <vector>

#include "common_host.h"
#include "kd_loss/kd_loss.h"

namespace segkernels {
namespace kd_loss {
namespace {

using at::Tensor;

constexpr int64_t kTile = 64;     // positions per task on the channel axis
constexpr int64_t kChunk = 2048;  // row elements per online-softmax step on the spatial axis

template <typename acc_t>
struct HardPart {  // seg_kd_loss's cross-entropy part (K == 1 only)
  const acc_t* weight = nullptr;  // C class weights or null
  acc_t hard_coef = 0;            // hard_weight / sum of the valid positions' weights
  acc_t soft_coef = 1;            // soft_weight / number of valid positions
  double* partials = nullptr;     // one partial loss per task, summed in order afterwards
};

template <typename scalar_t, typename acc_t, bool CONTIG>
struct ChannelKernel {
  int64_t N, C, P;
  int64_t K;
  const scalar_t* const* s;  // K students
  const scalar_t* t;
  scalar_t* const* g;  // K gradients (same layout as the inputs)
  acc_t* loss;         // (K, N, P) map, or null with a hard part
  const int64_t* labels;
  int64_t ignore;
  acc_t inv_t, scale;  // 1 / T and T^2 (or 1)
  bool kl;
  const HardPart<acc_t>* hard;

  int64_t off(int64_t c, int64_t p) const { return CONTIG ? c * P + p : p * C + c; }

  // Max and log-sum-exp of x * mul over the channels for `len` positions; optionally keeps the
  // exponentials exp(x * mul - max) in e (C x kTile).
  void stats(const scalar_t* x, int64_t p0, int64_t len, acc_t mul, acc_t* m, acc_t* e, acc_t* rz, acc_t* lz) const {
    for (int64_t i = 0; i < len; ++i) m[i] = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t v = static_cast<acc_t>(x[off(c, p0 + i)]) * mul;
        m[i] = v > m[i] ? v : m[i];
      }
    }
    for (int64_t i = 0; i < len; ++i) rz[i] = 0;
    for (int64_t c = 0; c < C; ++c) {
      acc_t* ec = e ? e + c * kTile : nullptr;
      for (int64_t i = 0; i < len; ++i) {
        const acc_t ex = exp_nonpos(static_cast<acc_t>(x[off(c, p0 + i)]) * mul - m[i]);
        if (ec) ec[i] = ex;
        rz[i] += ex;
      }
    }
    for (int64_t i = 0; i < len; ++i) {
      lz[i] = std::log(rz[i]);
      rz[i] = acc_t(1) / rz[i];
    }
  }

  void run() const {
    const int64_t tiles = (P + kTile - 1) / kTile;
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> et(C * kTile), es(C * kTile);
      acc_t mt[kTile], rzt[kTile], lzt[kTile], ms[kTile], rzs[kTile], lzs[kTile], acc[kTile];
      acc_t m1[kTile], rz1[kTile], lz1[kTile], wy[kTile];
      bool valid[kTile];
      int64_t lab[kTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / tiles;
        const int64_t p0 = (task % tiles) * kTile;
        const int64_t len = std::min<int64_t>(kTile, P - p0);
        const int64_t nb = n * C * P;
        for (int64_t i = 0; i < len; ++i) {
          lab[i] = labels ? labels[n * P + p0 + i] : 0;
          valid[i] = !labels || lab[i] != ignore;
          if (!valid[i]) lab[i] = 0;  // a safe class index for the hard part
        }
        const scalar_t* tb = t + nb;
        stats(tb, p0, len, inv_t, mt, et.data(), rzt, lzt);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sb = s[k] + nb;
          scalar_t* gb = g[k] + nb;
          stats(sb, p0, len, inv_t, ms, es.data(), rzs, lzs);
          for (int64_t i = 0; i < len; ++i) acc[i] = 0;
          double hard_loss = 0;
          if (hard) {
            if (inv_t == acc_t(1)) {
              std::copy(ms, ms + len, m1);
              std::copy(rzs, rzs + len, rz1);
              std::copy(lzs, lzs + len, lz1);
            } else {
              stats(sb, p0, len, acc_t(1), m1, nullptr, rz1, lz1);
            }
            for (int64_t i = 0; i < len; ++i) {
              wy[i] = hard->weight ? hard->weight[lab[i]] : acc_t(1);
              const acc_t ce = -(static_cast<acc_t>(sb[off(lab[i], p0 + i)]) - m1[i] - lz1[i]) * wy[i];
              hard_loss += valid[i] ? static_cast<double>(ce) : 0.0;
              wy[i] = valid[i] ? wy[i] * hard->hard_coef : acc_t(0);
            }
          }
          const acc_t gscale = scale * inv_t * (hard ? hard->soft_coef : acc_t(1));
          for (int64_t c = 0; c < C; ++c) {
            const acc_t* etc = et.data() + c * kTile;
            const acc_t* esc = es.data() + c * kTile;
            for (int64_t i = 0; i < len; ++i) {
              const int64_t o = off(c, p0 + i);
              const acc_t a = static_cast<acc_t>(sb[o]) * inv_t;
              const acc_t b = static_cast<acc_t>(tb[o]) * inv_t;
              const acc_t pt = etc[i] * rzt[i];
              const acc_t ps = esc[i] * rzs[i];
              acc[i] += divergence_term<acc_t>(pt, b - mt[i] - lzt[i], a - ms[i] - lzs[i], kl);
              acc_t gv = gscale * (ps - pt);
              if (hard) {
                const acc_t p1 = inv_t == acc_t(1) ? ps : exp_nonpos(static_cast<acc_t>(sb[o]) - m1[i] - lz1[i]);
                gv += wy[i] * (p1 - (c == lab[i] ? acc_t(1) : acc_t(0)));
              }
              gb[o] = static_cast<scalar_t>(valid[i] ? gv : acc_t(0));
            }
          }
          if (hard) {
            double soft_loss = 0;
            for (int64_t i = 0; i < len; ++i) soft_loss += valid[i] ? static_cast<double>(acc[i]) : 0.0;
            hard->partials[task] = static_cast<double>(hard->hard_coef) * hard_loss +
                                   static_cast<double>(hard->soft_coef) * static_cast<double>(scale) * soft_loss;
          } else {
            acc_t* lrow = loss + (k * N + n) * P + p0;
            for (int64_t i = 0; i < len; ++i) lrow[i] = valid[i] ? scale * acc[i] : acc_t(0);
          }
        }
      }
    });
  }
};

template <typename scalar_t, typename acc_t>
struct SpatialKernel {
  int64_t rows, L, K;  // rows = N * C, each of length L (contiguous)
  const scalar_t* const* s;
  const scalar_t* t;
  scalar_t* const* g;
  acc_t* loss;  // (K, rows)
  acc_t inv_t, scale;
  bool kl;

  // Online softmax over a row: running max m and sum z of exp(x * inv_t - m), chunk by chunk.
  void stats(const scalar_t* x, acc_t& m, acc_t& lz, acc_t& rz) const {
    m = -std::numeric_limits<acc_t>::infinity();
    acc_t z = 0;
    for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
      const int64_t len = std::min<int64_t>(kChunk, L - c0);
      acc_t cm = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < len; ++i) {
        const acc_t v = static_cast<acc_t>(x[c0 + i]) * inv_t;
        cm = v > cm ? v : cm;
      }
      if (cm > m) {
        z = m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : z * exp_nonpos(m - cm);
        m = cm;
      }
      if (m == -std::numeric_limits<acc_t>::infinity()) continue;  // all -inf so far
      acc_t cz = 0;
      for (int64_t i = 0; i < len; ++i) cz += exp_nonpos(static_cast<acc_t>(x[c0 + i]) * inv_t - m);
      z += cz;
    }
    lz = std::log(z);
    rz = acc_t(1) / z;
  }

  void run() const {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* tr = t + r * L;
        acc_t mt, lzt, rzt;
        stats(tr, mt, lzt, rzt);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* sr = s[k] + r * L;
          scalar_t* gr = g[k] + r * L;
          acc_t ms, lzs, rzs;
          stats(sr, ms, lzs, rzs);
          const acc_t gscale = scale * inv_t;
          double total = 0;
          for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
            const int64_t len = std::min<int64_t>(kChunk, L - c0);
            acc_t part = 0;
            for (int64_t i = 0; i < len; ++i) {
              const acc_t lpt = static_cast<acc_t>(tr[c0 + i]) * inv_t - mt - lzt;
              const acc_t lps = static_cast<acc_t>(sr[c0 + i]) * inv_t - ms - lzs;
              const acc_t pt = exp_nonpos(lpt);
              const acc_t ps = exp_nonpos(lps);
              part += divergence_term<acc_t>(pt, lpt, lps, kl);
              gr[c0 + i] = static_cast<scalar_t>(gscale * (ps - pt));
            }
            total += static_cast<double>(part);
          }
          loss[k * rows + r] = static_cast<acc_t>(total) * scale;
        }
      }
    });
  }
};

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
// accumulation dtype (float32 for 16-bit inputs), and each student's gradient of its map's sum.
std::tuple<Tensor, std::vector<Tensor>> kd_loss_cpu(at::TensorList students_in, const Tensor& teacher_in,
                                                    const std::optional<Tensor>& labels_in, double temperature,
                                                    bool spatial, bool kl, bool scale_by_t2, int64_t ignore_index) {
  std::vector<Tensor> students(students_in.begin(), students_in.end());
  check_inputs("kd_loss", students, teacher_in);
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
  std::vector<Tensor> grads;
  for (int64_t k = 0; k < K; ++k) grads.push_back(new_like(all[k], cl));
  if (N * C * P == 0) {  // nothing to read; an empty distribution has zero loss
    loss.zero_();
    for (Tensor& gr : grads) gr.zero_();
    return {loss, grads};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "kd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> sp;
    std::vector<scalar_t*> gp;
    for (int64_t k = 0; k < K; ++k) {
      sp.push_back(all[k].const_data_ptr<scalar_t>());
      gp.push_back(grads[k].mutable_data_ptr<scalar_t>());
    }
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t scale = static_cast<acc_t>(scale_by_t2 ? temperature * temperature : 1.0);
    if (spatial) {
      SpatialKernel<scalar_t, acc_t>{N * C, P, K, sp.data(), teacher.const_data_ptr<scalar_t>(), gp.data(),
                                     loss.mutable_data_ptr<acc_t>(), inv_t, scale, kl}
          .run();
    } else {
      const int64_t* lp = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
      if (cl) {
        ChannelKernel<scalar_t, acc_t, false>{N, C, P, K, sp.data(), teacher.const_data_ptr<scalar_t>(), gp.data(),
                                              loss.mutable_data_ptr<acc_t>(), lp, ignore_index, inv_t, scale, kl,
                                              nullptr}
            .run();
      } else {
        ChannelKernel<scalar_t, acc_t, true>{N, C, P, K, sp.data(), teacher.const_data_ptr<scalar_t>(), gp.data(),
                                             loss.mutable_data_ptr<acc_t>(), lp, ignore_index, inv_t, scale, kl,
                                             nullptr}
            .run();
      }
    }
  });
  return {loss, grads};
}

// hard_weight * cross_entropy(student, labels, weight, ignore_index) (mean over the valid
// positions' weights) + soft_weight * T^2 * KL(teacher || student at T) (mean over the valid
// positions). Returns the 0-d loss (accumulation dtype) and the student's gradient of it. A part
// whose denominator is zero (every position ignored) contributes 0 and no gradient.
std::tuple<Tensor, Tensor> seg_kd_loss_cpu(const Tensor& student_in, const Tensor& teacher_in, const Tensor& labels_in,
                                           const std::optional<Tensor>& class_weight, double temperature,
                                           double hard_weight, double soft_weight, int64_t ignore_index) {
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
  Tensor loss = new_output({}, teacher.options().dtype(acc_type));
  if (N * C * P == 0) {
    grad.zero_();
    loss.zero_();
    return {loss, grad};
  }
  const int64_t tasks = N * ((P + kTile - 1) / kTile);
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
    if (cl) {
      ChannelKernel<scalar_t, acc_t, false>{N, C, P, 1, &sp, teacher.const_data_ptr<scalar_t>(), &gp, nullptr,
                                            lp, ignore_index, inv_t, scale, true, &hard}
          .run();
    } else {
      ChannelKernel<scalar_t, acc_t, true>{N, C, P, 1, &sp, teacher.const_data_ptr<scalar_t>(), &gp, nullptr,
                                           lp, ignore_index, inv_t, scale, true, &hard}
          .run();
    }
  });
  double total = 0;
  for (double v : partials) total += v;
  loss.fill_(total);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("kd_loss", &kd_loss_cpu);
  m.impl("seg_kd_loss", &seg_kd_loss_cpu);
}

}  // namespace kd_loss
}  // namespace segkernels
