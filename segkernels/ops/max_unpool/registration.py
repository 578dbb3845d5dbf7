"""Registration of the pooling and unpooling ops: fake kernels and autograd. The C++ side
declares the schemas and the CPU and CUDA kernels."""

from __future__ import annotations

import torch

from ... import _library
from .geometry import memory_format, pooled_extent

_call = _library.call_below_autograd


def _empty_like_layout(like: torch.Tensor, sizes, dtype=None) -> torch.Tensor:
    fmt = memory_format(like)
    if len(sizes) != like.dim():
        fmt = torch.contiguous_format
    return torch.empty(sizes, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::max_pool_with_indices")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode, compact):
        pooled = [
            pooled_extent(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
            for i in range(len(kernel_size))
        ]
        sizes = list(input.shape[:2]) + pooled
        return _empty_like_layout(input, sizes), _empty_like_layout(
            input, sizes, torch.uint8 if compact else torch.int64
        )

    @torch.library.register_fake("segkernels::max_unpool")
    def _(input, indices, kernel_size, stride, padding, dilation, output_size, check_indices):
        return _empty_like_layout(input, list(input.shape[:2]) + list(output_size))

    @torch.library.register_fake("segkernels::max_unpool_backward")
    def _(grad_output, indices, kernel_size, stride, padding, dilation, only_winners):
        return _empty_like_layout(grad_output, list(indices.shape))

    @torch.library.register_fake("segkernels::max_pool_backward")
    def _(grad_output, indices, kernel_size, stride, padding, dilation, input_size):
        return _empty_like_layout(grad_output, list(grad_output.shape[:2]) + list(input_size))

    def _pool_setup(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, _ceil, _compact = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.input_size = list(input.shape[2:])
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _pool_backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad = _call(_ops.max_pool_backward.default, grad_values, indices, *ctx.geometry, ctx.input_size)
        return grad, None, None, None, None, None, None

    _pool_with_grad = _library.register_autograd(
        "segkernels::max_pool_with_indices", _pool_backward, setup_context=_pool_setup
    )

    def _unpool_setup(ctx, inputs, output):
        _input, indices, kernel_size, stride, padding, dilation, _size, _check = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.save_for_backward(indices)

    def _unpool_backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = _call(_ops.max_unpool_backward.default, grad_output, indices, *ctx.geometry, True)
        return grad, None, None, None, None, None, None, None

    _unpool_with_grad = _library.register_autograd("segkernels::max_unpool", _unpool_backward, setup_context=_unpool_setup)

    # The backward ops are linear maps whose adjoints are the forward-direction ops, which gives
    # double backward (gradgradcheck): the adjoint of the winners-only gather is unpooling
    # (latest entry wins), that of the all-entries gather is the max-pool backward (a sum).
    def _gather_setup(ctx, inputs, output):
        grad_output, indices, kernel_size, stride, padding, dilation, only_winners = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.full_size = list(grad_output.shape[2:])
        ctx.only_winners = only_winners
        ctx.save_for_backward(indices)

    def _gather_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        if ctx.only_winners:
            grad = _call(_ops.max_unpool.default, gg, indices, *ctx.geometry, ctx.full_size, False)
        else:
            grad = _call(_ops.max_pool_backward.default, gg, indices, *ctx.geometry, ctx.full_size)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::max_unpool_backward", _gather_backward, setup_context=_gather_setup)

    def _scatter_setup(ctx, inputs, output):
        _grad_output, indices, kernel_size, stride, padding, dilation, _size = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.save_for_backward(indices)

    def _scatter_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        return _call(_ops.max_unpool_backward.default, gg, indices, *ctx.geometry, False), None, None, None, None, None, None

    torch.library.register_autograd("segkernels::max_pool_backward", _scatter_backward, setup_context=_scatter_setup)

