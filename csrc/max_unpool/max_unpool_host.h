// Host-side argument handling shared by the CPU and CUDA implementations of the
// max-pool / max-unpool ops: geometry, layout and the checks that guard memory safety.
// The Python wrappers give friendlier errors first; these are the safety net for direct op calls.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "common_host.h"
#include "max_unpool/max_unpool.h"

namespace segkernels {
namespace max_unpool {

inline int64_t spatial_dims_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 || t.dim() == 5, "segkernels: ", name,
              " must be 4-D (N, C, H, W) or 5-D (N, C, D, H, W), got ", t.dim(), "-D");
  return t.dim() - 2;
}

inline void check_params(int64_t nd, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation) {
  TORCH_CHECK(static_cast<int64_t>(kernel.size()) == nd && static_cast<int64_t>(stride.size()) == nd &&
                  static_cast<int64_t>(padding.size()) == nd && static_cast<int64_t>(dilation.size()) == nd,
              "segkernels: kernel_size, stride, padding and dilation must each have ", nd, " entries");
  for (int64_t i = 0; i < nd; ++i) {
    TORCH_CHECK(kernel[i] > 0, "segkernels: kernel_size must be positive, got ", kernel);
    TORCH_CHECK(stride[i] > 0, "segkernels: stride must be positive, got ", stride);
    TORCH_CHECK(padding[i] >= 0, "segkernels: padding must be non-negative, got ", padding);
    TORCH_CHECK(dilation[i] > 0, "segkernels: dilation must be positive, got ", dilation);
  }
}

