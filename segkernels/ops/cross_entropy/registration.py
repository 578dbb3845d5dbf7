"""Registration of cross_entropy: fake kernels, autograd (the op's own, and CrossEntropyFunction
for the public function with forward-mode AD and torch.func), and vmap rules. The C++ side
declares the schemas and the CPU kernels; the Triton module registers the CUDA kernels.

The forward saves per pixel log sum_c exp(z_c - max z); the backward recomputes the upsampled logits
from the input (one more read of it) instead of keeping anything of size N * C * H * W.
"""

from __future__ import annotations

import torch

from ... import _library
from ..._checks import is_channels_last
from .reference import interpolation_matrix


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_grad(x: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return _library.new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _pixel_terms(input, target, weight, ignore_index, label_smoothing, align_corners):
    """Differentiable torch ops: the upsampled logits' softmax p (N, C, H, W), and per pixel the
    coefficients of d loss / d z_c = a p_c - b [c == t] - e w_c (cross_entropy.h) with the
    labelled mask, the safe target and the class weights."""
    acc = acc_dtype(input.dtype)
    size = target.shape[1:]
    ry = interpolation_matrix(input.shape[2], size[0], align_corners, acc, input.device)
    rx = interpolation_matrix(input.shape[3], size[1], align_corners, acc, input.device)
    z = torch.einsum("Yy,ncyx,Xx->ncYX", ry, input.to(acc), rx)
    p = torch.softmax(z, 1)
    C = input.shape[1]
    labelled = target != ignore_index
    safe = torch.where(labelled, target, 0).long()
    w = weight.to(acc) if weight is not None else torch.ones(C, dtype=acc, device=input.device)
    w_t = w[safe]
    e = label_smoothing / C
    b = (1.0 - label_smoothing) * w_t
    a = b + e * w.sum()
    return ry, rx, z, p, labelled, safe, w, a, b, e


def formula_grad(grad, input, target, weight, ignore_index, label_smoothing, align_corners):
    """The input gradient of sum(grad * per-pixel loss) as differentiable torch ops (N * C * H * W
    memory): what the backward uses when it records a graph (double backward, torch.func's nested
    transforms)."""
    ry, rx, z, p, labelled, safe, w, a, b, e = _pixel_terms(input, target, weight, ignore_index, label_smoothing,
                                                             align_corners)
    classes = torch.arange(input.shape[1], device=input.device).view(1, -1, 1, 1)
    onehot = (safe.unsqueeze(1) == classes).to(p.dtype)  # not F.one_hot: it reads a max, which vmap refuses
    dz = a.unsqueeze(1) * p - b.unsqueeze(1) * onehot - e * w.view(1, -1, 1, 1)
    dz = torch.where(labelled.unsqueeze(1), dz * grad.to(p.dtype).unsqueeze(1), 0.0)
    return torch.einsum("Yy,ncYX,Xx->ncyx", ry, dz, rx).to(input.dtype)


def formula_tangent(tangent, input, target, weight, ignore_index, label_smoothing, align_corners):
    """The per-pixel loss's tangent (N, H, W) for an input tangent (forward-mode AD)."""
    ry, rx, z, p, labelled, safe, w, a, b, e = _pixel_terms(input, target, weight, ignore_index, label_smoothing,
                                                             align_corners)
    dz = torch.einsum("Yy,ncyx,Xx->ncYX", ry, tangent.to(p.dtype), rx)
    t = a * (p * dz).sum(1) - b * dz.gather(1, safe.unsqueeze(1)).squeeze(1) - e * (w.view(1, -1, 1, 1) * dz).sum(1)
    return torch.where(labelled, t, 0.0)


if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::cross_entropy")
    def _(input, target, weight, ignore_index, label_smoothing, align_corners, per_pixel, save_log_sum):
        acc = acc_dtype(input.dtype)
        n, h, w = target.shape
        loss = input.new_empty((n, h, w) if per_pixel else (n, h), dtype=acc)
        log_sum = input.new_empty((n, h, w) if save_log_sum else (0,), dtype=acc)
        return loss, input.new_empty((n, h), dtype=acc), log_sum

    @torch.library.register_fake("segkernels::cross_entropy_backward")
    def _(grad, input, target, weight, log_sum, ignore_index, label_smoothing, align_corners):
        return new_grad(input)

    def _setup(ctx, inputs, output):
        input, target, weight, ignore_index, label_smoothing, align_corners, per_pixel, _save = inputs
        _loss, weight_sum, log_sum = output
        ctx.params = (ignore_index, label_smoothing, align_corners, per_pixel)
        ctx.save_for_backward(input, target, weight, log_sum)
        ctx.save_for_forward(input, target, weight)
        ctx.mark_non_differentiable(weight_sum, log_sum)
        ctx.set_materialize_grads(False)

    def _input_grad(ctx, grad_loss):
        input, target, weight, log_sum = ctx.saved_tensors
        ignore_index, label_smoothing, align_corners, per_pixel = ctx.params
        acc = acc_dtype(input.dtype)
        n, H, W = target.shape
        grad = grad_loss.to(acc)
        if not per_pixel:  # one gradient per row sum, for each of its pixels
            grad = grad.unsqueeze(-1).expand(n, H, W)
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()) or log_sum.numel() != target.numel():
            return formula_grad(grad, input, target, weight, ignore_index, label_smoothing, align_corners)
        return _ops.cross_entropy_backward.default(grad, input, target, weight, log_sum, ignore_index, label_smoothing,
                                                   align_corners)

    def _backward(ctx, grad_loss, _grad_weight_sum, _grad_log_sum):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * len(ctx.needs_input_grad)
        return (_input_grad(ctx, grad_loss),) + (None,) * (len(ctx.needs_input_grad) - 1)

    def _jvp(ctx, t_input, *rest):
        if t_input is None:
            return None, None, None
        input, target, weight = ctx.saved_tensors[:3]
        ignore_index, label_smoothing, align_corners, per_pixel = ctx.params
        t = formula_tangent(t_input, input, target, weight, ignore_index, label_smoothing, align_corners)
        return (t if per_pixel else t.sum(-1)), None, None

    CrossEntropyFunction = _library.op_function("segkernels::cross_entropy", setup_context=_setup, backward=_backward,
                                                jvp=_jvp)

    # vmap: images are independent, so the vmapped dim folds into the batch; a batched weight
    # runs one call per sample.
    @torch.library.register_vmap("segkernels::cross_entropy")
    def _(info, in_dims, input, target, weight, *args):
        if in_dims[2] is not None:
            outs = [_ops.cross_entropy.default(*(x if d is None else x.select(d, i)
                                                 for x, d in zip((input, target, weight), in_dims[:3])), *args)
                    for i in range(info.batch_size)]
            return tuple(torch.stack(list(o)) for o in zip(*outs)), (0, 0, 0)
        (x, y), size = _library.fold_batch(info, in_dims[:2], [input, target])
        loss, wsum, log_sum = _ops.cross_entropy.default(x, y, weight, *args)
        log_sum = _library.unfold_batch(log_sum, size) if log_sum.numel() else log_sum.expand(size, 0)
        return (_library.unfold_batch(loss, size), _library.unfold_batch(wsum, size), log_sum), (0, 0, 0)

    @torch.library.register_vmap("segkernels::cross_entropy_backward")
    def _(info, in_dims, grad, input, target, weight, log_sum, *args):
        if in_dims[3] is not None:
            outs = [_ops.cross_entropy_backward.default(
                *(x if d is None else x.select(d, i) for x, d in zip((grad, input, target, weight, log_sum), in_dims[:5])),
                *args) for i in range(info.batch_size)]
            return torch.stack(outs), 0
        (g, x, y, ll), size = _library.fold_batch(info, in_dims[:3] + in_dims[4:5], [grad, input, target, log_sum])
        return _library.unfold_batch(_ops.cross_entropy_backward.default(g, x, y, weight, ll, *args), size), 0
