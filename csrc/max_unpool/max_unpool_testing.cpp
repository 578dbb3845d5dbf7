// Test-only ops (segkernels_testing, testing builds only): the CUDA kernels' per-element
// functions run on the CPU, so that CPU-only CI checks the index math only CUDA runs.
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

// Test-only: the tiled-window element functions that the CUDA fast path runs, executed here
// with the same 32-bit arithmetic, so the CPU-only CI checks that index math. Returns the
// unpooled map, the unpool gradient for grad_output, and the match count.
std::tuple<Tensor, Tensor, Tensor> max_unpool_tiled_logic_cpu(const Tensor& input, const Tensor& indices,
                                                             const Tensor& grad_output, at::IntArrayRef kernel,
                                                             at::IntArrayRef padding, at::IntArrayRef output_size) {
  const std::vector<int64_t> ones(kernel.size(), 1);
  UnpoolArgs a = prepare_unpool(input, indices, kernel, kernel, padding, ones, output_size, "_max_unpool_tiled_logic");
  TORCH_CHECK(all_axes_tiling(a.geometry), "segkernels._max_unpool_tiled_logic: windows must tile");
  UnpoolBackwardArgs b = prepare_unpool_backward(grad_output, indices, kernel, kernel, padding, ones);
  TORCH_CHECK_VALUE(tiled_fits_int32(a.geometry, a.out.numel(), a.values.numel()) &&
                        tiled_fits_int32(b.geometry, b.grad_output.numel(), b.grad_input.numel()),
                    "segkernels._max_unpool_tiled_logic: the geometry does not fit the 32-bit tiled kernels "
                    "(CUDA runs such maps with 64-bit index math)");
  const IndexPlan<int32_t> pa = index_plan<int32_t>(a.geometry);
  const IndexPlan<int32_t> pb = index_plan<int32_t>(b.geometry);
  int64_t matches = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_unpool_tiled_logic", [&] {
    auto run = [&](auto* index_tag) {
      using index_t = std::remove_pointer_t<decltype(index_tag)>;
      const index_t* ia = a.indices.const_data_ptr<index_t>();
      const index_t* ib = b.indices.const_data_ptr<index_t>();
      const scalar_t* v = a.values.const_data_ptr<scalar_t>();
      scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
      // Runs as the CUDA threads take them (unpool_tiled_kernel).
      constexpr int kRun = unpool_run_length<scalar_t>();
      const int32_t total = static_cast<int32_t>(a.out.numel());
      for (int32_t e0 = 0; e0 < total; e0 += kRun) {
        const int count = std::min<int32_t>(kRun, total - e0);
        scalar_t run[kRun];
        unpool_tiled_run<kRun, scalar_t, index_t, int32_t>(pa, v, ia, e0, count, run, matches);
        std::copy(run, run + count, out + e0);
      }
      const scalar_t* go = b.grad_output.const_data_ptr<scalar_t>();
      scalar_t* gi = b.grad_input.mutable_data_ptr<scalar_t>();
      for (int32_t e = 0; e < static_cast<int32_t>(b.grad_input.numel()); ++e)
        gi[e] = unpool_backward_tiled_element<scalar_t, index_t, int32_t>(pb, go, ib, e);
    };
    if (a.indices.scalar_type() == at::kByte)
      run(static_cast<uint8_t*>(nullptr));
    else
      run(static_cast<int64_t*>(nullptr));
  });
  return {a.out, b.grad_input, at::full({1}, matches, a.values.options().dtype(at::kLong))};
}

// Test-only: max-pooling by pool_max_element, the per-element function the CUDA kernel runs
// (the CPU op runs its own row-wise version), in 32-bit arithmetic (narrow, as CUDA does when
// pool_fits_int32) or in 64 bits.
std::tuple<Tensor, Tensor> max_pool_logic_cpu(const Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                                              bool compact, bool narrow) {
  PoolArgs a = prepare_pool(input, kernel, stride, padding, dilation, ceil_mode, compact);
  TORCH_CHECK_VALUE(!narrow || pool_fits_int32(a.geometry, a.input.numel(), a.values.numel()),
                    "segkernels._max_pool_logic: the geometry does not fit the 32-bit pooling kernel "
                    "(CUDA runs such maps with 64-bit index math)");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "max_pool_logic", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto* index_tag, auto arithmetic_tag) {
      using index_t = std::remove_pointer_t<decltype(index_tag)>;
      using I = decltype(arithmetic_tag);
      const IndexPlan<I> plan = index_plan<I>(a.geometry);
      const scalar_t* in = a.input.const_data_ptr<scalar_t>();
      scalar_t* values = a.values.mutable_data_ptr<scalar_t>();
      index_t* indices = a.indices.mutable_data_ptr<index_t>();
      const I total = static_cast<I>(a.values.numel());
      for (I e = 0; e < total; ++e) {
        I o, z, y, x, c, flat, tap;
        decode_element(e, plan.pooled, o, z, y, x, c);
        pool_max_element<scalar_t, acc_t, I>(plan.g, in, o, z, y, x, c, values[e], flat, tap);
        indices[e] = IndexKind<index_t>::compact ? static_cast<index_t>(tap) : static_cast<index_t>(flat);
      }
    };
    dispatch_pool_types(compact, narrow, run);
  });
  return {a.values, a.indices};
}

