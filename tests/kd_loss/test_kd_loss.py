"""kd_loss / seg_kd_loss / distillation modules against the eager references (computed in float64
from the same inputs), gradcheck, opcheck, torch.compile, layouts, stability and errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import (
    DEVICES,
    FLOAT_DTYPES,
    assert_close,
    compile_launches_for_sm90,
    gradcheck,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
    to_layout,
)
from segkernels._library import triton_available
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss

pytestmark = requires_kernels

SHAPES = [(2, 5, 7, 9), (3, 4), (2, 3, 11), (2, 4, 3, 5, 2)]  # 2-D, no, 1-D, 3-D spatial dims


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, axis, reduction, shape):
    students, teacher = _inputs(shape, dtype, device)
    _check(students, teacher, temperature=2.0, axis=axis, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_rows_without_spatial_dims(device, layout):
    # (N, C) logits run as one (1, C, N, 1) map; the labels, several students, seg_kd_loss and
    # a non-contiguous (N, C) view must all come through that unchanged.
    n, c = 301, 7

    def logits():
        x = torch.randn(n, c, device=device) * 3
        return x if layout == "contiguous" else torch.randn(c, n, device=device).t() * 3

    students = [logits().requires_grad_() for _ in range(2)]
    teacher = logits()
    labels = torch.randint(0, c, (n,), device=device)
    labels[::5] = 255
    for reduction in ("mean", "sum", "none"):
        _check(students, teacher, multi=True, temperature=2.0, labels=labels, reduction=reduction)
    s = students[0]
    got = segkernels.seg_kd_loss(s, teacher, labels, temperature=2.0)
    (g,) = torch.autograd.grad(got, s)
    s64 = s.detach().double().requires_grad_()
    ref = reference_seg_kd_loss(s64, teacher.double(), labels, temperature=2.0)
    (rg,) = torch.autograd.grad(ref, s64)
    assert_close(got, ref.float())
    assert_close(g, rg.float())
    assert g.shape == (n, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_ignore_mask_and_divergence(device, dtype, reduction, divergence):
    shape = (3, 6, 13, 10)
    students, teacher = _inputs(shape, dtype, device)
    labels = _labels(shape, device)
    _check(students, teacher, temperature=0.5, labels=labels, reduction=reduction, divergence=divergence)
    out = segkernels.kd_loss(students[0], teacher, labels=labels, reduction="none", divergence=divergence)
    assert (out[labels == 255] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), students)
    assert (grad.permute(0, 2, 3, 1)[labels == 255] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_several_students(device, axis, k, reduction):
    shape = (2, 7, 9, 6)
    students, teacher = _inputs(shape, torch.float32, device, k=k)
    labels = _labels(shape, device) if axis == "channel" else None
    _check(students, teacher, multi=True, temperature=3.0, axis=axis, labels=labels, reduction=reduction)
    out = segkernels.kd_loss(students, teacher, axis=axis, labels=labels, reduction=reduction)
    assert out.shape[0] == k
    for i, s in enumerate(students):
        single = segkernels.kd_loss(s, teacher, axis=axis, labels=labels, reduction=reduction)
        assert_close(out[i], single)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided", "mixed"])
@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_layouts(device, layout, axis):
    shape = (2, 5, 6, 7)
    students, teacher = _inputs(shape, torch.float32, device, k=2)
    if layout == "mixed":
        s_lay, t_lay = "channels_last", "contiguous"
    else:
        s_lay = t_lay = layout
    students = [to_layout(s.detach(), s_lay).requires_grad_() for s in students]
    teacher = to_layout(teacher, t_lay)
    labels = _labels(shape, device) if axis == "channel" else None
    _check(students, teacher, multi=True, axis=axis, labels=labels, temperature=1.5)
    _check(students[:1], teacher, axis=axis, labels=labels, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_empty_batch(device, axis):
    students, teacher = _inputs((0, 4, 3, 5), torch.float32, device)
    labels = torch.empty(0, 3, 5, dtype=torch.long, device=device) if axis == "channel" else None
    out = segkernels.kd_loss(students[0], teacher, axis=axis, labels=labels)
    assert out.shape == () and out.item() == 0
    out.backward()
    assert students[0].grad.shape == students[0].shape
    none = segkernels.kd_loss(students[0], teacher, axis=axis, reduction="none")
    assert none.shape == ((0, 3, 5) if axis == "channel" else (0, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fully_ignored_gives_zero_and_zero_gradient(device, dtype):
    students, teacher = _inputs((2, 5, 4, 6), dtype, device)
    labels = torch.full((2, 4, 6), 255, device=device)
    out = segkernels.kd_loss(students[0], teacher, labels=labels, temperature=2.0)
    assert out.item() == 0 and not torch.isnan(out)
    out.backward()
    assert (students[0].grad == 0).all()
    # One image fully ignored, the other not: its positions alone count.
    labels[1] = 1
    _check(students, teacher, labels=labels, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits_and_temperatures(device, axis, temperature, dtype):
    shape = (2, 6, 5, 7)
    students, teacher = _inputs(shape, dtype, device, scale=1e4)
    # float32 resolves log-probabilities of magnitude |logit| / T to about 1e-7 of that, and the
    # loss is then scaled by T^2: the tolerances follow those magnitudes.
    t2 = temperature**2
    loss_atol = 2e-7 * t2 * 1e4 / temperature * 10
    if dtype == torch.float32:
        tol = ((1e-4, loss_atol), (1e-4, 2e-6 * temperature))
    else:  # the float32 arithmetic error, then bfloat16 rounding of the result
        tol = ((1.6e-2, max(loss_atol, 1e-2)), (1.6e-2, 1e-2))
    _check(students, teacher, temperature=temperature, axis=axis, tol=tol)
    _check(students, teacher, temperature=temperature, axis=axis, reduction="none", tol=tol)
    # identical student and teacher: KL is 0 (no cancellation error at this magnitude)
    same = segkernels.kd_loss(teacher.clone().requires_grad_(), teacher, temperature=temperature, axis=axis)
    assert abs(same.item()) < 1e-3


def _check_finite_and_close(s, t, **kw):
    """kd_loss and its gradient finite and within 1e-5 (relative) of the float64 reference; the
    gradient's tolerance scales with its largest entry (of order 1 / T at extreme temperatures)."""
    got = segkernels.kd_loss(s, t, **kw)
    ref_s = s.detach().double().requires_grad_()
    ref = reference_kd_loss(ref_s, t.double(), **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), s)
    ref.sum().backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad.double(), ref_s.grad, rtol=1e-5, atol=1e-5 * float(ref_s.grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1e-10), (torch.float64, 1e-20)], ids=str)
