"""Registration of the distillation ops: output shapes and layouts (shared with the Triton
launchers), fake kernels, and autograd. The C++ side declares the schemas and the CPU kernels;
the Triton module registers the CUDA kernels."""

from __future__ import annotations

import math
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


def _axis_sum(x: torch.Tensor, spatial: bool) -> torch.Tensor:
    """Sums an input-shaped tensor over the softmax axis: the channels, or every spatial position."""
    return x.flatten(2).sum(2) if spatial else x.sum(1)


def _per_map(v: torch.Tensor, like: torch.Tensor, spatial: bool) -> torch.Tensor:
    """A loss map (N, *spatial) or (N, C) broadcast against an input-shaped tensor."""
    return v.reshape(*v.shape, *([1] * (like.dim() - 2))) if spatial else v.unsqueeze(1)


def formula_grads(students, teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index,
                  teacher_grad, beta=0.5):
    """The kernels' outputs' gradients written as differentiable torch ops: each student's
    gradient of the sum of its loss map, and (teacher_grad) the teacher's, per student. The
    backward uses them when it records a graph (double backward, torch.func's nested
    transforms), where the kernels' saved gradients are constants that would miss the second
    derivative. divergence numbers as the op's (0 kl, 1 ce, 2 reverse_kl, 3 js); the formulas
    are kd_loss.h's: gradient = (1 / T) p (u - sum p u) with u = d D / d p."""
    acc = _acc_dtype(teacher.dtype)
    scale = temperature * temperature if scale_by_t2 else 1.0
    gscale = scale / temperature

    def log_p(x):
        x = x.to(acc)
        flat = x.flatten(2) if spatial else x
        return torch.log_softmax(flat / temperature, dim=2 if spatial else 1).view(x.shape)

    def centred(p, u):  # p (u - sum p u), 0 where p is
        has_p = p != 0
        pu = torch.where(has_p, p * u, 0.0)
        return torch.where(has_p, p * (u - _per_map(_axis_sum(pu, spatial), p, spatial)), 0.0)

    lpt = log_p(teacher)
    pt = lpt.exp()
    has = pt != 0
    valid = None
    if labels is not None and not spatial:
        valid = (labels != ignore_index).unsqueeze(1)
    grads, tgrads = [], []
    for s in students:
        lps = log_p(s)
        ps = lps.exp()
        if divergence in (0, 1):
            g = gscale * (ps - pt)
        elif divergence == 2:
            g = gscale * centred(ps, torch.where(ps != 0, lps - lpt, 0.0))
        else:
            lm = torch.logaddexp(math.log(beta) + lpt, math.log1p(-beta) + lps)
            g = gscale * centred(ps, torch.where(ps != 0, (1 - beta) * (lps - lm), 0.0))
        if teacher_grad:
            if divergence in (0, 1):
                per_unit = torch.where(has, lpt - lps if divergence == 0 else -lps, 0.0)
                total = _axis_sum(pt * per_unit, spatial)
                tg = gscale * torch.where(has, pt * (per_unit - _per_map(total, pt, spatial)), 0.0)
            elif divergence == 2:
                tg = gscale * (pt - ps)
            else:
                tg = gscale * centred(pt, torch.where(has, beta * (lpt - lm), 0.0))
        if valid is not None:
            g = torch.where(valid, g, 0.0)
            if teacher_grad:
                tg = torch.where(valid, tg, 0.0)
        grads.append(g.to(s.dtype))
        if teacher_grad:
            tgrads.append(tg.to(teacher.dtype))
    return grads, tgrads


def _kd_input_grads(ctx, grad_maps, students, teacher, labels, grads, tgrads, teacher_needed):
    """(teacher gradient or None, student gradients) for the incoming gradient of the maps."""
    temperature, spatial, divergence, scale_by_t2, ignore_index, beta = ctx.params
    # A graph of the backward (or a teacher gradient the forward was not asked for): the formula.
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()) or (teacher_needed and not tgrads):
        grads, tgrads = formula_grads(students, teacher, labels, temperature, spatial, divergence, scale_by_t2,
                                      ignore_index, teacher_needed, beta)
    out = [g * _per_map(grad_maps[k].to(g.dtype), g, spatial) for k, g in enumerate(grads)]
    tgrad = None
    if teacher_needed:
        tgrad = sum(tg * _per_map(grad_maps[k].to(tg.dtype), tg, spatial) for k, tg in enumerate(tgrads))
    return tgrad, out


