"""kd_loss's reverse KL and generalised Jensen-Shannon divergences (issue 20) against the float64
eager formulas: values, student and teacher gradients, both axes, labels, several students,
dtypes, underflow under both distributions, gradcheck and second derivatives, torch.compile,
and the Triton kernels under TRITON_INTERPRET=1 (pytest -m triton). The reference itself is
checked against F.kl_div and the mixture written out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import DEVICES, requires_kernels, to_layout
from kd_cases import _inputs, _labels
from segkernels._library import triton_available, triton_runs_on
from segkernels.ops.kd_loss import reference_kd_loss

pytestmark = requires_kernels
D = torch.float64
DIVS = [("reverse_kl", 0.5), ("js", 0.5), ("js", 0.2)]
IDS = ["reverse_kl", "js", "js-beta0.2"]
# bfloat16: a teacher's gradient from several students is a sum of bfloat16 terms (one per
# student, as for "kl"), which may cancel: an absolute tolerance of their rounding.
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-6), torch.bfloat16: (3e-2, 1e-2)}


def test_reference_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4, generator=g, dtype=D), torch.randn(2, 5, 3, 4, generator=g, dtype=D)
    lps, lpt = F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1)
    rkl = F.kl_div(lpt, lps, reduction="none", log_target=True).sum(1) * 4
    torch.testing.assert_close(reference_kd_loss(s, t, temperature=2.0, divergence="reverse_kl", reduction="none"), rkl)
    for beta in (0.5, 0.3):
        ps, pt = lps.exp(), lpt.exp()
        m = beta * pt + (1 - beta) * ps
        js = (beta * (pt * (pt / m).log()) + (1 - beta) * (ps * (ps / m).log())).sum(1) * 4
        torch.testing.assert_close(
            reference_kd_loss(s, t, temperature=2.0, divergence="js", beta=beta, reduction="none"), js)


def _compare(student_list, teacher, dtype, multi=False, teacher_grad=True, **kw):
    """kd_loss against the reference in float64: value, student and teacher gradients."""
    s64 = [s.detach().to(dtype).double().requires_grad_() for s in student_list]  # the same rounded inputs
    t64 = teacher.detach().to(dtype).double().requires_grad_(teacher_grad)
    ref = reference_kd_loss(s64 if multi else s64[0], t64, **kw)
    g = torch.randn(ref.shape, dtype=D).to(ref.device) if ref.dim() else torch.ones((), dtype=D, device=ref.device)
    ref_grads = torch.autograd.grad(ref, s64 + ([t64] if teacher_grad else []), g)
    ss = [s.detach().to(dtype).requires_grad_() for s in student_list]
    tt = teacher.detach().to(dtype).requires_grad_(teacher_grad)
    out = segkernels.kd_loss(ss if multi else ss[0], tt, **kw)
    grads = torch.autograd.grad(out, ss + ([tt] if teacher_grad else []), g.to(out.dtype))
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), rtol=rtol, atol=atol * 10)
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_channel_axis(div, dtype, device):
    divergence, beta = div
    shape = (2, 7, 5, 6)
    students, teacher = _inputs(shape, torch.float32, device, k=2)
    labels = _labels(shape, device)
    for temperature in (0.5, 4.0):
        kw = dict(temperature=temperature, divergence=divergence, beta=beta)
        _compare(students[:1], teacher, dtype, labels=labels, **kw)
        _compare(students, teacher, dtype, multi=True, reduction="none", **kw)
    _compare(students[:1], teacher, dtype, divergence=divergence, beta=beta, reduction="sum", scale_by_t2=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("div", DIVS, ids=IDS)
def test_spatial_axis_and_layouts(div, device):
    divergence, beta = div
    students, teacher = _inputs((2, 3, 9, 11), torch.float32, device, k=2)
    kw = dict(temperature=3.0, axis="spatial", divergence=divergence, beta=beta)
    _compare(students, teacher, torch.float32, multi=True, **kw)
    _compare(students[:1], teacher, torch.float64, reduction="none", **kw)
    cl = [to_layout(s.detach(), "channels_last") for s in students]
    _compare(cl[:1], to_layout(teacher, "channels_last"), torch.float32, divergence=divergence, beta=beta)
    _compare([students[0][..., 0, 0]], teacher[..., 0, 0], torch.float32, divergence=divergence, beta=beta)  # rows


def test_long_spatial_rows():
    # Rows longer than the kernels' chunk (2048): the totals are summed chunk by chunk.
    students, teacher = _inputs((1, 2, 60, 80), torch.float32, "cpu")
    for divergence in ("reverse_kl", "js"):
        _compare(students, teacher, torch.float32, axis="spatial", temperature=2.0, divergence=divergence)


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
def test_underflow_under_both_distributions_stays_finite(divergence):
    # Class 0 far below the rest under both: its probability underflows to 0 in float32 (and
    # log M to a large negative number, never -inf - -inf). Liger's JSD returned NaN here.
    s = torch.randn(2, 5, 4, 4) * 2
    t = torch.randn(2, 5, 4, 4) * 2
    s[:, 0] = -300.0
    t[:, 0] = -320.0
    _compare([s], t, torch.float32, temperature=1.0, divergence=divergence)
    _compare([s], t, torch.bfloat16, temperature=0.5, divergence=divergence)
    s[:, 1] = -float("inf")  # an impossible class under the student: still finite (JS), +inf-free grads
    if divergence == "js":
        out = segkernels.kd_loss(s.requires_grad_(), t, divergence="js")
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.isfinite(g).all()


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
def test_gradcheck_and_second_derivatives(divergence):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, 4, 2, 3, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(1, 4, 2, 3, generator=g, dtype=D, requires_grad=True)
    for axis in ("channel", "spatial"):
        fn = lambda a, b: segkernels.kd_loss(a, b, temperature=2.0, axis=axis, divergence=divergence, beta=0.3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s, t))
        assert torch.autograd.gradgradcheck(fn, (s, t))
    ref = lambda a: reference_kd_loss(a, t.detach(), temperature=2.0, divergence=divergence, beta=0.3)  # noqa: E731
    ours = lambda a: segkernels.kd_loss(a, t.detach(), temperature=2.0, divergence=divergence, beta=0.3)  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(ours)(s.detach()), torch.func.hessian(ref)(s.detach()))
    a, b = torch.func.jvp(ours, (s.detach(),), (torch.ones_like(s),))
    c, d = torch.func.jvp(ref, (s.detach(),), (torch.ones_like(s),))
    torch.testing.assert_close((a, b), (c, d))


def test_torch_compile():
    students, teacher = _inputs((2, 5, 4, 6), torch.float32, "cpu")
    s = students[0].detach().requires_grad_()

    def f(x):
        return segkernels.kd_loss(x, teacher, temperature=2.0, divergence="js", beta=0.4)

    compiled = torch.compile(f, fullgraph=True)
    a, b = compiled(s), f(s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0])


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("div", DIVS, ids=IDS)
def test_triton_kernels(div, spatial):
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    divergence, beta = div
    shape = (2, 3, 17, 31) if spatial else (2, 5, 7, 11)
    students, teacher = _inputs(shape, torch.float32, "cpu", k=2)
    if not triton_runs_on(teacher):
        pytest.skip("needs TRITON_INTERPRET=1")
    teacher[:, 0] = -300.0  # underflow under both on one class
    students = [s.detach() for s in students]
    for s in students:
        s[:, 0] = -280.0
    labels = None if spatial else _labels(shape, "cpu")
    code = 2 if divergence == "reverse_kl" else 3
    maps, grads, tgrads = _kd_loss_triton(students, teacher, labels, 2.0, spatial, code, True, 255, True, beta)
    axis = "spatial" if spatial else "channel"
    for k, s in enumerate(students):
        s64, t64 = s.double().requires_grad_(), teacher.double().requires_grad_()
        ref = reference_kd_loss(s64, t64, temperature=2.0, axis=axis, labels=labels, divergence=divergence, beta=beta,
                                reduction="none")
        gs, gt = torch.autograd.grad(ref.sum(), (s64, t64))
        torch.testing.assert_close(maps[k].double(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads[k].double(), gs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tgrads[k].double(), gt, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", ["ce", "reverse_kl", "js"])
@pytest.mark.parametrize("shape", [(2, 5, 4, 6), (7, 5)], ids=str)
def test_seg_kd_loss_soft_part_divergences(divergence, shape):
    from segkernels.ops.kd_loss import reference_seg_kd_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(shape, generator=g, dtype=D, requires_grad=True)
    labels = torch.randint(0, 5, (shape[0], *shape[2:]), generator=g)
    labels.view(-1)[:3] = 255
    w = torch.rand(5, generator=g, dtype=D) + 0.5
    kw = dict(temperature=2.0, class_weight=w, divergence=divergence, beta=0.3, hard_weight=0.8, soft_weight=0.7)
    ours, ref = segkernels.seg_kd_loss(s, t, labels, **kw), reference_seg_kd_loss(s, t, labels, **kw)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (s, t)), torch.autograd.grad(ref, (s, t))):
        torch.testing.assert_close(a, b)
    labels[:] = 255  # no labelled position: both parts 0
    assert segkernels.seg_kd_loss(s, t, labels, **kw).item() == 0.0
    labels[0] = 9
    with pytest.raises(IndexError, match="labels"):
        segkernels.seg_kd_loss(s, t, labels, **kw)


def test_modules_take_divergence_and_beta():
    students, teacher = _inputs((2, 5, 4, 6), torch.float32, "cpu")
    s = students[0]
    m = segkernels.nn.KDLoss(2.0, divergence="js", beta=0.3)
    torch.testing.assert_close(m(s, teacher), segkernels.kd_loss(s, teacher, temperature=2.0, divergence="js",
                                                                  beta=0.3))
    assert "beta=0.3" in repr(m)
    c = segkernels.nn.ChannelWiseKDLoss(4.0, divergence="reverse_kl")
    torch.testing.assert_close(c(s, teacher), segkernels.kd_loss(s, teacher, temperature=4.0, axis="spatial",
                                                                  divergence="reverse_kl"))
    with pytest.raises(ValueError, match="beta"):
        segkernels.nn.KDLoss(divergence="js", beta=1.5)
    with pytest.raises(ValueError, match="divergence"):
        segkernels.nn.ChannelWiseKDLoss(divergence="jsd")
