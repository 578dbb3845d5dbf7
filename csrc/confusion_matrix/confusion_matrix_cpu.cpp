// CPU kernel of the fused argmax + confusion matrix: the prediction map is never materialised.
// Each parallel task keeps its own integer histogram; integer sums make the result independent
// of the split, so it is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <vector>

#include "common_host.h"
#include "confusion_matrix/confusion_matrix.h"

namespace segkernels {
namespace confusion_matrix {
namespace {

using at::Tensor;

constexpr int64_t kTile = 256;  // positions whose running argmax stays in registers / L1

// num_classes**2 bins: at most 46340**2 < 2**31, so bin indices cannot overflow (as in confusion_matrix.py).
constexpr int64_t kMaxClasses = 46340;

void check_args(const Tensor& input, const Tensor& labels, int64_t classes) {
  TORCH_CHECK_VALUE(classes > 0 && classes <= kMaxClasses, "segkernels.confusion_matrix: num_classes must be in [1, ",
                    kMaxClasses, "], got ", classes);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "segkernels.confusion_matrix: labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(input.device() == labels.device(), "segkernels.confusion_matrix: labels must be on ",
                    input.device());
  if (input.is_floating_point()) {
    TORCH_CHECK_VALUE(input.dim() >= 2 && labels.dim() == input.dim() - 1 && labels.size(0) == input.size(0) &&
                          labels.sizes().slice(1) == input.sizes().slice(2),
                      "segkernels.confusion_matrix: logits (N, C, *spatial) need labels (N, *spatial); got ",
                      input.sizes(), " and ", labels.sizes());
    TORCH_CHECK_VALUE(input.size(1) == classes, "segkernels.confusion_matrix: logits have ", input.size(1),
                      " channels but num_classes is ", classes);
  } else {
    TORCH_CHECK_TYPE(input.scalar_type() == at::kLong, "segkernels.confusion_matrix: predictions must be int64, got ",
                     input.scalar_type());
    TORCH_CHECK_VALUE(input.sizes() == labels.sizes(), "segkernels.confusion_matrix: predictions ", input.sizes(),
                      " and labels ", labels.sizes(), " must have the same shape");
  }
}

// Returns (matrix (classes, classes) int64, invalid (1,) int64: positions whose label or
// prediction lies outside [0, classes) and is not ignore_index).
std::tuple<Tensor, Tensor> confusion_matrix_cpu(const Tensor& input, const Tensor& labels, int64_t classes,
                                                int64_t ignore_index) {
  check_args(input, labels, classes);
  const Tensor lab = labels.contiguous();
  const int64_t positions = lab.numel();
  std::vector<int64_t> total(classes * classes + 1, 0);  // last bin counts invalid positions
  std::mutex merge;
  auto merge_local = [&](const std::vector<int64_t>& local) {
    std::lock_guard<std::mutex> lock(merge);
    for (size_t b = 0; b < local.size(); ++b) total[b] += local[b];
  };
  auto add = [&](std::vector<int64_t>& local, int64_t label, int64_t pred) {
    const int64_t bin = confusion_bin(label, pred, classes, ignore_index);
    if (bin >= 0) ++local[bin];
    if (bin == -2) ++local[classes * classes];
  };
  const int64_t* lp = lab.const_data_ptr<int64_t>();
  if (!input.is_floating_point()) {
    const Tensor pred = input.contiguous();
    const int64_t* pp = pred.const_data_ptr<int64_t>();
    at::parallel_for(0, positions, 1 << 14, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> local(total.size(), 0);
      for (int64_t i = begin; i < end; ++i) add(local, lp[i], pp[i]);
      merge_local(local);
    });
  } else {
    const int64_t N = input.size(0);
    const int64_t spatial = N == 0 ? 0 : positions / N;
    const bool channels_last = input.dim() > 2 && !input.is_contiguous() &&
                               input.is_contiguous(input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                                    : at::MemoryFormat::ChannelsLast3d);
    const Tensor logits = channels_last ? input : input.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "confusion_matrix_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const int64_t tiles_per_image = (spatial + kTile - 1) / kTile;
      at::parallel_for(0, N * tiles_per_image, 16, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> local(total.size(), 0);
        acc_t best[kTile];
        int64_t arg[kTile];
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / tiles_per_image;
          const int64_t p0 = (task % tiles_per_image) * kTile;
          const int64_t len = std::min<int64_t>(kTile, spatial - p0);
          if (channels_last) {  // classes contiguous per position
            for (int64_t t = 0; t < len; ++t) {
              const scalar_t* px = x + (n * spatial + p0 + t) * classes;
              acc_t b = static_cast<acc_t>(px[0]);
              int64_t a = 0;
              for (int64_t c = 1; c < classes; ++c) {
                const acc_t v = static_cast<acc_t>(px[c]);
                const bool take = argmax_takes(v, b);
                b = take ? v : b;
                a = take ? c : a;
              }
              arg[t] = a;
            }
          } else {  // NCHW: one class plane at a time over a tile of contiguous positions
            const scalar_t* base = x + n * classes * spatial + p0;
            for (int64_t t = 0; t < len; ++t) {
              best[t] = static_cast<acc_t>(base[t]);
              arg[t] = 0;
            }
            for (int64_t c = 1; c < classes; ++c) {
              const scalar_t* plane = base + c * spatial;
              for (int64_t t = 0; t < len; ++t) {
                const acc_t v = static_cast<acc_t>(plane[t]);
                const bool take = argmax_takes(v, best[t]);
                best[t] = take ? v : best[t];
                arg[t] = take ? c : arg[t];
              }
            }
          }
          const int64_t* lrow = lp + n * spatial + p0;
          for (int64_t t = 0; t < len; ++t) add(local, lrow[t], arg[t]);
        }
        merge_local(local);
      });
    });
  }
  Tensor matrix = new_output({classes, classes}, labels.options().dtype(at::kLong));
  Tensor invalid = new_output({1}, labels.options().dtype(at::kLong));
  std::copy(total.begin(), total.end() - 1, matrix.mutable_data_ptr<int64_t>());
  invalid.mutable_data_ptr<int64_t>()[0] = total.back();
  return {matrix, invalid};
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) { m.impl("confusion_matrix", &confusion_matrix_cpu); }

}  // namespace confusion_matrix
}  // namespace segkernels