// Channels-last when the tensor is laid out that way and not also plainly contiguous.
inline bool use_channels_last(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

inline at::MemoryFormat layout_format(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return at::MemoryFormat::Contiguous;
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

// Pooled extent of one axis, with ATen's ceil_mode rule (the last window must start inside
// the input or its left padding).
inline int64_t pooled_extent(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
  int64_t out = floor_div(span, s) + 1;
  if (ceil_mode && (out - 1) * s >= in + p) --out;
  return out;
}

// Geometry with 2-D maps lifted to 3-D by a unit z axis.
inline Geometry make_geometry(at::IntArrayRef full, at::IntArrayRef pooled, at::IntArrayRef kernel,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t inner) {
  Geometry g;
  const int64_t nd = static_cast<int64_t>(kernel.size());
  const int64_t lift = 3 - nd;
  for (int64_t i = 0; i < 3; ++i) {
    if (i < lift) {
      g.ax[i] = Axis{1, 1, 1, 1, 0, 1};
    } else {
      const int64_t j = i - lift;
      g.ax[i] = Axis{full[j], pooled[j], kernel[j], stride[j], padding[j], dilation[j]};
    }
  }
  g.inner = inner;
  return g;
}

inline bool all_axes_disjoint(const Geometry& g) {
  return axis_disjoint(g.ax[0]) && axis_disjoint(g.ax[1]) && axis_disjoint(g.ax[2]);
}

inline bool all_axes_tiling(const Geometry& g) {
  return axis_tiling(g.ax[0]) && axis_tiling(g.ax[1]) && axis_tiling(g.ax[2]);
}

// Whether the 32-bit tiled kernels may run: every flat offset of both maps, and every kernel,
// padding and window reach (pooled * kernel + |padding|), fits in half the int32 range (the
// grid-stride loops add up to a grid's worth of threads past the end). A huge kernel or padding
// would otherwise be truncated by narrow_geometry<int32_t> and send the index math out of bounds.
inline bool tiled_fits_int32(const Geometry& g, int64_t full_numel, int64_t pooled_numel) {
  const int64_t limit = int64_t{1} << 30;
  if (full_numel >= limit || pooled_numel >= limit) return false;
  for (const Axis& a : g.ax) {
    const int64_t pad = a.padding < 0 ? -a.padding : a.padding;
    // (full + pad bounds full and pad alone; kernel is checked apart as pooled may be 0.)
    if (a.kernel >= limit || a.pooled * a.kernel + pad >= limit || a.full + pad >= limit) return false;
  }
  return true;
}

// Whether pool_max_element may run in 32 bits, with the same half-range margin: both maps'
// offsets, the window's tap numbers, and every coordinate the tap loops compute. A loop runs
// one tap past the map before it stops, and the first valid tap seeds the index even when the
// whole window lies in the padding, so a coordinate is bounded by the window's reach
// (pooled * stride + padding + kernel * dilation), not by the map.
inline bool pool_fits_int32(const Geometry& g, int64_t input_numel, int64_t pooled_numel) {
  const int64_t limit = int64_t{1} << 30;
  if (input_numel >= limit || pooled_numel >= limit || g.inner >= limit) return false;
  int64_t window = 1, reach_plane = 1;
  for (const Axis& a : g.ax) {
    // Each factor is checked below the limit before it multiplies, so no product overflows.
    if (a.kernel >= limit || a.stride >= limit || a.padding >= limit || a.dilation >= limit || a.pooled >= limit ||
        a.full >= limit)
      return false;
    const int64_t reach = std::max(a.full, a.pooled * a.stride + a.padding + a.kernel * a.dilation);
    if (reach >= limit) return false;
    window *= a.kernel;
    reach_plane *= reach;
    if (window >= limit || reach_plane * g.inner >= limit) return false;
  }
  return true;
}

// Calls f(index_tag, arithmetic_tag) for the pooling element function's instantiation: a null
// pointer of the stored index type (uint8_t compact offsets or int64_t flat indices) and a value
// of the index arithmetic type (int32_t where pool_fits_int32, else int64_t).
template <typename F>
inline void dispatch_pool_types(bool compact, bool narrow, F&& f) {
  if (compact && narrow)
    f(static_cast<uint8_t*>(nullptr), int32_t{});
  else if (compact)
    f(static_cast<uint8_t*>(nullptr), int64_t{});
  else if (narrow)
    f(static_cast<int64_t*>(nullptr), int32_t{});
  else
    f(static_cast<int64_t*>(nullptr), int64_t{});
}

// Wide or overlapping windows on NCHW 2-D maps without dilation (RefineNet's 5 x 5 stride-1
// pooling, 3 x 3 stride-2 stems), which the kernels pool in two separable passes (rows, then
// columns: kh + kw compares per output instead of kh * kw).
inline bool separable_applies(const Geometry& g) {
  const Axis& az = g.ax[0];
  const Axis& ay = g.ax[1];
  const Axis& ax = g.ax[2];
  return g.inner == 1 && az.full == 1 && az.kernel == 1 && ay.dilation == 1 && ax.dilation == 1 &&
         (ay.kernel > 2 || ax.kernel > 2);
}

// Bytes of the CUDA separable kernel's scratch tile (shared memory): each reached input row's
// column maxima (acc_bytes each) and their taps. Windows too tall for it take the per-element kernel.
inline int64_t separable_scratch_bytes(const Geometry& g, int64_t acc_bytes) {
  return separable_tile_rows(g.ax[1]) * kSeparableTileCols * (acc_bytes + static_cast<int64_t>(sizeof(int32_t)));
}
constexpr int64_t kSeparableScratchLimit = 48 * 1024;

// Whether every tap of every window lies inside the full map (no padding reach, no overhang).
inline bool all_windows_inside(const Geometry& g) {
  for (const Axis& a : g.ax)
    if (a.padding != 0 || (a.pooled - 1) * a.stride + (a.kernel - 1) * a.dilation >= a.full) return false;
  return true;
}

// Whether some x of the full map lies in no window (holes from dilation, stride > kernel, or
// an output wider than the windows reach); such columns need an explicit zero.
inline bool has_x_gaps(const Geometry& g) {
  for (int64_t x = 0; x < g.ax[2].full; ++x) {
    int64_t pc, tap;
    if (!single_window(g.ax[2], x, pc, tap)) return true;
  }
  return false;
}

// Rows of the full map: (outer, z, y) triples.
inline int64_t full_rows(const Geometry& g, int64_t outer) { return outer * g.ax[0].full * g.ax[1].full; }

struct UnpoolArgs {
  at::Tensor values;   // pooled-size values, in the chosen layout
  at::Tensor indices;  // same layout
  at::Tensor out;      // full-size output, same layout
  Geometry geometry;
  int64_t outer;
};

// Shared set-up for max_unpool (forward) and max_pool_backward: both gather pooled values
// into a full-size map by stored indices.
inline UnpoolArgs prepare_unpool(const at::Tensor& values, const at::Tensor& indices, at::IntArrayRef kernel,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 at::IntArrayRef full_size, const char* op) {
  const int64_t nd = spatial_dims_of(values, "input");
  check_params(nd, kernel, stride, padding, dilation);
  TORCH_CHECK(indices.sizes() == values.sizes(), "segkernels.", op, ": indices must have the shape of input ",
              values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte, "segkernels.", op,
              ": indices must be int64 (flat) or uint8 (compact), got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == values.device(), "segkernels.", op, ": indices must be on ", values.device(),
              ", got ", indices.device());
  TORCH_CHECK(static_cast<int64_t>(full_size.size()) == nd, "segkernels.", op, ": output_size must have ", nd,
              " entries, got ", full_size);
  for (auto s : full_size) TORCH_CHECK(s >= 0, "segkernels.", op, ": output_size must be non-negative, got ", full_size);
  if (indices.scalar_type() == at::kByte) {
    int64_t window = 1;
    for (auto k : kernel) window *= k;
    TORCH_CHECK(window <= 256, "segkernels.", op, ": compact uint8 indices need kernel windows of at most 256 "
                "elements, got ", window);
  }
  const bool cl = use_channels_last(values);
  const auto fmt = layout_format(values, cl);
  UnpoolArgs a;
  a.values = values.contiguous(fmt);
  a.indices = indices.contiguous(fmt);
  std::vector<int64_t> out_sizes(values.sizes().begin(), values.sizes().begin() + 2);
  out_sizes.insert(out_sizes.end(), full_size.begin(), full_size.end());
  a.out = new_output(out_sizes, values.options().memory_format(fmt));
  const int64_t C = values.size(1);
  a.geometry = make_geometry(full_size, values.sizes().slice(2), kernel, stride, padding, dilation, cl ? C : 1);
  a.outer = cl ? values.size(0) : values.size(0) * C;
  return a;
}

struct PoolArgs {
  at::Tensor input;    // in the chosen layout
  at::Tensor values;   // pooled maxima, same layout
  at::Tensor indices;  // int64 plane-flat or uint8 compact, same layout
  Geometry geometry;   // full = input, pooled = output
};

inline PoolArgs prepare_pool(const at::Tensor& input, at::IntArrayRef kernel, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode, bool compact) {
  const int64_t nd = spatial_dims_of(input, "input");
  check_params(nd, kernel, stride, padding, dilation);
  std::vector<int64_t> pooled(nd);
  for (int64_t i = 0; i < nd; ++i) {
    pooled[i] = pooled_extent(input.size(2 + i), kernel[i], stride[i], padding[i], dilation[i], ceil_mode);
    TORCH_CHECK(pooled[i] > 0, "segkernels.max_pool: output size is too small along spatial dim ", i);
  }
  if (compact) {
    int64_t window = 1;
    for (auto k : kernel) window *= k;
    TORCH_CHECK(window <= 256, "segkernels.max_pool: compact=True needs at most 256 elements per window, got ", window);
  }
  const bool cl = use_channels_last(input);
  const auto fmt = layout_format(input, cl);
  PoolArgs a;
  a.input = input.contiguous(fmt);
  std::vector<int64_t> out_sizes(input.sizes().begin(), input.sizes().begin() + 2);
  out_sizes.insert(out_sizes.end(), pooled.begin(), pooled.end());
  a.values = new_output(out_sizes, input.options().memory_format(fmt));
  a.indices = new_output(out_sizes, input.options().dtype(compact ? at::kByte : at::kLong).memory_format(fmt));
  a.geometry = make_geometry(input.sizes().slice(2), pooled, kernel, stride, padding, dilation, cl ? input.size(1) : 1);
  return a;
}

struct UnpoolBackwardArgs {
  at::Tensor grad_output;  // full size, chosen layout
  at::Tensor indices;      // pooled size, same layout
  at::Tensor grad_input;   // pooled size, same layout
  Geometry geometry;
};

inline UnpoolBackwardArgs prepare_unpool_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                                  at::IntArrayRef kernel, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t nd = spatial_dims_of(grad_output, "grad_output");
  check_params(nd, kernel, stride, padding, dilation);
  TORCH_CHECK(indices.dim() == grad_output.dim() && indices.size(0) == grad_output.size(0) &&
                  indices.size(1) == grad_output.size(1),
              "segkernels.max_unpool_backward: indices and grad_output disagree in batch or channels");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte,
              "segkernels.max_unpool_backward: indices must be int64 or uint8, got ", indices.scalar_type());
  TORCH_CHECK(indices.device() == grad_output.device(), "segkernels.max_unpool_backward: indices must be on ",
              grad_output.device());
  const bool cl = use_channels_last(grad_output);
  const auto fmt = layout_format(grad_output, cl);
  UnpoolBackwardArgs a;
  a.grad_output = grad_output.contiguous(fmt);
  a.indices = indices.contiguous(fmt);
  a.grad_input = new_output(indices.sizes(), grad_output.options().memory_format(fmt));
  a.geometry = make_geometry(grad_output.sizes().slice(2), indices.sizes().slice(2), kernel, stride, padding, dilation,
                             cl ? grad_output.size(1) : 1);
  return a;
}

inline std::string out_of_range_message(const char* op, int64_t count, bool compact) {
  std::ostringstream m;
  m << "segkernels." << op << ": indices: " << count << " entr" << (count == 1 ? "y" : "ies");
  if (compact)
    m << " hold a compact offset that is >= kernel window size or points outside the output "
         "(check kernel_size, stride, padding, dilation and output_size match the pooling)";
  else
    m << " lie outside [0, prod(output_size)) (check output_size matches the pooling input)";
  return m.str();
}

}  // namespace max_unpool
}  // namespace segkernels