def _seg_formula_grads(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index,
                       teacher_grad):
    """seg_kd_loss's gradients as differentiable torch ops (see formula_grads)."""
    acc = _acc_dtype(teacher.dtype)
    valid = labels != ignore_index
    count = valid.sum()
    soft_coef = torch.where(count > 0, soft_weight / count.clamp_min(1).to(acc), 0.0)
    safe = torch.where(valid, labels, 0)
    w = class_weight.to(acc)[safe] if class_weight is not None else torch.ones_like(safe, dtype=acc)
    w = torch.where(valid, w, 0.0)
    wsum = w.sum()
    hard_coef = torch.where(wsum != 0, hard_weight / torch.where(wsum != 0, wsum, 1.0), 0.0)
    (g,), tgs = formula_grads([student], teacher, labels, temperature, False, 0, True, ignore_index, teacher_grad)
    onehot = torch.nn.functional.one_hot(safe, student.shape[1]).movedim(-1, 1).to(acc)
    hard = torch.softmax(student.to(acc), 1) - onehot
    g = g.to(acc) * soft_coef + (hard_coef * w).unsqueeze(1) * hard
    tg = tgs[0].to(acc) * soft_coef if teacher_grad else None
    return g.to(student.dtype), (tg.to(teacher.dtype) if teacher_grad else None)