def test_extreme_temperatures_keep_the_maximum_at_zero(device, axis, dtype, temperature):
    # |logit| / T far past 2**24 (2**53): each log-probability must subtract the maximum of the
    # very values it is computed from. A fused multiply-add in one place and a rounded product in
    # the other left a positive residual at the maximum: exp overflowed to inf, the loss read
    # -inf or NaN (the CPU kernels' AVX2 build).
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    for reduction in ("sum", "none"):
        _check_finite_and_close(s, t, temperature=temperature, axis=axis, reduction=reduction, scale_by_t2=False)
    if axis == "channel":
        labels = torch.randint(0, 5, (2, 4, 6), generator=g).to(device)
        got = segkernels.seg_kd_loss(s, t, labels, temperature=temperature)
        ref = reference_seg_kd_loss(s.detach().double(), t.double(), labels, temperature=temperature)
        assert torch.isfinite(got) and abs(float(got.detach()) - float(ref)) <= 1e-5 * abs(float(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1e-10), (torch.float64, 1e-20)], ids=str)
def test_extreme_temperatures_on_rows_past_the_stored_length(device, dtype, temperature):
    # Rows longer than the CPU's stored-row limit (32768) take the online softmax, whose running
    # maximum rises from chunk to chunk and rescales the sum by exp((m_old - m_new) / T): at
    # this temperature that factor is 0, and the maximum's own term must still be exactly 1.
    g = torch.Generator().manual_seed(11)
    shape = (1, 2, 32942)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    t[0, 1] = torch.linspace(-1, 1, shape[-1], dtype=torch.float64)  # a new maximum in every chunk
    s = s.to(device=device, dtype=dtype).requires_grad_()
    t = t.to(device=device, dtype=dtype)
    _check_finite_and_close(s, t, temperature=temperature, axis="spatial", reduction="none", scale_by_t2=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("length", [5, 40000], ids=["short", "past-the-stored-length"])
def test_rows_spanning_more_than_the_float_range(device, dtype, length):
    # Logits near -max and +max in one row: x - max overflows to -inf, (x - max) / T need not.
    # Subtracting first (0d777c0) turned such losses into inf, and seg_kd_loss with
    # soft_weight=0 into NaN (0 * inf), where the reference stays finite.
    big = 0.9 * torch.finfo(dtype).max
    s = torch.zeros(1, 2, length, dtype=torch.float64)
    t = torch.zeros(1, 2, length, dtype=torch.float64)
    s[0, :, 0], s[0, :, 1] = big, -big
    t[0, :, 1] = 5.0
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    for temperature in (4.0, 1e30):
        # (The channel axis over 40000 classes would test float32 summation instead.)
        cases = [("spatial", s, t)] + ([("channel", s.transpose(1, 2), t.transpose(1, 2))] if length < 100 else [])
        for axis, x, y in cases:
            got = segkernels.kd_loss(x, y, temperature=temperature, axis=axis, reduction="none", scale_by_t2=False)
            ref = reference_kd_loss(x.double(), y.double(), temperature=temperature, axis=axis, reduction="none",
                                    scale_by_t2=False)
            assert torch.isfinite(got).all(), (axis, temperature, got)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        return  # the float64 reference itself overflows in seg_kd_loss's T^2 soft term
    x, y = s[:, :, :3].transpose(1, 2).contiguous(), t[:, :, :3].transpose(1, 2).contiguous()  # (1, 3, 2): 3 classes
    labels = torch.tensor([[2, 2]], device=device)  # a cross-entropy of big: finite
    got = segkernels.seg_kd_loss(x, y, labels, temperature=4.0, soft_weight=0.0)
    ref = reference_seg_kd_loss(x.double(), y.double(), labels, temperature=4.0, soft_weight=0.0)
    assert not torch.isnan(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    # With the T^2 soft term the true total (about 5 big) is past the float32 range: inf, as a
    # float32 sum gives, where the CPU kernel's double total once made fill_ raise.
    got = segkernels.seg_kd_loss(x, y, labels, temperature=4.0)
    assert float(reference_seg_kd_loss(x.double(), y.double(), labels, temperature=4.0)) > torch.finfo(dtype).max
    assert got == float("inf")
    # A label on the -big class: its cross-entropy (1.8 big) passes the range, the mean of it
    # and of an ordinary position does not.
    x2 = torch.cat([x, torch.randn(1, 3, 1, dtype=dtype, device=device)], 2)
    y2 = torch.cat([y, torch.randn(1, 3, 1, dtype=dtype, device=device)], 2)
    labels = torch.tensor([[1, 1, 0]], device=device)
    got = segkernels.seg_kd_loss(x2, y2, labels, temperature=4.0, hard_weight=0.25, soft_weight=0.0)
    ref = reference_seg_kd_loss(x2.double(), y2.double(), labels, temperature=4.0, hard_weight=0.25, soft_weight=0.0)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_temperatures_past_the_arithmetic_range_are_refused(device):
    # 1 / T or T^2 past float32 made the maximum's own term 0 * inf: a NaN loss without a word.
    s = torch.randn(2, 3, 4, device=device)
    t = torch.randn(2, 3, 4, device=device)
    labels = torch.zeros(2, 4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="1 / T overflows"):
        segkernels.kd_loss(s, t, temperature=1e-39)
    with pytest.raises(ValueError, match=r"T\^2 .* overflows .* scale_by_t2=False"):
        segkernels.kd_loss(s.bfloat16(), t.bfloat16(), temperature=1e20)
    with pytest.raises(ValueError, match="temperature=1e\\+20"):
        segkernels.seg_kd_loss(s, t, labels, temperature=1e20)
    assert torch.isfinite(segkernels.kd_loss(s, t, temperature=1e20, scale_by_t2=False))
    assert torch.isfinite(segkernels.kd_loss(s, t, temperature=1e-37))
    assert torch.isfinite(segkernels.kd_loss(s.double(), t.double(), temperature=1e20))
    assert torch.isfinite(segkernels.seg_kd_loss(s.double(), t.double(), labels, temperature=1e-39))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e4, 1e15, 1e30])
