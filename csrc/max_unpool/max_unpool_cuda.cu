// CUDA kernels for max-pooling with indices and max-unpooling. The per-element logic is the
// same host/device code the CPU kernels run (max_unpool.h); this file only maps it onto threads.
//
// Pooling: one thread per pooled element, in 32-bit index math when the map fits; wide or
// overlapping windows on NCHW 2-D maps by tiles in two separable passes through shared memory.
//
// Unpool forward and the max-pool backward (the same gather, with a sum) write every output
// element exactly once, with no zero-fill pass and no atomics:
// - tiling windows (kernel == stride, SegNet's 2x2/2): each thread writes a run of consecutive
//   output elements with one vector store; it decodes the first (32-bit division by multiply
//   and shift when the map fits) and steps to the others, each element finding its only window;
// - other disjoint windows: one block per output row; each thread takes pooled entries of the
//   row and writes all their taps;
// - overlapping windows: one thread per output element searches the windows that hold it.
// Each block also counts how many entries found their target; one host read of that count
// (check_indices=True) proves every index valid, and only on a mismatch does a classification
// pass run to raise the error or switch to the general path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <torch/library.h>

#include "max_unpool/max_unpool_host.h"

namespace segkernels {
namespace max_unpool {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

int64_t grid_for(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(work, sms * 32));
}

__device__ __forceinline__ void add_block_count(int64_t local, unsigned long long* counter) {
  for (int off = 16; off > 0; off /= 2) local += __shfl_down_sync(0xffffffffu, local, off);
  __shared__ int64_t warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = local;
  __syncthreads();
  if (warp == 0) {
    int64_t v = lane < kThreads / 32 ? warp_sums[lane] : 0;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0 && v != 0) atomicAdd(counter, static_cast<unsigned long long>(v));
  }
  __syncthreads();
}

// One thread per pooled element, in 32-bit index math when pool_fits_int32 allows.
template <typename scalar_t, typename index_t, typename I>
__global__ void pool_forward_kernel(IndexPlan<I> p, const scalar_t* __restrict__ input, scalar_t* __restrict__ values,
                                    index_t* __restrict__ indices, I total) {
  using acc_t = at::opmath_type<scalar_t>;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    I o, z, y, x, c;
    decode_element(e, p.pooled, o, z, y, x, c);
    scalar_t best;
    I flat, tap;
    pool_max_element<scalar_t, acc_t, I>(p.g, input, o, z, y, x, c, best, flat, tap);
    values[e] = best;
    indices[e] = IndexKind<index_t>::compact ? static_cast<index_t>(tap) : static_cast<index_t>(flat);
  }
}

template <typename scalar_t, typename index_t>
__global__ void unpool_rows_kernel(Geometry g, const scalar_t* __restrict__ vals, const index_t* __restrict__ idx,
                                   scalar_t* __restrict__ out, int64_t rows, bool x_gaps,
                                   unsigned long long* matches) {
  int64_t local = 0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t o, z, y;
    decode_row(r, g.ax[0].full, g.ax[1].full, o, z, y);
    local += unpool_row_disjoint<scalar_t, index_t>(g, vals, idx, out, o, z, y, x_gaps, threadIdx.x, blockDim.x);
  }
  add_block_count(local, matches);
}

template <typename scalar_t, typename index_t, bool kSum>
__global__ void unpool_gather_kernel(Geometry g, const scalar_t* __restrict__ vals, const index_t* __restrict__ idx,
                                     scalar_t* __restrict__ out, int64_t total, unsigned long long* matches) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t local = 0;
  // Uniform trip count per block so every thread reaches the block reduction.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = blockIdx.x * static_cast<int64_t>(blockDim.x); base < total; base += stride) {
    const int64_t e = base + threadIdx.x;
    if (e < total) {
      const Position p = decode_position(g, e, false);
      out[e] = unpool_gather_element<scalar_t, acc_t, index_t, kSum>(g, vals, idx, p.o, p.z, p.y, p.x, p.c, local);
    }
  }
  add_block_count(local, matches);
}

template <typename index_t>
__global__ void classify_kernel(Geometry g, const index_t* __restrict__ idx, int64_t total,
                                unsigned long long* counts /* [out_of_range, outside_window] */) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Position p = decode_position(g, e, true);
    int64_t target;
    const int s = entry_status<index_t>(g, p.z, p.y, p.x, idx[e], target);
    if (s == kOutOfRange) atomicAdd(counts, 1ull);
    if (s == kOutsideWindow) atomicAdd(counts + 1, 1ull);
  }
}

// General int64 path: the winner of each output element is the latest entry in scan order;
// integer atomicMax makes that choice independent of thread timing.
__global__ void elect_winners_kernel(Geometry g, const int64_t* __restrict__ idx, int64_t total,
                                     unsigned long long* winners) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Position p = decode_position(g, e, true);
    const int64_t t = idx[e];
    if (t < 0 || t >= g.full_plane()) continue;
    atomicMax(winners + (p.o * g.full_plane() + t) * g.inner + p.c, static_cast<unsigned long long>(p.flat + 1));
  }
}

