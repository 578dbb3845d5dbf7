"""Registration of the distillation ops: output shapes and layouts (shared with the Triton
launchers), fake kernels, and autograd. The C++ side declares the schemas and the CPU kernels;
the Triton module registers the CUDA kernels."""

from __future__ import annotations

from typing import List, Sequence

import torch

from ... import _library
from ..._checks import is_channels_last as _is_channels_last
from ..._library import new_output

def _layout(tensors: Sequence[torch.Tensor], spatial: bool):
    """(channels_last, tensors in that layout): channels-last is read in place when every input
    has it (channel axis only), anything else is made NCHW-contiguous."""
    cl = not spatial and all(_is_channels_last(x) for x in tensors)
    return cl, [x if cl else x.contiguous() for x in tensors]


def _new_grad(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return new_output(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _map_sizes(k: int, teacher: torch.Tensor, spatial: bool) -> List[int]:
    return [k, teacher.shape[0], teacher.shape[1]] if spatial else [k, teacher.shape[0], *teacher.shape[2:]]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _library.kernels_available():

    @torch.library.register_fake("segkernels::kd_loss")
    def _(students, teacher, labels, temperature, spatial, kl, scale_by_t2, ignore_index):
        cl = not spatial and all(_is_channels_last(x) for x in list(students) + [teacher])
        loss = teacher.new_empty(_map_sizes(len(students), teacher, spatial), dtype=_acc_dtype(teacher.dtype))
        grads = [
            torch.empty_like(s, memory_format=torch.channels_last if s.dim() == 4 else torch.channels_last_3d)
            if cl
            else torch.empty(s.shape, dtype=s.dtype, device=s.device)
            for s in students
        ]
        return loss, grads

    @torch.library.register_fake("segkernels::seg_kd_loss")
    def _(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index):
        cl = _is_channels_last(student) and _is_channels_last(teacher)
        grad = _new_grad(student, cl)
        return teacher.new_empty((), dtype=_acc_dtype(teacher.dtype)), grad

    def _kd_setup(ctx, inputs, output):
        _students, _teacher, _labels, _t, spatial, _kl, _scale, _ignore = inputs
        _loss, grads = output
        ctx.spatial = spatial
        ctx.save_for_backward(*grads)
        # The gradient outputs are not differentiable; without this autograd would hand the
        # backward an input-sized tensor of zeros for each of them.
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)

    def _no_double_backward(name):
        # The saved gradient is a constant to autograd: a graph of this backward would miss the
        # second derivative, so refuse rather than return a silently wrong one.
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(f"segkernels.{name}: double backward (create_graph=True) is not supported")

    def _kd_backward(ctx, grad_loss, _grad_grads):
        _no_double_backward("kd_loss")
        grads = ctx.saved_tensors
        if grad_loss is None:
            return [None] * len(grads), None, None, None, None, None, None, None
        out = []
        for k, g in enumerate(grads):
            gl = grad_loss[k].to(g.dtype)
            gl = gl.reshape(*gl.shape, *([1] * (g.dim() - 2))) if ctx.spatial else gl.unsqueeze(1)
            out.append(g * gl)
        return out, None, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::kd_loss", _kd_backward, setup_context=_kd_setup)

    def _seg_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def _seg_backward(ctx, grad_loss, _grad_grad):
        _no_double_backward("seg_kd_loss")
        (g,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        return g * grad_loss.to(g.dtype), None, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::seg_kd_loss", _seg_backward, setup_context=_seg_setup)
