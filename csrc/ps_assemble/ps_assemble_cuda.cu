// CUDA kernels for InstanceFCN position-sensitive assembly. The per-element logic is the
// host/device code of ps_assemble.h (the CPU tests run it through the _ps_assemble_* ops);
// this file maps it onto threads: one block per output tile in the forward, one thread per
// score element in the backward (a gather: no atomics, a fixed summation order, so the
// gradient is bitwise repeatable). The sparse backward sorts the windows with at::sort on the
// device; nothing here reads back to the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ps_assemble/ps_assemble_host.h"

namespace segkernels {
namespace ps_assemble {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 64));
}

#define SK_GRID_STRIDE(e, total)                                                              \
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < (total); \
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)

// One tile per block iteration: the window is decoded once, threads stride over its m * m
// elements (consecutive threads write consecutive outputs and read consecutive x).
template <typename scalar_t, bool kDense>
__global__ void forward_tiles_kernel(Geometry g, const scalar_t* __restrict__ scores,
                                     const int64_t* __restrict__ windows, scalar_t* __restrict__ out, int64_t tiles,
                                     scalar_t pad) {
  const int64_t mm = g.m * g.m;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = kDense ? dense_tile(g, t) : sparse_tile(g, windows, t);
    scalar_t* o = out + t * mm;
    for (int64_t idx = threadIdx.x; idx < mm; idx += blockDim.x) o[idx] = tile_element(g, scores, tile, idx, pad);
  }
}

template <typename scalar_t, bool kDense>
void launch_forward(const Geometry& g, const Tensor& scores, const int64_t* windows, Tensor& out, double pad_value) {
  const int64_t mm = g.m * g.m;
  const int64_t tiles = out.numel() / mm;
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (mm + 31) / 32 * 32)));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(tiles, sms * (2048 / threads) * 8));
  forward_tiles_kernel<scalar_t, kDense><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      g, scores.const_data_ptr<scalar_t>(), windows, out.mutable_data_ptr<scalar_t>(), tiles,
      static_cast<scalar_t>(pad_value));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void backward_kernel(Geometry g, const scalar_t* __restrict__ grad, const int64_t* __restrict__ windows,
                                const int64_t* __restrict__ keys, const int64_t* __restrict__ order, int64_t R,
                                scalar_t* __restrict__ out, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  SK_GRID_STRIDE(e, total) {
    out[e] = static_cast<scalar_t>(backward_gather_element<scalar_t, acc_t>(g, grad, windows, keys, order, R, e));
  }
}

template <typename scalar_t>
__global__ void dense_backward_kernel(Geometry g, const scalar_t* __restrict__ grad, scalar_t* __restrict__ out,
                                      int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  SK_GRID_STRIDE(e, total) { out[e] = static_cast<scalar_t>(dense_backward_gather_element<scalar_t, acc_t>(g, grad, e)); }
}

Tensor ps_assemble_cuda(const Tensor& scores, const Tensor& windows_in, int64_t k, int64_t m, double pad_value) {
  c10::cuda::CUDAGuard guard(scores.device());
  check_float(scores, "scores");
  check_windows(windows_in, scores);
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, 1);
  const Tensor windows = windows_in.contiguous();
  Tensor out = new_output({windows.size(0), g.G, m, m}, scores.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_cuda", [&] {
    launch_forward<scalar_t, false>(g, scores, windows.const_data_ptr<int64_t>(), out, pad_value);
  });
  return out;
}

Tensor ps_assemble_dense_cuda(const Tensor& scores, int64_t k, int64_t m, int64_t stride, double pad_value) {
  c10::cuda::CUDAGuard guard(scores.device());
  check_float(scores, "scores");
  const Geometry g = make_geometry(scores.sizes(), scores.strides(), k, m, stride);
  Tensor out = new_output({g.N, g.G, g.Ho, g.Wo, m, m}, scores.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "ps_assemble_dense_cuda", [&] {
    launch_forward<scalar_t, true>(g, scores, nullptr, out, pad_value);
  });
  return out;
}

Tensor ps_assemble_backward_cuda(const Tensor& grad_in, const Tensor& windows_in, at::IntArrayRef scores_size,
                                 int64_t k, int64_t m) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  const BackwardArgs a = prepare_backward(grad_in, windows_in, scores_size, k, m);
  const Geometry& g = a.g;
  const Tensor &grad = a.grad, &windows = a.windows, &out = a.out;
  const int64_t total = out.numel();
  if (total == 0) return out;
  Tensor keys, order;
  std::tie(keys, order) = sort_windows(g, windows);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_backward_cuda", [&] {
    backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        g, grad.const_data_ptr<scalar_t>(), windows.const_data_ptr<int64_t>(), keys.const_data_ptr<int64_t>(),
        order.const_data_ptr<int64_t>(), windows.size(0), out.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor ps_assemble_dense_backward_cuda(const Tensor& grad_in, at::IntArrayRef scores_size, int64_t k, int64_t m,
                                       int64_t stride) {
  c10::cuda::CUDAGuard guard(grad_in.device());
  const BackwardArgs a = prepare_dense_backward(grad_in, scores_size, k, m, stride);
  const Geometry& g = a.g;
  const Tensor &grad = a.grad, &out = a.out;
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ps_assemble_dense_backward_cuda", [&] {
    dense_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        g, grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segkernels, CUDA, m) {
  m.impl("ps_assemble", &ps_assemble_cuda);
  m.impl("ps_assemble_backward", &ps_assemble_backward_cuda);
  m.impl("ps_assemble_dense", &ps_assemble_dense_cuda);
  m.impl("ps_assemble_dense_backward", &ps_assemble_dense_backward_cuda);
}

}  // namespace ps_assemble
}  // namespace segkernels