template <typename scalar_t>
__global__ void gather_winners_kernel(Geometry g, const scalar_t* __restrict__ vals,
                                      const unsigned long long* __restrict__ winners, scalar_t* __restrict__ out,
                                      int64_t total) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = static_cast<int64_t>(winners[e]);
    const Position p = decode_position(g, e, false);
    out[e] = w == 0 ? scalar_t(0) : vals[(p.o * g.pooled_plane() + (w - 1)) * g.inner + p.c];
  }
}

template <typename scalar_t, typename index_t>
__global__ void unpool_backward_kernel(Geometry g, const scalar_t* __restrict__ grad_out,
                                       const index_t* __restrict__ idx, scalar_t* __restrict__ grad_in, int64_t total,
                                       bool overlapping) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_in[e] = unpool_backward_element<scalar_t, index_t>(g, grad_out, idx, e, overlapping);
  }
}

// Tiling windows: one run of consecutive full-map elements per thread (unpool_tiled_run), written
// with one vector store where the output is aligned to it.
template <typename T, int N>
struct alignas(sizeof(T) * N) RunPack {
  T v[N];
};

template <typename scalar_t, typename index_t, typename I>
__global__ void unpool_tiled_kernel(IndexPlan<I> p, const scalar_t* __restrict__ vals,
                                    const index_t* __restrict__ idx, scalar_t* __restrict__ out, I total,
                                    bool out_aligned, unsigned long long* matches) {
  constexpr int kRun = unpool_run_length<scalar_t>();
  int64_t local = 0;
  const I runs = (total + kRun - 1) / kRun;
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  // Uniform trip count per block so every thread reaches the block reduction.
  for (I base = static_cast<I>(blockIdx.x) * blockDim.x; base < runs; base += stride) {
    const I r = base + threadIdx.x;
    if (r >= runs) continue;
    const I e0 = r * kRun;
    const int count = total - e0 < kRun ? static_cast<int>(total - e0) : kRun;
    RunPack<scalar_t, kRun> pack;
    unpool_tiled_run<kRun, scalar_t, index_t, I>(p, vals, idx, e0, count, pack.v, local);
    if (out_aligned && count == kRun) {
      *reinterpret_cast<RunPack<scalar_t, kRun>*>(out + e0) = pack;
    } else {
      for (int k = 0; k < count; ++k) out[e0 + k] = pack.v[k];
    }
  }
  add_block_count(local, matches);
}

template <typename scalar_t, typename index_t, typename I>
__global__ void unpool_backward_tiled_kernel(IndexPlan<I> p, const scalar_t* __restrict__ grad_out,
                                             const index_t* __restrict__ idx, scalar_t* __restrict__ grad_in,
                                             I total) {
  const I stride = static_cast<I>(gridDim.x) * blockDim.x;
  for (I e = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride)
    grad_in[e] = unpool_backward_tiled_element<scalar_t, index_t, I>(p, grad_out, idx, e);
}

// Wide or overlapping windows (separable_applies): one block per tile of pooled outputs of one
// plane at a time; the row pass fills the shared scratch tile, the column pass reads it.
template <typename scalar_t, typename index_t, typename I>
__global__ void pool_separable_kernel(GeometryOf<I> g, const scalar_t* __restrict__ input,
                                      scalar_t* __restrict__ values, index_t* __restrict__ indices, int64_t tiles_y,
                                      int64_t tiles_x, int64_t tiles) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ double scratch[];  // double: aligned for either accumulator type
  const I rows = separable_tile_rows(g.ax[1]);
  acc_t* scratch_max = reinterpret_cast<acc_t*>(scratch);
  int32_t* scratch_tap = reinterpret_cast<int32_t*>(scratch_max + rows * kSeparableTileCols);
  const I in_plane = g.ax[1].full * g.ax[2].full, out_plane = g.ax[1].pooled * g.ax[2].pooled;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t plane_tiles = tiles_y * tiles_x;
    const I plane = static_cast<I>(t / plane_tiles);
    const int64_t in_tile = t - static_cast<int64_t>(plane) * plane_tiles;
    const I py0 = static_cast<I>(in_tile / tiles_x) * kSeparableTileRows;
    const I px0 = static_cast<I>(in_tile % tiles_x) * kSeparableTileCols;
    const scalar_t* in = input + plane * in_plane;
    for (I item = threadIdx.x; item < rows * kSeparableTileCols; item += blockDim.x)
      separable_row_item<scalar_t, acc_t, I>(g, in, py0, px0, item, scratch_max, scratch_tap);
    __syncthreads();
    for (I item = threadIdx.x; item < kSeparableTileRows * kSeparableTileCols; item += blockDim.x)
      separable_column_item<scalar_t, acc_t, index_t, I>(g, scratch_max, scratch_tap, py0, px0, item,
                                                         values + plane * out_plane, indices + plane * out_plane);
    __syncthreads();  // the next tile overwrites the scratch
  }
}