def test_one_class_kl_is_exactly_zero_at_any_temperature(device, temperature):
    # One class: both softmaxes are exactly 1, so KL is 0, even after the T^2 scale.
    s = torch.tensor([[0.3], [1.7]], dtype=torch.float64, device=device)
    t = torch.tensor([[-0.5], [2.0]], dtype=torch.float64, device=device)
    got = segkernels.kd_loss(s, t, temperature=temperature, reduction="none")
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64, device=device)), got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_minus_inf_logits(device, axis, divergence):
    shape = (2, 5, 4, 6)
    students, teacher = _inputs(shape, torch.float32, device)
    masked = torch.rand(shape, device=device) < 0.3
    masked[:, 0] = False  # every distribution keeps some mass
    masked.view(2, 5, -1)[:, :, 0] = False
    teacher = teacher.masked_fill(masked, float("-inf"))
    s = students[0].detach().masked_fill(masked, float("-inf")).requires_grad_()
    out = segkernels.kd_loss(s, teacher, axis=axis, divergence=divergence, reduction="none")
    assert torch.isfinite(out).all()
    _check([s], teacher, axis=axis, divergence=divergence, reduction="none")
    (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(g).all()
    # teacher mass where the student has -inf: infinite KL, still a finite gradient, no NaN
    s2 = students[0].detach().clone()
    s2[:, 1, 0] = float("-inf")
    s2.requires_grad_()
    t2 = torch.randn(shape, device=device)
    out2 = segkernels.kd_loss(s2, t2, axis=axis, divergence=divergence, reduction="none")
    assert not torch.isnan(out2).any() and torch.isinf(out2).any()
    (g2,) = torch.autograd.grad(out2.sum(), s2)
    assert torch.isfinite(g2).all()


def _nan_teacher_case(device):
    shape = (2, 3, 4, 5)
    students, teacher = _inputs(shape, torch.float32, device)
    teacher[0, 1, 2, 3] = float("nan")
    return students[0].detach(), teacher


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_nan_teacher_gives_nan_where_it_reaches(device, axis):
    # It once read as pt == 0 and gave a loss of 0 (with a NaN gradient): F.kl_div gives NaN.
    s, teacher = _nan_teacher_case(device)
    out = segkernels.kd_loss(s, teacher, axis=axis, reduction="none")
    ref = reference_kd_loss(s, teacher, axis=axis, reduction="none")
    expected = torch.zeros_like(out, dtype=torch.bool)
    if axis == "channel":
        expected[0, 2, 3] = True  # the one position
    else:
        expected[0, 1] = True  # the one (n, c) row
    assert torch.equal(out.isnan(), expected) and torch.equal(ref.isnan(), expected)
    assert torch.isnan(segkernels.kd_loss(s, teacher, axis=axis))


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("spatial", [False, True])
def test_triton_nan_teacher_under_interpreter(spatial):
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    s, teacher = _nan_teacher_case("cpu")
    _triton_or_skip(teacher)
    loss, _ = _kd_loss_triton([s], teacher, None, 1.0, spatial, True, True, 255)
    assert loss.isnan().sum() == 1


@pytest.mark.parametrize("axis", ["channel", "spatial"])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (3, 5), (1, 3, 2, 2, 3)], ids=str)
def test_gradcheck(axis, shape):
    s = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    t = torch.randn(shape, dtype=torch.float64)
    labels = _labels(shape, "cpu") if axis == "channel" else None
    gradcheck(lambda a: segkernels.kd_loss(a, t, temperature=1.7, axis=axis, labels=labels, reduction="none"), (s,))
    gradcheck(lambda a, b: segkernels.kd_loss([a, b], t, axis=axis, labels=labels, divergence="ce"), (s, s2))
    if axis == "channel":
        lab = _labels(shape, "cpu", frac=0.2)
        w = torch.rand(shape[1], dtype=torch.float64) + 0.5
        gradcheck(lambda a: segkernels.seg_kd_loss(a, t, lab, temperature=2.0, class_weight=w, hard_weight=0.7), (s,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    shape = (2, 4, 3, 5)
    (s1, s2), t = _inputs(shape, torch.float32, device, k=2)
    labels = _labels(shape, device)
    op = torch.ops.segkernels.kd_loss.default
    run_opcheck(op, ([s1, s2], t, labels, 2.0, False, True, True, 255))
    run_opcheck(op, ([s1], t, None, 0.5, True, False, False, 255))
    cl = [to_layout(s1.detach(), "channels_last").requires_grad_()]
    run_opcheck(op, (cl, to_layout(t, "channels_last"), None, 1.0, False, True, True, 255))
    w = torch.rand(4, device=device)
    run_opcheck(torch.ops.segkernels.seg_kd_loss.default, (s1, t, labels, w, 2.0, 1.0, 0.5, 255))
    run_opcheck(torch.ops.segkernels.seg_kd_loss.default, (s1, t, labels, None, 1.0, 1.0, 1.0, 255))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    shape = (2, 5, 6, 4)
    (s1, s2), t = _inputs(shape, torch.float32, device, k=2)
    labels = _labels(shape, device)

    def fn(a, b, tt, lab):
        x = segkernels.kd_loss(a * 1.0, tt, temperature=2.0, labels=lab)
        y = segkernels.kd_loss([a, b], tt, axis="spatial").sum()
        z = segkernels.seg_kd_loss(b, tt, lab, temperature=3.0)
        return x + y + z

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(s1, s2, t, labels)
    ga = torch.autograd.grad(out, [s1, s2])
    ref = fn(s1, s2, t, labels)
    gr = torch.autograd.grad(ref, [s1, s2])
    assert_close(out, ref)
    for a, b in zip(ga, gr):
        assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 9, 7), (5, 3), (2, 4, 3, 2, 3)], ids=str)
