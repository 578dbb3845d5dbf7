"""Registration of the assembly ops: fake kernels and autograd. The C++ side declares the
schemas and the CPU and CUDA kernels. Every op is linear in its tensor input: the backward of
each is the other (the forward ops with pad 0 are the adjoints of the backward ops), which
gives double backward."""

from __future__ import annotations

import torch

from ... import _library

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

    # Every op is linear in its tensor input (the assembly is affine: pad_value fills what lies
    # outside the map), so each jvp is the op itself on the tangent, with pad 0.
    def _sparse_setup(ctx, inputs, output):
        scores, windows, k, m, _pad = inputs
        ctx.params = (list(scores.shape), k, m)
        ctx.save_for_backward(windows)
        ctx.save_for_forward(windows)

    def _sparse_backward(ctx, grad):
        (windows,) = ctx.saved_tensors
        size, k, m = ctx.params
        return assemble_backward(grad, windows, size, k, m), None, None, None, None

    def _sparse_jvp(ctx, t_scores, *_):
        (windows,) = ctx.saved_tensors
        _size, k, m = ctx.params
        return assemble(t_scores, windows, k, m)

    AssembleFunction = _library.op_function(
        "segkernels::ps_assemble", setup_context=_sparse_setup, backward=_sparse_backward, jvp=_sparse_jvp
    )

    def _sparse_bwd_setup(ctx, inputs, output):
        _grad, windows, size, k, m = inputs
        ctx.params = (list(size), k, m)
        ctx.save_for_backward(windows)
        ctx.save_for_forward(windows)

    def _sparse_bwd_backward(ctx, gg):
        (windows,) = ctx.saved_tensors
        _size, k, m = ctx.params
        return assemble(gg, windows, k, m), None, None, None, None

    def _sparse_bwd_jvp(ctx, t_grad, *_):
        (windows,) = ctx.saved_tensors
        return assemble_backward(t_grad, windows, *ctx.params)

    AssembleBackwardFunction = _library.op_function(
        "segkernels::ps_assemble_backward", setup_context=_sparse_bwd_setup, backward=_sparse_bwd_backward,
        jvp=_sparse_bwd_jvp,
    )

    def _dense_setup(ctx, inputs, output):
        scores, k, m, stride, _pad = inputs
        ctx.params = (list(scores.shape), k, m, stride)

    def _dense_backward(ctx, grad):
        return assemble_dense_backward(grad, *ctx.params), None, None, None, None

    def _dense_jvp(ctx, t_scores, *_):
        _size, k, m, stride = ctx.params
        return assemble_dense(t_scores, k, m, stride)

    AssembleDenseFunction = _library.op_function(
        "segkernels::ps_assemble_dense", setup_context=_dense_setup, backward=_dense_backward, jvp=_dense_jvp
    )

    def _dense_bwd_setup(ctx, inputs, output):
        _grad, size, k, m, stride = inputs
        ctx.params = (list(size), k, m, stride)

    def _dense_bwd_backward(ctx, gg):
        _size, k, m, stride = ctx.params
        return assemble_dense(gg, k, m, stride), None, None, None, None

    def _dense_bwd_jvp(ctx, t_grad, *_):
        return assemble_dense_backward(t_grad, *ctx.params)

    AssembleDenseBackwardFunction = _library.op_function(
        "segkernels::ps_assemble_dense_backward", setup_context=_dense_bwd_setup, backward=_dense_bwd_backward,
        jvp=_dense_bwd_jvp,
    )

    # The linear maps, each through its Function (see max_unpool's registration).
    def assemble(scores, windows, k, m):
        return _library.call_op(_ops.ps_assemble.default, AssembleFunction, scores, windows, k, m, 0.0)

    def assemble_backward(grad, windows, size, k, m):
        return _library.call_op(_ops.ps_assemble_backward.default, AssembleBackwardFunction, grad, windows,
                                list(size), k, m)

    def assemble_dense(scores, k, m, stride):
        return _library.call_op(_ops.ps_assemble_dense.default, AssembleDenseFunction, scores, k, m, stride, 0.0)

    def assemble_dense_backward(grad, size, k, m, stride):
        return _library.call_op(_ops.ps_assemble_dense_backward.default, AssembleDenseBackwardFunction, grad,
                                list(size), k, m, stride)

    # vmap: the vmapped dim folds into the batch dim N of the scores; the windows of vmapped
    # sample i then point at images i * N + b, and an invalid batch index stays invalid (-1).
    def _fold_windows(info, windows, dim, images):
        size = info.batch_size
        windows = windows.expand(size, *windows.shape) if dim is None else windows.movedim(dim, 0)
        b = windows[..., 0]
        shift = torch.arange(size, device=windows.device).view(-1, *([1] * (b.dim() - 1))) * images
        b = torch.where((b >= 0) & (b < images), b + shift, -1)
        return torch.cat([b.unsqueeze(-1), windows[..., 1:]], -1).reshape(-1, 3)

    @torch.library.register_vmap("segkernels::ps_assemble")
    def _(info, in_dims, scores, windows, k, m, pad_value):
        (x,), size = _library.fold_batch(info, in_dims[:1], [scores])
        images = x.shape[0] // size
        w = _fold_windows(info, windows, in_dims[1], images)
        return _library.unfold_batch(_ops.ps_assemble.default(x, w, k, m, pad_value), size), 0

    @torch.library.register_vmap("segkernels::ps_assemble_backward")
    def _(info, in_dims, grad, windows, scores_size, k, m):
        (g,), size = _library.fold_batch(info, in_dims[:1], [grad])
        w = _fold_windows(info, windows, in_dims[1], scores_size[0])
        folded = [scores_size[0] * size, *scores_size[1:]]
        return _library.unfold_batch(_ops.ps_assemble_backward.default(g, w, folded, k, m), size), 0

    @torch.library.register_vmap("segkernels::ps_assemble_dense")
    def _(info, in_dims, scores, k, m, stride, pad_value):
        (x,), size = _library.fold_batch(info, in_dims[:1], [scores])
        return _library.unfold_batch(_ops.ps_assemble_dense.default(x, k, m, stride, pad_value), size), 0

    @torch.library.register_vmap("segkernels::ps_assemble_dense_backward")
    def _(info, in_dims, grad, scores_size, k, m, stride):
        (g,), size = _library.fold_batch(info, in_dims[:1], [grad])
        folded = [scores_size[0] * size, *scores_size[1:]]
        return _library.unfold_batch(_ops.ps_assemble_dense_backward.default(g, folded, k, m, stride), size), 0