// Test-only: max-pooling of wide or overlapping windows by the CUDA separable kernel's tile
// functions, a tile at a time as a block runs them: every row-pass item into the scratch tile,
// then every column-pass item (the __syncthreads between them), in 32 or 64 bits.
std::tuple<Tensor, Tensor> max_pool_separable_logic_cpu(const Tensor& input, at::IntArrayRef kernel,
                                                        at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                                                        bool compact, bool narrow) {
  const std::vector<int64_t> ones(kernel.size(), 1);
  PoolArgs a = prepare_pool(input.contiguous(), kernel, stride, padding, ones, ceil_mode, compact);
  const Geometry& g = a.geometry;
  TORCH_CHECK_VALUE(separable_applies(g), "segkernels._max_pool_separable_logic: the separable kernel takes wide or "
                    "overlapping 2-D windows on NCHW maps");
  TORCH_CHECK_VALUE(!narrow || pool_fits_int32(g, a.input.numel(), a.values.numel()),
                    "segkernels._max_pool_separable_logic: the geometry does not fit the 32-bit pooling kernel");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "max_pool_separable_logic", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK_VALUE(separable_scratch_bytes(g, sizeof(acc_t)) <= kSeparableScratchLimit,
                      "segkernels._max_pool_separable_logic: the windows are too tall for the scratch tile");
    auto run = [&](auto* index_tag, auto arithmetic_tag) {
      using index_t = std::remove_pointer_t<decltype(index_tag)>;
      using I = decltype(arithmetic_tag);
      const GeometryOf<I> gi = narrow_geometry<I>(g);
      const I rows = separable_tile_rows(gi.ax[1]);
      // Poisoned, so an item reading a scratch entry the row pass did not write gives garbage.
      std::vector<acc_t> scratch_max(rows * kSeparableTileCols, static_cast<acc_t>(12345));
      std::vector<int32_t> scratch_tap(rows * kSeparableTileCols, 999);
      const I in_plane = gi.ax[1].full * gi.ax[2].full, out_plane = gi.ax[1].pooled * gi.ax[2].pooled;
      const int64_t planes = a.values.size(0) * a.values.size(1);
      const scalar_t* in = a.input.const_data_ptr<scalar_t>();
      scalar_t* values = a.values.mutable_data_ptr<scalar_t>();
      index_t* indices = a.indices.mutable_data_ptr<index_t>();
      for (I plane = 0; plane < static_cast<I>(planes); ++plane)
        for (I py0 = 0; py0 < gi.ax[1].pooled; py0 += kSeparableTileRows)
          for (I px0 = 0; px0 < gi.ax[2].pooled; px0 += kSeparableTileCols) {
            std::fill(scratch_max.begin(), scratch_max.end(), static_cast<acc_t>(12345));
            std::fill(scratch_tap.begin(), scratch_tap.end(), 999);
            for (I item = 0; item < rows * kSeparableTileCols; ++item)
              separable_row_item<scalar_t, acc_t, I>(gi, in + plane * in_plane, py0, px0, item, scratch_max.data(),
                                                     scratch_tap.data());
            for (I item = 0; item < kSeparableTileRows * kSeparableTileCols; ++item)
              separable_column_item<scalar_t, acc_t, index_t, I>(gi, scratch_max.data(), scratch_tap.data(), py0, px0,
                                                                 item, values + plane * out_plane,
                                                                 indices + plane * out_plane);
          }
    };
    dispatch_pool_types(compact, narrow, run);
  });
  return {a.values, a.indices};
}

// Test-only: FastDivider (common.h), which the 32-bit CUDA kernels divide with, on the CPU.
Tensor fast_divide_cpu(const Tensor& numerators, int64_t divisor) {
  TORCH_CHECK_VALUE(divisor >= 1 && divisor < (int64_t{1} << 31), "segkernels._fast_divide: divisor must lie in "
                    "[1, 2**31), got ", divisor);
  TORCH_CHECK_VALUE(numerators.scalar_type() == at::kLong, "segkernels._fast_divide: numerators must be int64");
  const Tensor n = numerators.contiguous();
  TORCH_CHECK_VALUE(n.numel() == 0 || (n.min().item<int64_t>() >= 0 && n.max().item<int64_t>() < (int64_t{1} << 31)),
                    "segkernels._fast_divide: numerators must lie in [0, 2**31)");
  const FastDivider d(static_cast<int32_t>(divisor));
  Tensor out = at::empty_like(n);
  const int64_t* src = n.const_data_ptr<int64_t>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n.numel(); ++i) dst[i] = d.div(static_cast<int32_t>(src[i]));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(segkernels_testing, m) {
  // The CUDA fast path's tiled-window element functions: (unpooled map, unpool gradient, match count).
  m.def("max_unpool_tiled_logic(Tensor input, Tensor indices, Tensor grad_output, int[] kernel_size, "
        "int[] padding, int[] output_size) -> (Tensor, Tensor, Tensor)");
  // Max-pooling by the CUDA kernel's element function, in 32 (narrow) or 64 bits.
  m.def("max_pool_logic(Tensor input, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "bool ceil_mode, bool compact, bool narrow) -> (Tensor, Tensor)");
  // Max-pooling of wide or overlapping 2-D windows by the CUDA separable kernel's tile functions.
  m.def("max_pool_separable_logic(Tensor input, int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, "
        "bool compact, bool narrow) -> (Tensor, Tensor)");
  // FastDivider (csrc/common.h), the 32-bit CUDA kernels' division.
  m.def("fast_divide(Tensor numerators, int divisor) -> Tensor");
}

TORCH_LIBRARY_IMPL(segkernels_testing, CPU, m) {
  m.impl("max_unpool_tiled_logic", &max_unpool_tiled_logic_cpu);
  m.impl("max_pool_logic", &max_pool_logic_cpu);
  m.impl("max_pool_separable_logic", &max_pool_separable_logic_cpu);
  m.impl("fast_divide", &fast_divide_cpu);
}

}  // namespace max_unpool
}  // namespace segkernels
