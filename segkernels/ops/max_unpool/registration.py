"""Registration of the pooling and unpooling ops: fake kernels and autograd. The C++ side
declares the schemas and the CPU and CUDA kernels."""

from __future__ import annotations

import torch

from ... import _library
from .geometry import memory_format, pooled_extent



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
        ctx.save_for_forward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _pool_backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        return scatter(grad_values, indices, ctx.geometry, ctx.input_size), None, None, None, None, None, None

    def _pool_jvp(ctx, t_input, *_):
        # Linear in the input: the values' tangent is the input's tangent at each maximum.
        (indices,) = ctx.saved_tensors
        return gather(t_input, indices, ctx.geometry, False), None

    MaxPoolFunction = _library.op_function(
        "segkernels::max_pool_with_indices", setup_context=_pool_setup, backward=_pool_backward, jvp=_pool_jvp
    )

    def _unpool_setup(ctx, inputs, output):
        _input, indices, kernel_size, stride, padding, dilation, output_size, _check = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.output_size = list(output_size)
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)

    def _unpool_backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        return gather(grad_output, indices, ctx.geometry, True), None, None, None, None, None, None, None

    def _unpool_jvp(ctx, t_input, *_):
        (indices,) = ctx.saved_tensors
        return unpool(t_input, indices, ctx.geometry, ctx.output_size)

    MaxUnpoolFunction = _library.op_function(
        "segkernels::max_unpool", setup_context=_unpool_setup, backward=_unpool_backward, jvp=_unpool_jvp
    )

    # The backward ops are linear maps whose adjoints are the forward-direction ops, which gives
    # double backward (gradgradcheck): the adjoint of the winners-only gather is unpooling
    # (latest entry wins), that of the all-entries gather is the max-pool backward (a sum).
    def _gather_setup(ctx, inputs, output):
        grad_output, indices, kernel_size, stride, padding, dilation, only_winners = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.full_size = list(grad_output.shape[2:])
        ctx.only_winners = only_winners
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)

    def _gather_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        if ctx.only_winners:
            grad = unpool(gg, indices, ctx.geometry, ctx.full_size)
        else:
            grad = scatter(gg, indices, ctx.geometry, ctx.full_size)
        return grad, None, None, None, None, None, None

    def _gather_jvp(ctx, t_grad, *_):
        (indices,) = ctx.saved_tensors
        return gather(t_grad, indices, ctx.geometry, ctx.only_winners)

    GatherFunction = _library.op_function(
        "segkernels::max_unpool_backward", setup_context=_gather_setup, backward=_gather_backward, jvp=_gather_jvp
    )

    def _scatter_setup(ctx, inputs, output):
        _grad_output, indices, kernel_size, stride, padding, dilation, input_size = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.input_size = list(input_size)
        ctx.save_for_backward(indices)
        ctx.save_for_forward(indices)

    def _scatter_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        return gather(gg, indices, ctx.geometry, False), None, None, None, None, None, None

    def _scatter_jvp(ctx, t_grad, *_):
        (indices,) = ctx.saved_tensors
        return scatter(t_grad, indices, ctx.geometry, ctx.input_size)

    ScatterFunction = _library.op_function(
        "segkernels::max_pool_backward", setup_context=_scatter_setup, backward=_scatter_backward, jvp=_scatter_jvp
    )

    # The linear maps the backward and jvp formulas are made of, each through its Function, so
    # that a graph of them (double backward) or a transform over them (forward over reverse)
    # is recorded; a first-order backward calls the ops directly.
    def gather(grad, indices, geometry, only_winners):
        return _library.call_op(_ops.max_unpool_backward.default, GatherFunction, grad, indices, *geometry,
                                only_winners)

    def scatter(grad, indices, geometry, full_size):
        return _library.call_op(_ops.max_pool_backward.default, ScatterFunction, grad, indices, *geometry,
                                list(full_size))

    def unpool(values, indices, geometry, full_size):
        return _library.call_op(_ops.max_unpool.default, MaxUnpoolFunction, values, indices, *geometry,
                                list(full_size), False)

    # vmap: the vmapped dim folds into the batch dim of (N, C, *spatial) inputs.
    @torch.library.register_vmap("segkernels::max_pool_with_indices")
    def _(info, in_dims, input, *args):
        (x,), size = _library.fold_batch(info, in_dims[:1], [input])
        values, indices = _ops.max_pool_with_indices.default(x, *args)
        return (_library.unfold_batch(values, size), _library.unfold_batch(indices, size)), (0, 0)

    def _fold_two(op):
        def rule(info, in_dims, a, b, *args):
            (a, b), size = _library.fold_batch(info, in_dims[:2], [a, b])
            return _library.unfold_batch(op(a, b, *args), size), 0

        return rule

    for _name in ("max_unpool", "max_unpool_backward", "max_pool_backward"):
        torch.library.register_vmap(f"segkernels::{_name}", _fold_two(getattr(_ops, _name).default))
