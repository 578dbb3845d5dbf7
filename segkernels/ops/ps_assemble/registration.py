"""Registration of the assembly ops: fake kernels and autograd. The C++ side declares the
schemas and the CPU and CUDA kernels. Every op is linear in its tensor input: the backward of
each is the other (the forward ops with pad 0 are the adjoints of the backward ops), which
gives double backward."""

from __future__ import annotations

import torch

from ... import _library

_call = _library.call_below_autograd

if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::ps_assemble")
    def _(scores, windows, k, m, pad_value):
        return scores.new_empty((windows.shape[0], scores.shape[1] // (k * k), m, m))

    @torch.library.register_fake("segkernels::ps_assemble_backward")
    def _(grad_output, windows, scores_size, k, m):
        return grad_output.new_empty(scores_size)

    @torch.library.register_fake("segkernels::ps_assemble_dense")
    def _(scores, k, m, stride, pad_value):
        n, c, h, w = scores.shape
        return scores.new_empty((n, c // (k * k), (h + stride - 1) // stride, (w + stride - 1) // stride, m, m))

    @torch.library.register_fake("segkernels::ps_assemble_dense_backward")
    def _(grad_output, scores_size, k, m, stride):
        return grad_output.new_empty(scores_size)

    def _sparse_setup(ctx, inputs, output):
        scores, windows, k, m, _pad = inputs
        ctx.params = (list(scores.shape), k, m)
        ctx.save_for_backward(windows)

    def _sparse_backward(ctx, grad):
        (windows,) = ctx.saved_tensors
        size, k, m = ctx.params
        return _call(_ops.ps_assemble_backward.default, grad, windows, size, k, m), None, None, None, None

    torch.library.register_autograd("segkernels::ps_assemble", _sparse_backward, setup_context=_sparse_setup)

    def _sparse_bwd_setup(ctx, inputs, output):
        _grad, windows, _size, k, m = inputs
        ctx.params = (k, m)
        ctx.save_for_backward(windows)

    def _sparse_bwd_backward(ctx, gg):
        (windows,) = ctx.saved_tensors
        k, m = ctx.params
        return _call(_ops.ps_assemble.default, gg, windows, k, m, 0.0), None, None, None, None

    torch.library.register_autograd(
        "segkernels::ps_assemble_backward", _sparse_bwd_backward, setup_context=_sparse_bwd_setup
    )

    def _dense_setup(ctx, inputs, output):
        scores, k, m, stride, _pad = inputs
        ctx.params = (list(scores.shape), k, m, stride)

    def _dense_backward(ctx, grad):
        return _call(_ops.ps_assemble_dense_backward.default, grad, *ctx.params), None, None, None, None

    torch.library.register_autograd("segkernels::ps_assemble_dense", _dense_backward, setup_context=_dense_setup)

    def _dense_bwd_setup(ctx, inputs, output):
        _grad, _size, k, m, stride = inputs
        ctx.params = (k, m, stride)

    def _dense_bwd_backward(ctx, gg):
        k, m, stride = ctx.params
        return _call(_ops.ps_assemble_dense.default, gg, k, m, stride, 0.0), None, None, None, None

    torch.library.register_autograd(
        "segkernels::ps_assemble_dense_backward", _dense_bwd_backward, setup_context=_dense_bwd_setup
    )

