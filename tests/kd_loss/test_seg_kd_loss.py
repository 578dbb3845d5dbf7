"""seg_kd_loss (hard cross-entropy plus soft distillation) against its float64 eager reference:
values, weights, layouts, fully ignored maps, bad labels and the reference's own contract."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import DEVICES, FLOAT_DTYPES, assert_close, requires_kernels, to_layout
from kd_cases import _inputs, _labels
from segkernels.ops.kd_loss import reference_seg_kd_loss

pytestmark = requires_kernels


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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_seg_kd_loss_with_full_resolution_labels(device, dtype, align_corners):
    # Labels larger than the logits: the hard term on the upsampled logits (never formed), the
    # soft term at the logits' resolution over every position; the teacher gets its gradient.
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 17, 23), generator=g)
    labels[0, :4] = 255
    labels[1] = 255  # a fully ignored image
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    kw = dict(temperature=2.0, hard_weight=0.7, soft_weight=1.3, class_weight=w, align_corners=align_corners)
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ref = reference_seg_kd_loss(s64, t64, labels, **kw)
    ref_grads = torch.autograd.grad(ref, (s64, t64))
    sd = s.to(dtype).to(device).requires_grad_()
    td = t.to(dtype).to(device).requires_grad_()
    out = segkernels.seg_kd_loss(sd, td, labels.to(torch.uint8).to(device), **{**kw, "class_weight": w.to(dtype).to(device)})
    grads = torch.autograd.grad(out, (sd, td))
    rtol, atol = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (3e-2, 1e-2)}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=rtol, atol=atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, rtol=rtol, atol=atol)
    labels[:] = 255  # no labelled pixel: the hard term is 0, not NaN
    out = segkernels.seg_kd_loss(sd, td, labels.to(device), temperature=2.0, soft_weight=0.0)
    assert out.item() == 0.0


def test_seg_kd_loss_full_resolution_label_errors():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[1, 2, 3] = 7
    with pytest.raises(IndexError, match=r"labels holds 1 labels outside \[0, 3\)"):
        segkernels.seg_kd_loss(s, t, labels)
    with pytest.raises(ValueError, match="labels"):
        segkernels.seg_kd_loss(s, t, torch.zeros(2, 2, 8, dtype=torch.long))  # smaller in one axis
    with pytest.raises(TypeError, match="align_corners"):
        segkernels.seg_kd_loss(s, t, labels.clamp_max(2), align_corners="yes")
