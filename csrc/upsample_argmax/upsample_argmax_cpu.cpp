// CPU kernel of upsample_argmax (upsample_argmax.h): one task per run of output rows.
// F.interpolate blends along the columns, then along the rows; a task runs over its output
// rows in order and blends each input row along the columns once (ColumnBlendCache in
// upsample_argmax_cpu_blend.h, shared with cross_entropy's kernel), so an output row is two
// contiguous blends per class instead of four gathers per value. For each class the blended
// row is compared with the running maximum (torch.argmax's rule): the upsampled logits never
// exist, only a row of maxima and indices.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "common_host.h"

// Lets the selects in the inner loops become vector blends (they have no side effects).
#pragma GCC optimize("no-trapping-math")
#include "confusion_matrix/confusion_matrix.h"
#include "upsample_argmax/upsample_argmax.h"

namespace segkernels {
namespace upsample_argmax {
namespace {

using at::Tensor;

template <typename acc_t>
struct AxisTable {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> w0, w1;

  AxisTable(int64_t in_size, int64_t out_size, bool align_corners)
      : i0(out_size), i1(out_size), w0(out_size), w1(out_size) {
    for (int64_t o = 0; o < out_size; ++o) {
      const LinearTap<acc_t> t = linear_tap<acc_t>(o, in_size, out_size, align_corners);
      i0[o] = t.i0;
      i1[o] = t.i1;
      w0[o] = t.w0;
      w1[o] = t.w1;
    }
  }
};

#define SK_ISA_KERNELS "upsample_argmax/upsample_argmax_cpu_kernels.h"
#include "cpu_isa_builds.h"

Tensor upsample_argmax_cpu(const Tensor& logits, at::IntArrayRef size, bool align_corners) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "segkernels.upsample_argmax: logits must be floating, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 4, "segkernels.upsample_argmax: logits must be (N, C, h, w), got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(size.size() == 2, "segkernels.upsample_argmax: size must be (H, W), got ", size);
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t Ho = size[0], Wo = size[1];
  TORCH_CHECK_VALUE(Ho >= 1 && Wo >= 1, "segkernels.upsample_argmax: size must be positive, got ", size);
  TORCH_CHECK_VALUE(C >= 1 && h >= 1 && w >= 1,
                    "segkernels.upsample_argmax: logits need at least one class and position, got ", logits.sizes());
  Tensor out = new_output({N, Ho, Wo}, logits.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsample_argmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AxisTable<acc_t> ty(h, Ho, align_corners), tx(w, Wo, align_corners);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    int64_t* dst = out.mutable_data_ptr<int64_t>();
    const int64_t work = std::max<int64_t>(1, C * Wo);
    at::parallel_for(0, N * Ho, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
      SK_ISA_DISPATCH(argmax_rows<scalar_t>, x, logits.stride(0), logits.stride(1), logits.stride(2),
                      logits.stride(3), C, h, w, Ho, Wo, ty, tx, dst, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) { m.impl("upsample_argmax", &upsample_argmax_cpu); }

}  // namespace upsample_argmax
}  // namespace segkernels