def test_seg_kd_loss(device, dtype, weighted, shape):
    students, teacher = _inputs(shape, dtype, device)
    s = students[0]
    labels = _labels(shape, device)
    labels.view(-1)[0] = 0  # at least one valid position
    w = (torch.rand(shape[1], device=device) + 0.5).to(dtype) if weighted else None
    kw = dict(temperature=2.5, hard_weight=0.6, soft_weight=1.3, class_weight=w)
    s64 = s.detach().double().requires_grad_()
    w64 = w.double() if weighted else None
    ref = reference_seg_kd_loss(s64, teacher.double(), labels, **{**kw, "class_weight": w64})
    (rg,) = torch.autograd.grad(ref, s64)
    out = segkernels.seg_kd_loss(s, teacher, labels, **kw)
    assert_close(out, ref.to(dtype))
    (g,) = torch.autograd.grad(out * 2.0, s)
    assert_close(g, (2 * rg).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 19, 37, 41), (1, 300, 13, 11)], ids=str)
def test_maps_longer_than_one_tile(device, layout, shape):
    """The CPU channel kernel works on tiles of up to 512 positions (fewer for many classes);
    these maps span several tiles and end in a partial one."""
    students, teacher = _inputs(shape, torch.float32, device, k=2)
    students = [to_layout(s.detach(), layout).requires_grad_() for s in students]
    teacher = to_layout(teacher, layout)
    labels = _labels(shape, device)
    _check(students, teacher, multi=True, temperature=3.0, labels=labels, reduction="none")
    for temperature in (1.0, 3.0):  # at T = 1 the hard part reuses the soft part's softmax
        kw = dict(temperature=temperature, hard_weight=0.7, soft_weight=1.1)
        s64 = students[0].detach().double().requires_grad_()
        ref = reference_seg_kd_loss(s64, teacher.double(), labels, **kw)
        (rg,) = torch.autograd.grad(ref, s64)
        out = segkernels.seg_kd_loss(students[0], teacher, labels, **kw)
        assert_close(out, ref.float())
        (g,) = torch.autograd.grad(out, students[0])
        assert_close(g, rg.float())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 181, 182), (1, 2, 32768)], ids=str)
def test_spatial_rows_online_and_stored(device, shape):
    """axis="spatial" on the CPU keeps the exponentials of rows up to 32768 elements and runs
    the online softmax over longer rows (here 32942); both against the reference."""
    students, teacher = _inputs(shape, torch.float32, device, k=2, scale=4.0)
    _check(students, teacher, multi=True, temperature=2.0, axis="spatial", reduction="none")
    _check(students, teacher, multi=True, temperature=0.5, axis="spatial", divergence="ce")


@pytest.mark.parametrize("device", DEVICES)
def test_seg_kd_loss_fully_ignored_and_channels_last(device):
    students, teacher = _inputs((2, 5, 4, 6), torch.float32, device)
    s = students[0]
    labels = torch.full((2, 4, 6), 255, device=device)
    out = segkernels.seg_kd_loss(s, teacher, labels)
    assert out.item() == 0
    (g,) = torch.autograd.grad(out, s)
    assert (g == 0).all()
    labels = _labels((2, 5, 4, 6), device)
    scl = to_layout(s.detach(), "channels_last").requires_grad_()
    tcl = to_layout(teacher, "channels_last")
    out = segkernels.seg_kd_loss(scl, tcl, labels, temperature=4.0)
    ref = reference_seg_kd_loss(s.detach().double(), teacher.double(), labels, temperature=4.0)
    assert_close(out, ref.float())


def test_seg_kd_loss_bad_label_raises():
    students, teacher = _inputs((2, 5, 4, 6), torch.float32, "cpu")
    labels = _labels((2, 5, 4, 6), "cpu")
    labels[0, 0, 0] = 5
    with pytest.raises(IndexError, match="label 5") as caught:
        segkernels.seg_kd_loss(students[0], teacher, labels)
    assert isinstance(caught.value, RuntimeError)

    # The reference path (float64 on CUDA, or no compiled kernels) raises the same class.
    import segkernels.ops.kd_loss as api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "_use_kernels", lambda op, teacher: False)
        with pytest.raises(IndexError, match="labels") as caught:
            segkernels.seg_kd_loss(students[0], teacher, labels)
    assert isinstance(caught.value, RuntimeError)


def test_numpy_scalars_are_taken():
    s, t = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    lab = torch.randint(0, 3, (2, 4, 5))
    lab[0, 0, 0] = 7
    expected = segkernels.kd_loss(s, t, temperature=2.0, labels=lab, ignore_index=7)
    got = segkernels.kd_loss(s, t, temperature=np.float32(2.0), labels=lab, ignore_index=np.int64(7))
    assert_close(got, expected)
    expected = segkernels.seg_kd_loss(s, t, lab, ignore_index=7)
    assert_close(segkernels.seg_kd_loss(s, t, lab, ignore_index=np.int32(7)), expected)


