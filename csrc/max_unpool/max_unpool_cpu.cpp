// CPU kernels for max-pooling with indices and max-unpooling (2-D and 3-D, NC(D)HW and
// channels-last without copies). The per-element logic lives in max_unpool.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <atomic>

#include "max_unpool/max_unpool_host.h"

namespace segkernels {
namespace max_unpool {
namespace {

using at::Tensor;

// Rows of work per parallel task: enough to amortise scheduling, small enough to balance.
int64_t row_grain(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

std::tuple<Tensor, Tensor> max_pool_with_indices_cpu(const Tensor& input, at::IntArrayRef kernel,
                                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                                     at::IntArrayRef dilation, bool ceil_mode, bool compact) {
  PoolArgs a = prepare_pool(input, kernel, stride, padding, dilation, ceil_mode, compact);
  if (a.values.numel() == 0) return {a.values, a.indices};
  const Geometry& g = a.geometry;
  const Tensor& in = a.input;
  Tensor values = a.values, indices = a.indices;
  const int64_t outer = a.values.size(0) * (g.inner == 1 ? a.values.size(1) : 1);
  const int64_t rows = outer * g.ax[0].pooled * g.ax[1].pooled;
  const int64_t row_len = g.ax[2].pooled * g.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "max_pool_with_indices_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* vout = values.mutable_data_ptr<scalar_t>();
    int64_t* iout64 = compact ? nullptr : indices.mutable_data_ptr<int64_t>();
    uint8_t* iout8 = compact ? indices.mutable_data_ptr<uint8_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t py = r % g.ax[1].pooled;
        const int64_t pz = (r / g.ax[1].pooled) % g.ax[0].pooled;
        const int64_t o = r / (g.ax[1].pooled * g.ax[0].pooled);
        for (int64_t i = 0; i < row_len; ++i) {
          const int64_t px = i / g.inner;
          const int64_t c = i - px * g.inner;
          scalar_t best;
          int64_t flat, tap;
          pool_max_element<scalar_t, acc_t>(g, src, o, pz, py, px, c, best, flat, tap);
          vout[r * row_len + i] = best;
          if (compact)
            iout8[r * row_len + i] = static_cast<uint8_t>(tap);
          else
            iout64[r * row_len + i] = flat;
        }
      }
    });
  });
  return {values, indices};
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
        const bool x_gaps = has_x_gaps(g);
        at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
          int64_t local = 0;
          for (int64_t r = begin; r < end; ++r) {
            const int64_t y = r % g.ax[1].full;
            const int64_t z = (r / g.ax[1].full) % g.ax[0].full;
            const int64_t o = r / (g.ax[1].full * g.ax[0].full);
            local += unpool_row_disjoint<scalar_t, index_t>(g, vals, idx, out, o, z, y, x_gaps, 0, 1);
          }
          matches += local;
        });
      } else {
        at::parallel_for(0, rows, row_grain(row_len), [&](int64_t begin, int64_t end) {
          int64_t local = 0;
          for (int64_t r = begin; r < end; ++r) {
            const int64_t y = r % g.ax[1].full;
            const int64_t z = (r / g.ax[1].full) % g.ax[0].full;
            const int64_t o = r / (g.ax[1].full * g.ax[0].full);
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
  const int64_t per_outer = g.pooled_plane() * g.inner;
  std::atomic<int64_t> bad{0}, moved{0};
  at::parallel_for(0, a.outer * per_outer, 4096, [&](int64_t begin, int64_t end) {
    int64_t b = 0, m = 0;
    for (int64_t e = begin; e < end; ++e) {
      const int64_t pf = (e % per_outer) / g.inner;
      const int64_t px = pf % g.ax[2].pooled;
      const int64_t py = (pf / g.ax[2].pooled) % g.ax[1].pooled;
      const int64_t pz = pf / (g.ax[2].pooled * g.ax[1].pooled);
      int64_t target;
      const int s = entry_status<index_t>(g, pz, py, px, idx[e], target);
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

Tensor max_pool_backward_cpu(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             at::IntArrayRef input_size) {
  UnpoolArgs a = prepare_unpool(grad_output, indices, kernel, stride, padding, dilation, input_size, "max_pool_backward");
  if (a.out.numel() > 0) gather_into_full<true>(a);
  return a.out;
}

// d(unpool)/d(input): each entry reads the output gradient at its target (zero when invalid).
Tensor max_unpool_backward_cpu(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               bool only_winners) {
  UnpoolBackwardArgs a = prepare_unpool_backward(grad_output, indices, kernel, stride, padding, dilation);
  const Geometry& g = a.geometry;
  const Tensor& go = a.grad_output;
  const Tensor& idx_t = a.indices;
  Tensor grad_input = a.grad_input;
  if (grad_input.numel() == 0) return grad_input;
  const int64_t total = grad_input.numel();
  const bool overlapping = only_winners && !all_axes_disjoint(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "max_unpool_backward_cpu", [&] {
    const scalar_t* gsrc = go.const_data_ptr<scalar_t>();
    scalar_t* gdst = grad_input.mutable_data_ptr<scalar_t>();
    auto run = [&](auto* idx) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t e = begin; e < end; ++e)
          gdst[e] = unpool_backward_element<scalar_t, index_t>(g, gsrc, idx, e, overlapping);
      });
    };
    if (idx_t.scalar_type() == at::kByte)
      run(idx_t.const_data_ptr<uint8_t>());
    else
      run(idx_t.const_data_ptr<int64_t>());
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CPU, m) {
  m.impl("max_pool_with_indices", &max_pool_with_indices_cpu);
  m.impl("max_unpool", &max_unpool_cpu);
  m.impl("max_unpool_backward", &max_unpool_backward_cpu);
  m.impl("max_pool_backward", &max_pool_backward_cpu);
}

}  // namespace max_unpool
}  // namespace segkernels
