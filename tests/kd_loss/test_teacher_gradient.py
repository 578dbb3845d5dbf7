"""A teacher that requires grad gets its gradient (online and mutual distillation), computed by
the kernels in the same pass, against the float64 reference (which F.kl_div's gradient is)."""

import pytest
import torch

import segkernels
from helpers import DEVICES, assert_close, requires_kernels
from kd_cases import _labels
from segkernels._library import triton_available
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss

pytestmark = requires_kernels


def _pair(shape, dtype, device, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    students = [(torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_() for _ in range(k)]
    teacher = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_()
    return students, teacher


def _check(fn, ref, students, teacher, weight_seed=None):
    out = fn(students if len(students) > 1 else students[0], teacher)
    s64 = [s.detach().double().requires_grad_() for s in students]
    t64 = teacher.detach().double().requires_grad_()
    expected = ref(s64 if len(students) > 1 else s64[0], t64)
    g = torch.ones_like(expected) if weight_seed is None else torch.rand(
        expected.shape, generator=torch.Generator().manual_seed(weight_seed), dtype=torch.float64)
    got = torch.autograd.grad(out, [*students, teacher], g.to(out.dtype).to(out.device))
    want = torch.autograd.grad(expected, [*s64, t64], g)
    assert_close(out, expected.to(out.dtype))
    for a, b in zip(got, want):
        assert_close(a, b.to(a.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("axis, divergence, reduction", [
    ("channel", "kl", "mean"), ("channel", "ce", "none"), ("spatial", "kl", "none"), ("spatial", "ce", "sum"),
])
def test_teacher_gradient(device, dtype, axis, divergence, reduction):
    shape = (2, 5, 7, 9)
    students, teacher = _pair(shape, dtype, device, k=2)
    labels = _labels(shape, device) if axis == "channel" else None
    kw = dict(temperature=2.0, axis=axis, divergence=divergence, reduction=reduction, labels=labels)
    _check(lambda s, t: segkernels.kd_loss(s, t, **kw), lambda s, t: reference_kd_loss(s, t, **kw), students,
           teacher, weight_seed=None if reduction != "none" else 7)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gradient_on_long_spatial_rows_and_channels_last(device):
    # Spatial rows past the stored length (the online pass), and channels-last maps.
    students, teacher = _pair((1, 2, 40000), torch.float32, device)
    kw = dict(temperature=1.5, axis="spatial")
    _check(lambda s, t: segkernels.kd_loss(s, t, **kw), lambda s, t: reference_kd_loss(s, t, **kw), students, teacher)
    students, teacher = _pair((2, 4, 6, 5), torch.float32, device, k=3)
    cl = [s.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for s in students]
    t_cl = teacher.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _check(lambda s, t: segkernels.kd_loss(s, t, temperature=3.0), lambda s, t: reference_kd_loss(s, t, temperature=3.0),
           cl, t_cl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True])
def test_seg_kd_loss_teacher_gradient(device, weighted):
    shape = (2, 4, 6, 5)
    students, teacher = _pair(shape, torch.float32, device)
    labels = _labels(shape, device)
    w = (torch.rand(4) + 0.5).to(device) if weighted else None
    kw = dict(temperature=2.0, hard_weight=0.7, soft_weight=1.3, class_weight=w)
    _check(lambda s, t: segkernels.seg_kd_loss(s, t, labels, **kw),
           lambda s, t: reference_seg_kd_loss(s, t, labels, **{**kw, "class_weight": None if w is None else w.double()}),
           students, teacher)


def test_mutual_distillation():
    # Deep mutual learning: two networks, each the other's teacher, both trained by the sum.
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
    b = torch.randn(2, 6, 5, 5, generator=g, requires_grad=True)
    loss = segkernels.kd_loss(a, b, temperature=2.0) + segkernels.kd_loss(b, a, temperature=2.0)
    got = torch.autograd.grad(loss, [a, b])
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference_kd_loss(a64, b64, temperature=2.0) + reference_kd_loss(b64, a64, temperature=2.0)
    for x, y in zip(got, torch.autograd.grad(ref, [a64, b64])):
        assert_close(x, y.float())


def test_teacher_gradient_is_computed_only_when_asked_for(monkeypatch):
    # The extra pass is paid only by a teacher that requires grad: the op's teacher_grad argument.
    from segkernels import _library

    asked = []
    call = _library.call_below_autograd

    def spy(op, *args):
        if op is torch.ops.segkernels.kd_loss.default:
            asked.append(args[-2])  # teacher_grad (beta follows it)
        return call(op, *args)

    monkeypatch.setattr(_library, "call_below_autograd", spy)
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4)
    segkernels.kd_loss(s, t).backward()
    segkernels.kd_loss(s, t.requires_grad_()).backward()
    assert asked == [False, True], asked


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("spatial", [False, True])
def test_triton_teacher_gradient_under_interpreter(spatial):
    from segkernels._library import triton_runs_on
    from segkernels.ops.kd_loss.triton import _kd_loss_triton, _seg_kd_loss_triton

    shape = (2, 3, 17, 31) if spatial else (2, 5, 7, 11)
    (s1, s2), t = _pair(shape, torch.float32, "cpu", k=2)
    if not triton_runs_on(t):
        pytest.skip("needs TRITON_INTERPRET=1")
    students, teacher = [s1.detach(), s2.detach()], t.detach()
    labels = None if spatial else _labels(shape, "cpu")
    for kl in (True, False):
        _maps, _grads, tgrads = _kd_loss_triton(students, teacher, labels, 2.0, spatial, 0 if kl else 1, True, 255, True)
        for k, s in enumerate(students):
            t64 = teacher.double().requires_grad_()
            m = reference_kd_loss(s.double(), t64, temperature=2.0, axis="spatial" if spatial else "channel",
                                  labels=labels, divergence="kl" if kl else "ce", reduction="sum")
            (want,) = torch.autograd.grad(m, t64)
            torch.testing.assert_close(tgrads[k], want.float(), rtol=1e-4, atol=1e-5)
    if not spatial:
        _loss, _g, tgrad = _seg_kd_loss_triton(students[0], teacher, labels, None, 2.0, 0.5, 1.5, 255, True)
        t64 = teacher.double().requires_grad_()
        ref = reference_seg_kd_loss(students[0].double(), t64, labels, temperature=2.0, hard_weight=0.5,
                                    soft_weight=1.5)
        (want,) = torch.autograd.grad(ref, t64)
        torch.testing.assert_close(tgrad, want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile_with_the_teacher_gradient(device):
    from helpers import run_opcheck

    students, teacher = _pair((2, 4, 3, 5), torch.float32, device, k=2)
    labels = _labels((2, 4, 3, 5), device)
    run_opcheck(torch.ops.segkernels.kd_loss.default, (students, teacher, labels, 2.0, False, 0, True, 255, True))
    run_opcheck(torch.ops.segkernels.kd_loss.default, (students[:1], teacher, None, 2.0, True, 1, True, 255, True))
    run_opcheck(torch.ops.segkernels.seg_kd_loss.default,
                (students[0], teacher, labels, None, 2.0, 1.0, 0.5, 255, True))
    compiled = torch.compile(lambda s, t: segkernels.kd_loss(s, t, temperature=2.0, labels=labels), fullgraph=True)
    got = torch.autograd.grad(compiled(students[0], teacher), [students[0], teacher])
    want = torch.autograd.grad(segkernels.kd_loss(students[0], teacher, temperature=2.0, labels=labels),
                               [students[0], teacher])
    for a, b in zip(got, want):
        assert_close(a, b)