if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::kd_loss")
    def _(students, teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index, teacher_grad=False,
          beta=0.5):
        cl = not spatial and all(_is_channels_last(x) for x in list(students) + [teacher])
        loss = teacher.new_empty(_map_sizes(len(students), teacher, spatial), dtype=_acc_dtype(teacher.dtype))
        grads = [_new_grad(s, cl) for s in students]
        tgrads = [_new_grad(teacher, cl) for _ in students] if teacher_grad else []
        return loss, grads, tgrads

    @torch.library.register_fake("segkernels::seg_kd_loss")
    def _(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index,
          teacher_grad=False):
        cl = _is_channels_last(student) and _is_channels_last(teacher)
        tgrad = _new_grad(teacher, cl) if teacher_grad else teacher.new_empty((0,))
        return teacher.new_empty((), dtype=_acc_dtype(teacher.dtype)), _new_grad(student, cl), tgrad

    # kd_loss's autograd: the op itself (torch.compile, opcheck) and KDLossFunction (the public
    # function in eager mode, torch.func, forward-mode AD) share _kd_input_grads. The op's
    # gradient outputs are not differentiable: marked so, or autograd would hand the backward
    # an input-sized tensor of zeros for each of them.
    def _op_setup(ctx, inputs, output):
        students, teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index, *rest = inputs
        _maps, grads, tgrads = output
        beta = rest[1] if len(rest) > 1 else 0.5
        ctx.params = (temperature, spatial, divergence, scale_by_t2, ignore_index, beta)
        ctx.K = len(students)
        ctx.save_for_backward(teacher, labels, *students, *grads, *tgrads)
        ctx.mark_non_differentiable(*grads, *tgrads)
        ctx.set_materialize_grads(False)

    def _op_backward(ctx, grad_maps, _grad_grads, _grad_tgrads):
        # One gradient per argument the call passed: the dispatcher drops trailing arguments equal
        # to their defaults (teacher_grad=False), and torch 2.11 accepts no more gradients than that.
        n = len(ctx.needs_input_grad)
        K = ctx.K
        if grad_maps is None:
            return ([None] * K, None, None, None, None, None, None, None, None, None)[:n]
        teacher, labels, *rest = ctx.saved_tensors
        students, grads, tgrads = rest[:K], rest[K:2 * K], rest[2 * K:]
        tgrad, out = _kd_input_grads(ctx, grad_maps, students, teacher, labels, grads, tgrads,
                                     ctx.needs_input_grad[1])
        return (out, tgrad, None, None, None, None, None, None, None, None)[:n]

    torch.library.register_autograd("segkernels::kd_loss", _op_backward, setup_context=_op_setup)

    class KDLossFunction(torch.autograd.Function):
        """kd_loss with its students as separate arguments (autograd.Function tracks tensors,
        not lists of them), a jvp, and vmap through the op's vmap rule."""

        generate_vmap_rule = True

        @staticmethod
        def forward(teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index, teacher_grad, beta,
                    *students):
            maps, grads, tgrads = _library.call_below_autograd(
                _ops.kd_loss.default, list(students), teacher, labels, temperature, spatial, divergence, scale_by_t2,
                ignore_index, teacher_grad, beta,
            )
            return (maps, *grads, *tgrads)

        @staticmethod
        def setup_context(ctx, inputs, output):
            teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index, _tg, beta, *students = inputs
            K = len(students)
            grads, tgrads = output[1:1 + K], output[1 + K:]
            ctx.params = (temperature, spatial, divergence, scale_by_t2, ignore_index, beta)
            ctx.K = K
            ctx.save_for_backward(teacher, labels, *students, *grads, *tgrads)
            ctx.save_for_forward(*grads, *tgrads)
            ctx.mark_non_differentiable(*grads, *tgrads)
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, grad_maps, *_):
            K = ctx.K
            if grad_maps is None:
                return (None,) * (9 + K)
            teacher, labels, *rest = ctx.saved_tensors
            students, grads, tgrads = rest[:K], rest[K:2 * K], rest[2 * K:]
            tgrad, out = _kd_input_grads(ctx, grad_maps, students, teacher, labels, grads, tgrads,
                                         ctx.needs_input_grad[0])
            return (tgrad, None, None, None, None, None, None, None, None, *out)

        @staticmethod
        def jvp(ctx, t_teacher, _t_labels, _t1, _t2, _t3, _t4, _t5, _t6, _t7, *t_students):
            # The maps are sums over the softmax axis: their tangent is each input's saved
            # gradient times its tangent, summed over that axis.
            K, spatial = ctx.K, ctx.params[1]
            saved = ctx.saved_tensors
            grads, tgrads = saved[:K], saved[K:]
            maps = []
            for k in range(K):
                t = 0
                if t_students[k] is not None:
                    t = t + _axis_sum(grads[k].to(t_students[k].dtype) * t_students[k], spatial)
                if t_teacher is not None:
                    if not tgrads:
                        raise RuntimeError("segkernels.kd_loss: the teacher has a tangent but its gradient was not "
                                           "computed (please report: the public function asks for it)")
                    t = t + _axis_sum(tgrads[k].to(t_teacher.dtype) * t_teacher, spatial)
                maps.append(t if isinstance(t, torch.Tensor) else None)
            if any(m is None for m in maps):
                ref = next(m for m in maps if m is not None)
                maps = [torch.zeros_like(ref) if m is None else m for m in maps]
            return (torch.stack(maps).float() if maps[0].dtype != torch.float64 else torch.stack(maps),
                    *([None] * (len(saved))))

    _library.with_eager_twin(KDLossFunction)

    # seg_kd_loss: the same two paths.
    def _seg_params(ctx, inputs):
        student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index, *_ = inputs
        ctx.params = (temperature, hard_weight, soft_weight, ignore_index)
        return student, teacher, labels, class_weight

    def _seg_setup_common(ctx, inputs, output):
        student, teacher, labels, class_weight = _seg_params(ctx, inputs)
        _loss, grad, tgrad = output
        ctx.save_for_backward(student, teacher, labels, class_weight, grad, tgrad)
        ctx.save_for_forward(grad, tgrad)
        ctx.mark_non_differentiable(grad, tgrad)
        ctx.set_materialize_grads(False)

    def _seg_input_grads(ctx, grad_loss, student_needed, teacher_needed):
        student, teacher, labels, class_weight, grad, tgrad = ctx.saved_tensors
        missing = teacher_needed and tgrad.shape != teacher.shape
        if (torch.is_grad_enabled() and not torch.compiler.is_compiling()) or missing:
            temperature, hard_weight, soft_weight, ignore_index = ctx.params
            grad, tgrad = _seg_formula_grads(student, teacher, labels, class_weight, temperature, hard_weight,
                                             soft_weight, ignore_index, teacher_needed)
        gs = grad * grad_loss.to(grad.dtype) if student_needed else None
        gt = tgrad * grad_loss.to(tgrad.dtype) if teacher_needed else None
        return gs, gt

    def _seg_op_backward(ctx, grad_loss, _g, _tg):
        n = len(ctx.needs_input_grad)  # as kd_loss's: teacher_grad may have been dropped
        if grad_loss is None:
            return (None,) * n
        gs, gt = _seg_input_grads(ctx, grad_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (gs, gt, None, None, None, None, None, None, None)[:n]

    torch.library.register_autograd("segkernels::seg_kd_loss", _seg_op_backward, setup_context=_seg_setup_common)

    class SegKDLossFunction(torch.autograd.Function):
        """seg_kd_loss with a jvp and vmap through the op's vmap rule."""

        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return _library.call_below_autograd(_ops.seg_kd_loss.default, *args)

        setup_context = staticmethod(_seg_setup_common)

        @staticmethod
        def backward(ctx, grad_loss, *_):
            return _seg_op_backward(ctx, grad_loss, None, None)

        @staticmethod
        def jvp(ctx, t_student, t_teacher, *_):
            grad, tgrad = ctx.saved_tensors
            t = None
            if t_student is not None:
                t = (grad.to(torch.float64) * t_student.to(torch.float64)).sum()
            if t_teacher is not None:
                tt = (tgrad.to(torch.float64) * t_teacher.to(torch.float64)).sum()
                t = tt if t is None else t + tt
            acc = _acc_dtype(grad.dtype)
            return (t.to(acc) if t is not None else None), None, None

    _library.with_eager_twin(SegKDLossFunction)

    # vmap. kd_loss returns unreduced maps: the vmapped dim folds into the batch dim N. seg_kd_loss
    # returns one mean per call, so the vmapped samples run one call each.
    @torch.library.register_vmap("segkernels::kd_loss")
    def _(info, in_dims, students, teacher, labels, temperature, spatial, divergence, scale_by_t2, ignore_index,
          teacher_grad=False, beta=0.5):
        s_dims, t_dim, l_dim = in_dims[0], in_dims[1], in_dims[2]
        folded, size = _library.fold_batch(info, [*s_dims, t_dim], [*students, teacher])
        lab = None
        if labels is not None:
            (lab,), _ = _library.fold_batch(info, [l_dim], [labels])
        maps, grads, tgrads = _ops.kd_loss.default(folded[:-1], folded[-1], lab, temperature, spatial, divergence,
                                                   scale_by_t2, ignore_index, teacher_grad, beta)
        maps = maps.reshape(maps.shape[0], size, maps.shape[1] // size, *maps.shape[2:])
        grads = [_library.unfold_batch(g, size) for g in grads]
        tgrads = [_library.unfold_batch(g, size) for g in tgrads]
        return (maps, grads, tgrads), (1, [0] * len(grads), [0] * len(tgrads))

    @torch.library.register_vmap("segkernels::seg_kd_loss")
    def _(info, in_dims, student, teacher, labels, class_weight, *args):
        def sample(x, d, i):
            return x if x is None or d is None else x.select(d, i)

        outs = [
            _ops.seg_kd_loss.default(*(sample(x, d, i) for x, d in zip((student, teacher, labels, class_weight),
                                                                        in_dims[:4])), *args)
            for i in range(info.batch_size)
        ]
        return tuple(torch.stack(list(o)) for o in zip(*outs)), (0, 0, 0)
