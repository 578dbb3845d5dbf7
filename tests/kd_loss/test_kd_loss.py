"""kd_loss against the eager reference (computed in float64 from the same inputs): values, several
students, layouts, ignore masks, gradcheck, opcheck, torch.compile, autocast and argument errors."""

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
    gradcheck,
    requires_kernels,
    run_opcheck,
    to_layout,
)
from kd_cases import _check, _inputs, _labels
from segkernels.ops.kd_loss import reference_kd_loss, reference_seg_kd_loss

pytestmark = requires_kernels


SHAPES = [(2, 5, 7, 9), (3, 4), (2, 3, 11), (2, 4, 3, 5, 2)]  # 2-D, no, 1-D, 3-D spatial dims


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
    run_opcheck(op, ([s1, s2], t, labels, 2.0, False, 0, True, 255))
    run_opcheck(op, ([s1], t, None, 0.5, True, 1, False, 255))
    cl = [to_layout(s1.detach(), "channels_last").requires_grad_()]
    run_opcheck(op, (cl, to_layout(t, "channels_last"), None, 1.0, False, 0, True, 255))
    # reverse KL and JS (beta 0.3), with and without the teacher's gradient
    run_opcheck(op, ([s1, s2], t, labels, 2.0, False, 2, True, 255, True))
    run_opcheck(op, ([s1], t, labels, 2.0, False, 3, True, 255, True, 0.3))
    run_opcheck(op, ([s1], t, None, 3.0, True, 3, True, 255, False, 0.7))
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
        (ValueError, "divergence must be", lambda: segkernels.kd_loss(s, t, divergence="jsd")),
        (ValueError, "beta must be in the open interval", lambda: segkernels.kd_loss(s, t, divergence="js", beta=1.0)),
        (ValueError, "beta must be in the open interval", lambda: segkernels.kd_loss(s, t, beta=0.0)),
        (TypeError, "beta must be a real number", lambda: segkernels.kd_loss(s, t, beta="0.5")),
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


@pytest.mark.parametrize("axis", ["channel", "spatial"])
def test_double_backward_is_exact(axis):
    # It raised: the saved kernel gradient is a constant to autograd. A backward that records a
    # graph (create_graph=True, torch.func) now takes the gradient's formula, so second
    # derivatives are exact, for the student and the teacher.
    s = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 4))
    lab[0, 1] = 255
    assert torch.autograd.gradgradcheck(
        lambda a, b: segkernels.kd_loss(a, b, temperature=1.5, axis=axis, reduction="none"), (s, t))
    assert torch.autograd.gradgradcheck(
        lambda a, b: segkernels.kd_loss(a, b, axis=axis, divergence="ce"), (s, t))
    if axis == "channel":
        w = torch.rand(3, dtype=torch.float64) + 0.5
        assert torch.autograd.gradgradcheck(
            lambda a, b: segkernels.seg_kd_loss(a, b, lab, temperature=2.0, class_weight=w), (s, t))