std::tuple<Tensor, Tensor> max_pool_with_indices_cuda(const Tensor& input, at::IntArrayRef kernel,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode, bool compact) {
  c10::cuda::CUDAGuard guard(input.device());
  PoolArgs a = prepare_pool(input, kernel, stride, padding, dilation, ceil_mode, compact);
  const Geometry& g = a.geometry;
  const Tensor& in = a.input;
  Tensor values = a.values, indices = a.indices;
  const int64_t total = values.numel();
  if (total == 0) return {values, indices};
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = grid_for((total + kThreads - 1) / kThreads);
  const bool narrow = pool_fits_int32(g, in.numel(), total);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "max_pool_with_indices_cuda", [&] {
    const scalar_t* ip = in.const_data_ptr<scalar_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    auto launch = [&](auto* index_tag, auto arithmetic_tag) {
      using index_t = std::remove_pointer_t<decltype(index_tag)>;
      using I = decltype(arithmetic_tag);
      const int64_t scratch = separable_scratch_bytes(g, sizeof(at::opmath_type<scalar_t>));
      if (separable_applies(g) && scratch <= kSeparableScratchLimit) {
        const int64_t tiles_y = ceil_div(g.ax[1].pooled, kSeparableTileRows);
        const int64_t tiles_x = ceil_div(g.ax[2].pooled, kSeparableTileCols);
        const int64_t tiles = values.size(0) * values.size(1) * tiles_y * tiles_x;
        pool_separable_kernel<scalar_t, index_t, I><<<grid_for(tiles), kThreads, scratch, stream>>>(
            narrow_geometry<I>(g), ip, vp, indices.mutable_data_ptr<index_t>(), tiles_y, tiles_x, tiles);
        return;
      }
      pool_forward_kernel<scalar_t, index_t, I><<<blocks, kThreads, 0, stream>>>(
          index_plan<I>(g), ip, vp, indices.mutable_data_ptr<index_t>(), static_cast<I>(total));
    };
    dispatch_pool_types(compact, narrow, launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

// Returns a device counter of matched entries (see file comment).
template <bool kSum>
Tensor gather_into_full(UnpoolArgs& a) {
  const Geometry& g = a.geometry;
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor matches = at::zeros({1}, a.values.options().dtype(at::kLong));
  auto* counter = reinterpret_cast<unsigned long long*>(matches.mutable_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_unpool_cuda", [&] {
    const scalar_t* vals = a.values.const_data_ptr<scalar_t>();
    scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
    auto run = [&](auto* idx) {
      using index_t = std::remove_const_t<std::remove_pointer_t<decltype(idx)>>;
      const int64_t total = a.out.numel();
      // Tiling windows never share an element, so the sum (kSum) is the one matching entry.
      if (all_axes_tiling(g)) {
        constexpr int kRun = unpool_run_length<scalar_t>();
        const int64_t runs = (total + kRun - 1) / kRun;
        const bool aligned = reinterpret_cast<uintptr_t>(out) % (sizeof(scalar_t) * kRun) == 0;
        if (tiled_fits_int32(g, total, a.values.numel()))
          unpool_tiled_kernel<scalar_t, index_t, int32_t><<<grid_for((runs + kThreads - 1) / kThreads), kThreads, 0,
                                                            stream>>>(index_plan<int32_t>(g), vals, idx, out,
                                                                      static_cast<int32_t>(total), aligned, counter);
        else
          unpool_tiled_kernel<scalar_t, index_t, int64_t><<<grid_for((runs + kThreads - 1) / kThreads), kThreads, 0,
                                                            stream>>>(index_plan<int64_t>(g), vals, idx, out, total,
                                                                      aligned, counter);
      } else if (all_axes_disjoint(g)) {
        const int64_t rows = full_rows(g, a.outer);
        unpool_rows_kernel<scalar_t, index_t>
            <<<grid_for(rows), kThreads, 0, stream>>>(g, vals, idx, out, rows, has_x_gaps(g), counter);
      } else {
        unpool_gather_kernel<scalar_t, index_t, kSum>
            <<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(g, vals, idx, out, total, counter);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (a.indices.scalar_type() == at::kByte)
      run(a.indices.const_data_ptr<uint8_t>());
    else
      run(a.indices.const_data_ptr<int64_t>());
  });
  return matches;
}

Tensor max_unpool_cuda(const Tensor& input, const Tensor& indices, at::IntArrayRef kernel, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef output_size,
                       bool check_indices) {
  c10::cuda::CUDAGuard guard(input.device());
  UnpoolArgs a = prepare_unpool(input, indices, kernel, stride, padding, dilation, output_size, "max_unpool");
  if (a.out.numel() == 0) return a.out;
  const Tensor matches = gather_into_full<false>(a);
  const int64_t entries = a.indices.numel();
  // The one host synchronisation of this op, and only with check_indices=True.
  if (!check_indices || matches.item<int64_t>() == entries) return a.out;
  const Geometry& g = a.geometry;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = grid_for((entries + kThreads - 1) / kThreads);
  Tensor counts = at::zeros({2}, a.values.options().dtype(at::kLong));
  auto* cptr = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  const bool compact = a.indices.scalar_type() == at::kByte;
  if (compact)
    classify_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(g, a.indices.const_data_ptr<uint8_t>(), entries, cptr);
  else
    classify_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(g, a.indices.const_data_ptr<int64_t>(), entries, cptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const Tensor host_counts = counts.cpu();
  const int64_t out_of_range = host_counts[0].item<int64_t>();
  TORCH_CHECK_INDEX(out_of_range == 0, out_of_range_message("max_unpool", out_of_range, compact));
  if (host_counts[1].item<int64_t>() == 0) return a.out;
  Tensor winners = at::zeros(a.out.sizes(), a.values.options().dtype(at::kLong).memory_format(a.out.suggest_memory_format()));
  auto* wptr = reinterpret_cast<unsigned long long*>(winners.mutable_data_ptr<int64_t>());
  elect_winners_kernel<<<blocks, kThreads, 0, stream>>>(g, a.indices.const_data_ptr<int64_t>(), entries, wptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = a.out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.values.scalar_type(), "max_unpool_winners_cuda", [&] {
    gather_winners_kernel<scalar_t><<<grid_for((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        g, a.values.const_data_ptr<scalar_t>(), wptr, a.out.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.out;
}

Tensor max_pool_backward_cuda(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              at::IntArrayRef input_size) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  UnpoolArgs a = prepare_unpool(grad_output, indices, kernel, stride, padding, dilation, input_size, "max_pool_backward");
  if (a.out.numel() > 0) gather_into_full<true>(a);
  return a.out;
}

Tensor max_unpool_backward_cuda(const Tensor& grad_output, const Tensor& indices, at::IntArrayRef kernel,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                bool only_winners) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  UnpoolBackwardArgs a = prepare_unpool_backward(grad_output, indices, kernel, stride, padding, dilation);
  const Geometry& g = a.geometry;
  const Tensor& go = a.grad_output;
  const Tensor& idx = a.indices;
  Tensor grad_input = a.grad_input;
  const int64_t total = grad_input.numel();
  if (total == 0) return grad_input;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = grid_for((total + kThreads - 1) / kThreads);
  if (all_axes_tiling(g)) {
    const bool small = tiled_fits_int32(g, go.numel(), total);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "max_unpool_backward_tiled_cuda", [&] {
      auto run = [&](auto* ip) {
        using index_t = std::remove_const_t<std::remove_pointer_t<decltype(ip)>>;
        if (small)
          unpool_backward_tiled_kernel<scalar_t, index_t, int32_t><<<blocks, kThreads, 0, stream>>>(
              index_plan<int32_t>(g), go.const_data_ptr<scalar_t>(), ip, grad_input.mutable_data_ptr<scalar_t>(),
              static_cast<int32_t>(total));
        else
          unpool_backward_tiled_kernel<scalar_t, index_t, int64_t><<<blocks, kThreads, 0, stream>>>(
              index_plan<int64_t>(g), go.const_data_ptr<scalar_t>(), ip, grad_input.mutable_data_ptr<scalar_t>(),
              total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (idx.scalar_type() == at::kByte)
        run(idx.const_data_ptr<uint8_t>());
      else
        run(idx.const_data_ptr<int64_t>());
    });
    return grad_input;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "max_unpool_backward_cuda", [&] {
    if (idx.scalar_type() == at::kByte)
      unpool_backward_kernel<scalar_t, uint8_t><<<blocks, kThreads, 0, stream>>>(
          g, go.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(), grad_input.mutable_data_ptr<scalar_t>(),
          total, only_winners && !all_axes_disjoint(g));
    else
      unpool_backward_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(
          g, go.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), grad_input.mutable_data_ptr<scalar_t>(),
          total, only_winners && !all_axes_disjoint(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CUDA, m) {
  m.impl("max_pool_with_indices", &max_pool_with_indices_cuda);
  m.impl("max_unpool", &max_unpool_cuda);
  m.impl("max_unpool_backward", &max_unpool_backward_cuda);
  m.impl("max_pool_backward", &max_pool_backward_cuda);
}

}  // namespace max_unpool
}  // namespace segkernels