def test_argument_errors():
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    lab = torch.zeros(2, 4, 5, dtype=torch.long)
    cases = [
        (TypeError, "student\\[0\\] must be a torch.Tensor", lambda: segkernels.kd_loss([1], t)),
        (TypeError, "student must be a torch.Tensor", lambda: segkernels.kd_loss(1, t)),
        (ValueError, "non-empty list", lambda: segkernels.kd_loss([], t)),
        (ValueError, "ignore_index must fit in int64", lambda: segkernels.kd_loss(s, t, ignore_index=2**63)),
        (ValueError, "ignore_index must fit", lambda: segkernels.seg_kd_loss(s, t, lab, ignore_index=-(2**64))),
        (TypeError, "ignore_index must be an int", lambda: segkernels.kd_loss(s, t, labels=lab, ignore_index=1.5)),
        (TypeError, "teacher must be a floating tensor", lambda: segkernels.kd_loss(s, t.long())),
        (TypeError, "must have the same dtype", lambda: segkernels.kd_loss(s, t.double())),
        (ValueError, "same shape", lambda: segkernels.kd_loss(s, t[:, :2])),
        (ValueError, "teacher must be \\(N, C", lambda: segkernels.kd_loss(s[0, 0, 0], t[0, 0, 0])),
        (ValueError, "0 to 3 spatial", lambda: segkernels.kd_loss(s.view(2, 3, 2, 2, 5, 1), t.view(2, 3, 2, 2, 5, 1))),
        (ValueError, "temperature must be positive", lambda: segkernels.kd_loss(s, t, temperature=0.0)),
        (ValueError, "temperature must be positive", lambda: segkernels.kd_loss(s, t, temperature=math.inf)),
        (TypeError, "temperature", lambda: segkernels.kd_loss(s, t, temperature="2")),
        (ValueError, "axis must be", lambda: segkernels.kd_loss(s, t, axis="pixel")),
        (ValueError, "divergence must be", lambda: segkernels.kd_loss(s, t, divergence="js")),
        (ValueError, "reduction must be", lambda: segkernels.kd_loss(s, t, reduction="batchmean")),
        (ValueError, "only supported with axis='channel'",
         lambda: segkernels.kd_loss(s, t, axis="spatial", labels=lab)),
        (ValueError, "labels must be \\(N, \\*spatial\\)", lambda: segkernels.kd_loss(s, t, labels=lab[:, :2])),
        (TypeError, "labels must be an integer", lambda: segkernels.kd_loss(s, t, labels=lab.float())),
        (TypeError, "ignore_index must be an int", lambda: segkernels.kd_loss(s, t, labels=lab, ignore_index=2.5)),
        (TypeError, "scale_by_t2 must be a bool", lambda: segkernels.kd_loss(s, t, scale_by_t2=1)),
        (ValueError, "class_weight must be \\(C,\\)",
         lambda: segkernels.seg_kd_loss(s, t, lab, class_weight=torch.ones(4))),
        (TypeError, "class_weight must be a floating",
         lambda: segkernels.seg_kd_loss(s, t, lab, class_weight=torch.ones(3, dtype=torch.long))),
        (ValueError, "hard_weight must be finite", lambda: segkernels.seg_kd_loss(s, t, lab, hard_weight=math.nan)),
        (TypeError, "soft_weight must be a real number", lambda: segkernels.seg_kd_loss(s, t, lab, soft_weight="1")),
        (ValueError, "labels must be \\(N, \\*spatial\\)", lambda: segkernels.seg_kd_loss(s, t, lab[0])),
    ]
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match) as caught:
            fn()
        # The error policy: catchable as RuntimeError too, as PyTorch's own errors are.
        assert isinstance(caught.value, RuntimeError), caught.value


def test_double_backward_raises():
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    lab = torch.zeros(2, 4, dtype=torch.long)
    for loss in (segkernels.kd_loss(s, t), segkernels.seg_kd_loss(s, t, lab)):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, s, create_graph=True)


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    segkernels.kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------------------------
# Modules


def test_modules():
    students, teacher = _inputs((2, 5, 6, 4), torch.float32, "cpu")
    labels = _labels((2, 5, 6, 4), "cpu")
    m = segkernels.nn.KDLoss(temperature=2.0)
    expected = segkernels.kd_loss(students[0], teacher, temperature=2.0, labels=labels)
    assert_close(m(students[0], teacher, labels), expected)
    c = segkernels.nn.ChannelWiseKDLoss(temperature=4.0)
    assert_close(c(students[0], teacher), segkernels.kd_loss(students[0], teacher, temperature=4.0, axis="spatial"))


def _sr_transcription(maps, pres, labels, c, weights, sr_f, temperature, ii):
    """The Self-Regulation formulas written out directly, term by term."""
    n = labels.shape[0]
    target = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        for k in labels[i].unique().tolist():
            if k != ii:
                target[i, k] = 1.0
    mea_seg = sum(F.cross_entropy(m, labels, ignore_index=ii) for m in maps)
    mea_cls = sum(F.binary_cross_entropy_with_logits(p, target) for p in pres)
    valid = labels != ii
    if sr_f == "hard":
        pseudo = maps[-1].detach().argmax(1)
        sr_f_val = 0
        for m in maps[:-1]:
            ce = -F.log_softmax(m, 1).gather(1, pseudo.unsqueeze(1)).squeeze(1)
            sr_f_val = sr_f_val + ce[valid].mean()
    else:
        pt = F.softmax(maps[-1].detach() / temperature, 1)
        sr_f_val = 0
        for m in maps[:-1]:
            ce = -(pt * F.log_softmax(m / temperature, 1)).sum(1) * temperature**2
            sr_f_val = sr_f_val + ce[valid].sum() / valid.sum()
    deep = torch.sigmoid(pres[0].detach())
    sr_l = sum(-(deep * F.logsigmoid(p) + (1 - deep) * F.logsigmoid(-p)).mean() for p in pres[1:])
    w = weights
    return w[0] * mea_cls + w[1] * mea_seg + w[2] * sr_l + w[3] * sr_f_val


@pytest.mark.parametrize("sr_f", ["hard", "soft"])
def test_self_regulation_edge_cases(sr_f):
    maps = [torch.randn(2, 4, 5, 6, requires_grad=True) for _ in range(3)]
    pres = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    loss = segkernels.nn.SelfRegulationLoss(4, sr_f=sr_f)
    total, parts = loss(maps, pres, torch.full((2, 5, 6), 255))  # every pixel ignored: no NaN
    assert torch.isfinite(total) and parts["mea_seg"].item() == 0 and parts["sr_f"].item() == 0
    total.backward()
    assert all(torch.isfinite(m.grad).all() for m in maps)
    empty_total, _ = loss([m.detach()[:0] for m in maps], [p.detach()[:0] for p in pres],
                          torch.zeros(0, 5, 6, dtype=torch.long))
    assert empty_total.item() == 0
    int32 = torch.randint(0, 4, (2, 5, 6), dtype=torch.int32)
    assert_close(loss(maps, pres, int32)[0], loss(maps, pres, int32.long())[0])
    for bad in (4, -1):
        with pytest.raises(IndexError, match=r"labels holds a value outside \[0, 4\)"):
            loss(maps, pres, torch.full((2, 5, 6), bad))
    with pytest.raises(TypeError, match="labels must be an integer"):
        loss(maps, pres, torch.zeros(2, 5, 6))


