"""Shared inputs and checks of the kd_loss tests: random logits and labels, and kd_loss compared
with the float64 eager reference (value and student gradients)."""

import torch

import segkernels
from helpers import assert_close
from segkernels.ops.kd_loss import reference_kd_loss


def _inputs(shape, dtype, device, k=1, scale=3.0):
    students = [(torch.randn(shape, device=device) * scale).to(dtype).requires_grad_() for _ in range(k)]
    teacher = (torch.randn(shape, device=device) * scale).to(dtype)
    return students, teacher


def _labels(shape, device, frac=0.3, classes=None):
    classes = classes or shape[1]
    lab = torch.randint(0, classes, (shape[0], *shape[2:]), device=device)
    lab[torch.rand(lab.shape, device=device) < frac] = 255
    return lab


def _expected(students, teacher, *, grad_seed=None, **kw):
    """Reference value and student gradients in float64, cast to the inputs' dtype."""
    s64 = [s.detach().double().requires_grad_() for s in students]
    out = reference_kd_loss(s64 if len(students) > 1 else s64[0], teacher.double(), **kw)
    g = torch.randn(out.shape, dtype=torch.float64, device=out.device) if grad_seed else torch.ones_like(out)
    grads = torch.autograd.grad(out, s64, g, allow_unused=True)
    grads = [torch.zeros_like(s) if gr is None else gr for gr, s in zip(grads, s64)]
    return out, g, grads


def _check(students, teacher, multi=False, tol=None, **kw):
    """tol: optional ((rtol, atol) of the loss, (rtol, atol) of the gradient)."""
    dtype = teacher.dtype
    ref, g, ref_grads = _expected(students, teacher, grad_seed=kw.get("reduction") == "none", **kw)
    out = segkernels.kd_loss(students if multi else students[0], teacher, **kw)
    if tol is None:
        assert_close(out, ref.to(dtype))
    else:
        torch.testing.assert_close(out, ref.to(dtype), rtol=tol[0][0], atol=tol[0][1])
    grads = torch.autograd.grad(out, students, g.to(out.dtype))
    for gr, rg in zip(grads, ref_grads):
        if tol is None:
            assert_close(gr, rg.to(dtype))
        else:
            torch.testing.assert_close(gr, rg.to(dtype), rtol=tol[1][0], atol=tol[1][1])


def _nan_teacher_case(device):
    shape = (2, 3, 4, 5)
    students, teacher = _inputs(shape, torch.float32, device)
    teacher[0, 1, 2, 3] = float("nan")
    return students[0].detach(), teacher
