"""The distillation nn modules: KDLoss, ChannelWiseKDLoss and SelfRegulationLoss (against the
Self-Regulation formulas written out term by term)."""

import pytest
import torch
import torch.nn.functional as F

import segkernels
from helpers import assert_close, requires_kernels
from kd_cases import _inputs, _labels

pytestmark = requires_kernels


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


@pytest.mark.parametrize("sr_f", ["hard", "soft"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_self_regulation_with_full_resolution_labels(sr_f, align_corners):
    # Exits at 1/2 to 1/3 of the labels' size: the pixel losses run on the logits upsampled to
    # the labels inside segkernels.cross_entropy, as the transcription of the upsampled maps.
    c, e = 5, 3
    maps = [torch.randn(2, c, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(e)]
    pres = [torch.randn(2, c, dtype=torch.float64, requires_grad=True) for _ in range(e)]
    labels = _labels((2, c, 11, 9), "cpu")
    loss_fn = segkernels.nn.SelfRegulationLoss(c, sr_f=sr_f, temperature=2.0, align_corners=align_corners)
    total, parts = loss_fn(maps, pres, labels.to(torch.uint8))
    up = [F.interpolate(m, size=(11, 9), mode="bilinear", align_corners=align_corners) for m in maps]
    weights = (0.2, 0.8, 1.0, 0.0 if sr_f == "soft" else 1.0)
    ref = _sr_transcription(up, pres, labels, c, weights, "hard", 2.0, 255)
    if sr_f == "soft":  # over every position of the exits' own maps
        pt = F.softmax(maps[-1].detach() / 2.0, 1)
        ref = ref + sum((-(pt * F.log_softmax(m / 2.0, 1)).sum(1) * 4.0).mean() for m in maps[:-1])
    assert_close(total, ref)
    for a, b in zip(torch.autograd.grad(total, maps + pres), torch.autograd.grad(ref, maps + pres)):
        assert_close(a, b)
    with pytest.raises(ValueError, match=r"class_maps\[0\].*at most the labels'"):
        loss_fn([torch.randn(2, c, 12, 9)] + maps[1:], pres, labels)