@pytest.mark.cuda
def test_self_regulation_bad_labels_on_cuda_give_nan_without_synchronising():
    maps = [torch.randn(2, 4, 5, 6, device="cuda") for _ in range(3)]
    pres = [torch.randn(2, 4, device="cuda") for _ in range(3)]
    labels = torch.randint(0, 4, (2, 5, 6), device="cuda")
    labels[0, 0, 0] = 9
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total, parts = segkernels.nn.SelfRegulationLoss(4)(maps, pres, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert total.isnan() and all(v.isnan() for v in parts.values())


@pytest.mark.parametrize("sr_f", ["hard", "soft"])
def test_self_regulation_matches_transcription(sr_f):
    c, e = 6, 5
    maps = [torch.randn(2, c, 9, 7, dtype=torch.float64, requires_grad=True) for _ in range(e)]
    pres = [torch.randn(2, c, dtype=torch.float64, requires_grad=True) for _ in range(e)]
    labels = _labels((2, c, 9, 7), "cpu")
    loss_fn = segkernels.nn.SelfRegulationLoss(c, sr_f=sr_f, temperature=2.0)
    total, parts = loss_fn(maps, pres, labels)
    assert set(parts) == {"mea_cls", "mea_seg", "sr_l", "sr_f"}
    ref = _sr_transcription(maps, pres, labels, c, (0.2, 0.8, 1.0, 1.0), sr_f, 2.0, 255)
    assert_close(total, ref)
    g = torch.autograd.grad(total, maps + pres)
    gr = torch.autograd.grad(ref, maps + pres)
    for a, b in zip(g, gr):
        assert_close(a, b)
    with pytest.raises(ValueError, match="sr_f"):
        segkernels.nn.SelfRegulationLoss(c, sr_f="medium")
    with pytest.raises(ValueError, match="class_maps\\[1\\]"):
        loss_fn([maps[0], maps[1][:, :3]], pres[:2], labels)
    # temperature is checked at construction in every mode ("hard" does not use it)
    for bad in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            segkernels.nn.SelfRegulationLoss(c, sr_f="hard", temperature=bad)
        for module in (segkernels.nn.KDLoss, segkernels.nn.ChannelWiseKDLoss):
            with pytest.raises(ValueError, match="temperature"):
                module(temperature=bad)


# ----------------------------------------------------------------------------------------------
# Triton kernels on CPU tensors under TRITON_INTERPRET=1 (float32, tiny grids)


def _triton_or_skip(t):
    from segkernels._library import triton_runs_on

    if not triton_runs_on(t):
        pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA device")


def _reference_op(students, teacher, labels, temperature, spatial, kl, scale_by_t2, ignore_index):
    """What the kd_loss op returns (the (K, N, ...) loss maps and each student's gradient of the sum
    of its map), from the float64 eager reference, in the inputs' dtype."""
    maps, grads = [], []
    for s in students:
        s64 = s.detach().double().requires_grad_()
        m = reference_kd_loss(s64, teacher.double(), temperature=temperature, axis="spatial" if spatial else "channel",
                              labels=labels, ignore_index=ignore_index, divergence="kl" if kl else "ce",
                              reduction="none", scale_by_t2=scale_by_t2)
        (g,) = torch.autograd.grad(m.sum(), s64)
        maps.append(m.detach())
        grads.append(g.to(s.dtype))
    return torch.stack(maps).float(), grads


def _reference_seg_op(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index):
    """What the seg_kd_loss op returns (the loss and the student's gradient), from the float64
    eager reference."""
    s64 = student.detach().double().requires_grad_()
    w = class_weight.double() if class_weight is not None else None
    loss = reference_seg_kd_loss(s64, teacher.double(), labels, temperature=temperature, hard_weight=hard_weight,
                                 soft_weight=soft_weight, class_weight=w, ignore_index=ignore_index)
    (g,) = torch.autograd.grad(loss, s64)
    return loss.detach().float(), g.to(student.dtype)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_channel_kernel_under_interpreter(layout):
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    shape = (2, 5, 7, 11)
    students, teacher = _inputs(shape, torch.float32, "cpu", k=5)
    _triton_or_skip(teacher)
    masked = torch.rand(shape) < 0.2
    masked[:, 0] = False  # every position keeps some mass
    students = [to_layout(s.detach().masked_fill(masked, float("-inf")), layout) for s in students]
    teacher = to_layout(teacher.masked_fill(masked, float("-inf")), layout)
    labels = _labels(shape, "cpu")
    labels[1] = 255  # a fully ignored image
    for kl in (True, False):
        loss, grads = _kd_loss_triton(students, teacher, labels, 2.0, False, kl, True, 255)
        ref, ref_grads = _reference_op(students, teacher, labels, 2.0, False, kl, True, 255)
        assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):  # T * (p_s - p_t): absolute error ~ T * eps
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert (torch.stack(grads)[:, 1] == 0).all() and (loss[:, 1] == 0).all()
    loss, grads = _kd_loss_triton(students[:1], teacher * 1e4, None, 0.1, False, True, False, 255)
    ref, ref_grads = _reference_op(students[:1], teacher * 1e4, None, 0.1, False, True, False, 255)
    # log-probabilities of magnitude 3e5 resolve to 0.03 in float32 (loss not T^2-scaled here)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0.1)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-5, atol=1e-5)  # (p_s - p_t) / T


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_spatial_kernel_under_interpreter():
    from segkernels.ops.kd_loss.triton import _kd_loss_triton

    shape = (2, 3, 17, 31)  # rows of 527 > one block: exercises the online softmax
    students, teacher = _inputs(shape, torch.float32, "cpu", k=2)
    _triton_or_skip(teacher)
    students = [s.detach() for s in students]
    teacher = teacher.masked_fill(torch.rand(shape) < 0.2, float("-inf"))
    teacher[0, 1, :8] = float("-inf")  # a whole leading segment of a row without mass
    students[1][1, 2, 9:] = float("-inf")  # and a whole trailing one, on the student side
    for kl in (True, False):
        loss, grads = _kd_loss_triton(students, teacher, None, 3.0, True, kl, True, 255)
        ref, ref_grads = _reference_op(students, teacher, None, 3.0, True, kl, True, 255)
        assert_close(loss, ref)
        for g, r in zip(grads, ref_grads):
            assert_close(g, r)


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("weighted", [False, True])
def test_triton_seg_kd_kernel_under_interpreter(weighted):
    from segkernels.ops.kd_loss.triton import _seg_kd_loss_triton

    shape = (2, 4, 9, 10)
    students, teacher = _inputs(shape, torch.float32, "cpu")
    _triton_or_skip(teacher)
    s = students[0].detach()
    labels = _labels(shape, "cpu")
    w = torch.rand(4) + 0.5 if weighted else None
    for temperature in (1.0, 2.0):
        loss, grad = _seg_kd_loss_triton(s, teacher, labels, w, temperature, 0.7, 1.2, 255)
        ref, ref_grad = _reference_seg_op(s, teacher, labels, w, temperature, 0.7, 1.2, 255)
        assert_close(loss, ref)
        assert_close(grad, ref_grad)
    loss, grad = _seg_kd_loss_triton(s, teacher, torch.full_like(labels, 255), w, 2.0, 1.0, 1.0, 255)
    assert loss.item() == 0 and (grad == 0).all()
    # An out-of-range label once read the class weight and the logit past their ends (a
    # crash). With no host synchronisation allowed, it now poisons the loss and the gradient.
    for bad in (4, 100000, -3):
        wrong = labels.clone()
        wrong[0, 0, 0] = bad
        loss, grad = _seg_kd_loss_triton(s, teacher, wrong, w, 1.0, 1.0, 1.0, 255)
        counted = ((wrong >= 0) & (wrong < 4)).unsqueeze(1).expand_as(grad)
        assert loss.isnan() and grad[counted].isnan().all() and (grad[~counted] == 0).all()


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_extremes_match_the_reference():
    # The Triton kernels shift by the raw maximum as the C++ ones do (_shifted, shifted_logit):
    # the maximum's term stays exactly 1 at temperature 1e-10, and rows spanning more than the
    # float range stay finite. Spatial rows of 2000 run in several segments, merged in torch.
    from segkernels.ops.kd_loss.triton import _kd_loss_triton, _seg_kd_loss_triton

    g = torch.Generator().manual_seed(13)
    teacher = torch.randn(2, 5, 4, 6, generator=g)
    _triton_or_skip(teacher)
    students = [torch.randn(2, 5, 4, 6, generator=g) for _ in range(2)]
    long_t, long_s = torch.randn(1, 2, 2000, generator=g), torch.randn(1, 2, 2000, generator=g)
    long_t[0, 1] = torch.linspace(-1, 1, 2000)  # the maximum rises through every segment
    big = 0.9 * torch.finfo(torch.float32).max
    spanning, long_spanning = [x.clone() for x in students], long_s.clone()
    spanning[1][0, 0], spanning[1][0, 1] = big, -big
    long_spanning[0, 0, 5], long_spanning[0, 0, 1500] = big, -big
    for temperature, ss, ls in ((1e-10, students, long_s), (4.0, spanning, long_spanning)):
        for spatial, s, t in ((False, ss, teacher), (True, ss, teacher), (True, [ls], long_t)):
            loss, grads = _kd_loss_triton(s, t, None, temperature, spatial, True, False, 255)
            ref, ref_grads = _reference_op(s, t, None, temperature, spatial, True, False, 255)
            assert torch.isfinite(loss).all(), (temperature, spatial)
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            for gr, r in zip(grads, ref_grads):
                torch.testing.assert_close(gr, r, rtol=1e-5, atol=1e-5 * max(1.0, float(r.abs().max())))
    labels = torch.randint(0, 5, (2, 4, 6), generator=g)
    labels[0, 0, :5] = 1  # the -big class: a cross-entropy past the range, a mean within it
    # The soft terms of one block summed past the float range before their scale (0 here, or
    # soft_weight / count): NaN where the CPU kernel, which sums in double, stayed finite.
    for soft_weight in (0.0, 0.01):  # (at 1 the true total is past the range)
        loss, grad = _seg_kd_loss_triton(spanning[1], teacher, labels, None, 4.0, 0.05, soft_weight, 255)
        ref, ref_grad = _reference_seg_op(spanning[1], teacher, labels, None, 4.0, 0.05, soft_weight, 255)
        assert torch.isfinite(loss), soft_weight
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_seg_kd_reference_keeps_the_contract():
    # The reference (the fallback without kernels) once gave NaN where the contract says 0.
    s, t = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0, 0] = 255
    w = torch.rand(3, dtype=torch.float64) + 0.1
    expected = F.cross_entropy(s, labels, weight=w, ignore_index=255) + segkernels.kd_loss(s, t, labels=labels)
    assert_close(reference_seg_kd_loss(s, t, labels, class_weight=w), expected)
    for lab, weight in ((torch.full_like(labels, 255), None), (labels, torch.zeros(3, dtype=torch.float64))):
        x = s.clone().requires_grad_(True)
        loss = reference_seg_kd_loss(x, t, lab, class_weight=weight, soft_weight=0.0)
        assert loss.item() == 0
        loss.backward()
        assert (x.grad == 0).all()
    empty = torch.randn(0, 3, 4, 5)
    assert reference_seg_kd_loss(empty, empty, torch.zeros(0, 4, 5, dtype=torch.long)).item() == 0
    # A class_weight of another float dtype than the logits, as the kernel takes it.
    f = reference_seg_kd_loss(s.float(), t.float(), labels, class_weight=w)
    assert f.dtype == torch.float32 and abs(f.item() - expected.item()) < 1e-4


