"""Registration of the label-map convolution ops: fake kernels, autograd, forward-mode AD and
vmap rules. The C++ side declares the schemas and the CPU kernels; the Triton module registers
the CUDA kernels.

The convolution is linear in (weight, bias), and its weight backward is the adjoint of that map:
each op's gradient and tangent are the other op (or itself) on the incoming gradient or tangent,
which gives double backward and forward-mode AD exactly."""

from __future__ import annotations

import torch

from ... import _library


def output_size(labels_shape, weight_shape, stride, padding, dilation):
    """(N, O, Ho, Wo) of the convolution (floor mode, as F.conv2d)."""
    n, h, w = labels_shape
    o, _c, kh, kw = weight_shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return n, o, ho, wo


if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::one_hot_conv2d")
    def _(labels, weight, bias, stride, padding, dilation, ignore_index):
        return weight.new_empty(output_size(labels.shape, weight.shape, stride, padding, dilation))

    @torch.library.register_fake("segkernels::one_hot_conv2d_weight_backward")
    def _(grad_output, labels, weight_size, stride, padding, dilation, ignore_index):
        return grad_output.new_empty(weight_size), grad_output.new_empty((weight_size[0],))

    @torch.library.register_fake("segkernels::label_fractions")
    def _(labels, num_classes, factor, ignore_index):
        n, h, w = labels.shape
        return labels.new_empty((n, num_classes, h // factor, w // factor), dtype=torch.float32)

    def _conv_setup(ctx, inputs, output):
        labels, weight, bias, stride, padding, dilation, ignore_index = inputs
        ctx.params = (list(weight.shape), list(stride), list(padding), list(dilation), ignore_index)
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(labels)
        ctx.save_for_forward(labels)

    def _conv_backward(ctx, grad):
        (labels,) = ctx.saved_tensors
        grad_weight, grad_bias = weight_backward(grad, labels, *ctx.params)
        return None, grad_weight, grad_bias if ctx.has_bias else None, None, None, None, None

    def _conv_jvp(ctx, _t_labels, t_weight, t_bias, *_):
        (labels,) = ctx.saved_tensors
        size, stride, padding, dilation, ignore_index = ctx.params
        if t_weight is None:  # only the bias carries a tangent
            t_weight = t_bias.new_zeros(size)
        return conv(labels, t_weight, t_bias, stride, padding, dilation, ignore_index)

    OneHotConvFunction = _library.op_function(
        "segkernels::one_hot_conv2d", setup_context=_conv_setup, backward=_conv_backward, jvp=_conv_jvp
    )

    def _wb_setup(ctx, inputs, output):
        _grad, labels, weight_size, stride, padding, dilation, ignore_index = inputs
        ctx.params = (list(weight_size), list(stride), list(padding), list(dilation), ignore_index)
        ctx.save_for_backward(labels)
        ctx.save_for_forward(labels)

    def _wb_backward(ctx, gg_weight, gg_bias):
        (labels,) = ctx.saved_tensors
        size, stride, padding, dilation, ignore_index = ctx.params
        if gg_weight is None:
            gg_weight = gg_bias.new_zeros(size)
        return conv(labels, gg_weight, gg_bias, stride, padding, dilation, ignore_index), None, None, None, None, None, None

    def _wb_jvp(ctx, t_grad, *_):
        (labels,) = ctx.saved_tensors
        return weight_backward(t_grad, labels, *ctx.params)

    WeightBackwardFunction = _library.op_function(
        "segkernels::one_hot_conv2d_weight_backward", setup_context=_wb_setup, backward=_wb_backward, jvp=_wb_jvp
    )

    # The linear maps, each through its Function (see max_unpool's registration).
    def conv(labels, weight, bias, stride, padding, dilation, ignore_index):
        return _library.call_op(_ops.one_hot_conv2d.default, OneHotConvFunction, labels, weight, bias, list(stride),
                                list(padding), list(dilation), ignore_index)

    def weight_backward(grad, labels, weight_size, stride, padding, dilation, ignore_index):
        return _library.call_op(_ops.one_hot_conv2d_weight_backward.default, WeightBackwardFunction, grad, labels,
                                list(weight_size), list(stride), list(padding), list(dilation), ignore_index)

    def _pick(t, dim, k):
        return t if t is None or dim is None else t.select(dim, k)

    # vmap: vmapped labels with a shared weight fold into the batch dim N (one call); a weight or
    # bias per sample, and the weight backward (which sums over N), take one call per sample.
    @torch.library.register_vmap("segkernels::one_hot_conv2d")
    def _(info, in_dims, labels, weight, bias, stride, padding, dilation, ignore_index):
        l_dim, w_dim, b_dim = in_dims[:3]
        if w_dim is None and b_dim is None:
            (x,), size = _library.fold_batch(info, [l_dim], [labels])
            out = _ops.one_hot_conv2d.default(x, weight, bias, stride, padding, dilation, ignore_index)
            return _library.unfold_batch(out, size), 0
        outs = [
            _ops.one_hot_conv2d.default(_pick(labels, l_dim, k), _pick(weight, w_dim, k), _pick(bias, b_dim, k),
                                        stride, padding, dilation, ignore_index)
            for k in range(info.batch_size)
        ]
        return torch.stack(outs), 0

    @torch.library.register_vmap("segkernels::one_hot_conv2d_weight_backward")
    def _(info, in_dims, grad, labels, weight_size, stride, padding, dilation, ignore_index):
        g_dim, l_dim = in_dims[:2]
        parts = [
            _ops.one_hot_conv2d_weight_backward.default(_pick(grad, g_dim, k), _pick(labels, l_dim, k), weight_size,
                                                        stride, padding, dilation, ignore_index)
            for k in range(info.batch_size)
        ]
        return (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])), (0, 0)

    @torch.library.register_vmap("segkernels::label_fractions")
    def _(info, in_dims, labels, num_classes, factor, ignore_index):
        (x,), size = _library.fold_batch(info, in_dims[:1], [labels])
        return _library.unfold_batch(_ops.label_fractions.default(x, num_classes, factor, ignore_index), size), 0