def test_seg_kd_class_weight_requiring_grad_is_refused():
    s, t = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="class_weight must not require grad"):
        segkernels.seg_kd_loss(s, t, torch.zeros(1, 2, 2, dtype=torch.long), class_weight=w)


@pytest.mark.cuda
def test_no_host_synchronisation_on_cuda():
    shape = (2, 19, 32, 64)
    students, teacher = _inputs(shape, torch.float32, "cuda", k=2)
    labels = _labels(shape, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        segkernels.kd_loss(students[0], teacher, labels=labels, temperature=2.0).backward()
        segkernels.kd_loss(students, teacher, axis="spatial").sum().backward()
        segkernels.seg_kd_loss(students[1], teacher, labels, temperature=2.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_baseline_and_avx2_cpu_builds_agree(axis, monkeypatch):
    """The CPU kernels are compiled twice (baseline and AVX2+FMA, picked at run time)."""
    shape = (2, 6, 9, 13)
    students, teacher = _inputs(shape, torch.float32, "cpu", k=2)
    labels = _labels(shape, "cpu") if axis == "channel" else None
    args = ([s.detach() for s in students], teacher, labels, 2.0, axis == "spatial", True, True, 255)
    fast = torch.ops.segkernels.kd_loss(*args)
    monkeypatch.setenv("SEGKERNELS_NO_AVX2", "1")
    base = torch.ops.segkernels.kd_loss(*args)
    assert_close(fast[0], base[0])
    for a, b in zip(fast[1], base[1]):
        assert_close(a, b)
    _check(students, teacher, multi=True, axis=axis, labels=labels, temperature=2.0)
    if axis == "channel":
        lab = _labels(shape, "cpu")
        _check_seg = segkernels.seg_kd_loss(students[0], teacher, lab, temperature=2.0)
        ref = reference_seg_kd_loss(students[0].detach().double(), teacher.double(), lab, temperature=2.0)
        assert_close(_check_seg, ref.float())


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compilation (Triton to cubin) of every kernel launch the launchers make,
    for an H100/H200: checks what the interpreter cannot (types, constexpr branches, code
    generation) on a machine without a GPU."""
    import segkernels.ops.kd_loss.triton as mod

    def run():
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.randn(2, 5, 4, 6).to(dtype)
            students = [torch.randn(2, 5, 4, 6).to(dtype) for _ in range(5)]  # groups of 4 and 1
            labels = torch.randint(0, 5, (2, 4, 6))
            for kl in (True, False):
                mod._kd_loss_triton(students, t, labels, 2.0, False, kl, True, 255)
                mod._kd_loss_triton(students[:2], t, None, 2.0, True, kl, True, 255)
            mod._kd_loss_triton(students[:1], t.contiguous(memory_format=torch.channels_last), None, 2.0, False, True,
                                True, 255)
            for weight in (None, torch.rand(5)):
                mod._seg_kd_loss_triton(students[0], t, labels, weight, 2.0, 1.0, 1.0, 255)

    launches = record_triton_launches(mod, run)
    assert all(kw.get("enable_fp_fusion") is False for _, _, kw in launches)
    assert compile_launches_for_sm90(launches) == {
        "_kd_channel_kernel", "_kd_spatial_stats_kernel", "_kd_spatial_apply_kernel"
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_autocast_promotes_mixed_dtypes_and_returns_float32(device, axis):
    # Under autocast a student's logits come out of its convs in 16 bits while a teacher's may be
    # float32 (precomputed, or run outside autocast). PyTorch's own losses autocast to float32;
    # so do these, without a float32 copy of 16-bit logits when the dtypes already agree.
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(5, 5, 1).to(device)
    x = torch.randn(2, 5, 6, 7, generator=g).to(device)
    teacher32 = torch.randn(2, 5, 6, 7, generator=g).mul(3).to(device)
    labels = torch.randint(0, 5, (2, 6, 7), generator=g).to(device)
    labels[0, 0, :3] = 255
    with torch.autocast(device, dtype=amp_dtype):
        student = conv(x)
        assert student.dtype == amp_dtype
        for teacher in (teacher32, teacher32.to(amp_dtype)):
            got = segkernels.kd_loss(student, teacher, temperature=2.0, axis=axis)
            assert got.dtype == torch.float32
            with torch.autocast(device, enabled=False):
                common = torch.promote_types(student.dtype, teacher.dtype)
                s_ref = student.detach().to(common).double().requires_grad_()
                ref = reference_kd_loss(s_ref, teacher.to(common).double(), temperature=2.0, axis=axis)
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
            (grad,) = torch.autograd.grad(got, student)
            (ref_grad,) = torch.autograd.grad(ref, s_ref)
            assert grad.dtype == amp_dtype
            torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-2 * float(ref_grad.abs().max()))
            if axis == "channel":
                got = segkernels.seg_kd_loss(student, teacher, labels, temperature=2.0)
                assert got.dtype == torch.float32
                with torch.autocast(device, enabled=False):
                    ref = reference_seg_kd_loss(student.detach().to(common).double(), teacher.to(common).double(),
                                                labels, temperature=2.0)
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)
    # Outside autocast, mixed dtypes stay an error and 16-bit logits give a 16-bit loss.
    s16 = torch.randn(2, 5, 6, 7, generator=g).to(device=device, dtype=amp_dtype)
    with pytest.raises(TypeError, match="same dtype"):
        segkernels.kd_loss(s16, teacher32, axis=axis)
    assert segkernels.kd_loss(s16, teacher32.to(amp_dtype), axis=axis).dtype == amp_dtype


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_under_torch_compile(device):
    amp_dtype = torch.bfloat16 if device == "cpu" else torch.float16
    # 16-bit student made outside: inductor may elide a float32 -> 16-bit -> float32 round trip.
    s = torch.randn(2, 5, 6, 7, device=device).to(amp_dtype)
    t = torch.randn(2, 5, 6, 7, device=device)

    def f(s, t):
        with torch.autocast(device, dtype=amp_dtype):
            return segkernels.kd_loss(s, t, temperature=2.0)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, f(s, t))


def test_references_agree_with_torch_functional():
    # The references are the oracle of every back end, so they are checked against PyTorch's own
    # losses: F.kl_div (mmrazor's and CIRKD's formulation), F.cross_entropy with probability
    # targets (the soft CE), and F.cross_entropy with weights and an ignore index (the hard part).
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64), torch.randn(2, 5, 4, 6, generator=g,
                                                                                  dtype=torch.float64)
    T = 3.0
    kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="none").sum(1) * T * T
    assert_close(reference_kd_loss(s, t, temperature=T, reduction="none"), kl)
    ce = F.cross_entropy(s / T, F.softmax(t / T, 1), reduction="none") * T * T
    assert_close(reference_kd_loss(s, t, temperature=T, divergence="ce", reduction="none"), ce)
    spatial = F.kl_div(F.log_softmax(s.flatten(2) / T, 2), F.softmax(t.flatten(2) / T, 2), reduction="none").sum(2)
    assert_close(reference_kd_loss(s, t, temperature=T, axis="spatial", reduction="none"), spatial * T * T)
    labels = _labels(s.shape, "cpu")
    valid = labels != 255
    assert_close(reference_kd_loss(s, t, temperature=T, labels=labels), kl[valid].mean())
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    hard = F.cross_entropy(s, labels, weight=w, ignore_index=255)
    assert_close(reference_seg_kd_loss(s, t, labels, temperature=T, class_weight=w, soft_weight=0.0), hard)
    assert_close(reference_seg_kd_loss(s, t, labels, temperature=T, hard_weight=0.5, soft_weight=2.0),
                 0.5 * F.cross_entropy(s, labels, ignore_index=255) + 2.0 * kl[valid].mean())
