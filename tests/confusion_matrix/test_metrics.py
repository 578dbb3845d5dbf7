"""segmentation_scores, median_frequency_weights and the SegNet module."""

import math

import pytest
import torch

import segkernels
from helpers import requires_kernels


def test_segmentation_scores_hand_computed():
    # rows = true class; class 3 is absent from labels and predictions, class 2 only predicted
    cm = torch.tensor([[5, 1, 0, 0], [2, 6, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = segkernels.segmentation_scores(cm)
    assert math.isclose(s["global_accuracy"].item(), 11 / 16)
    assert torch.allclose(s["per_class_accuracy"][:2], torch.tensor([5 / 6, 6 / 10], dtype=torch.float64))
    assert torch.isnan(s["per_class_accuracy"][2:]).all()
    assert math.isclose(s["mean_class_accuracy"].item(), (5 / 6 + 6 / 10) / 2)
    iou = torch.tensor([5 / (6 + 7 - 5), 6 / (10 + 7 - 6), 0.0], dtype=torch.float64)
    assert torch.allclose(s["per_class_iou"][:3], iou)
    assert torch.isnan(s["per_class_iou"][3])
    assert math.isclose(s["mean_iou"].item(), iou.mean().item())


def test_segmentation_scores_empty_matrix_is_not_nan():
    s = segkernels.segmentation_scores(torch.zeros(3, 3, dtype=torch.long))
    for key in ("global_accuracy", "mean_class_accuracy", "mean_iou"):
        assert s[key].item() == 0.0
    with pytest.raises(ValueError, match="square"):
        segkernels.segmentation_scores(torch.zeros(2, 3))


@pytest.mark.parametrize(
    "cm",
    [torch.tensor([[1, -1], [0, 1]]), torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]),
     torch.tensor([[0.5, 0.0], [0.0, 1.0]]), torch.tensor([[float("inf"), 0.0], [0.0, 1.0]])],
    ids=["negative", "nan", "fractional", "inf"],
)
def test_segmentation_scores_rejects_what_is_not_counts(cm):
    with pytest.raises(ValueError, match="counts"):
        segkernels.segmentation_scores(cm)


def test_segmentation_scores_rejects_bool_and_complex():
    for cm in (torch.eye(2, dtype=torch.bool), torch.eye(2, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="counts"):
            segkernels.segmentation_scores(cm)
    # Whole-number float counts are counts.
    s = segkernels.segmentation_scores(torch.tensor([[3.0, 1.0], [0.0, 4.0]]))
    assert math.isclose(s["global_accuracy"].item(), 7 / 8)


def test_median_frequency_weights_hand_case():
    # image 0: 3 px of class 0, 1 px of class 1 (+1 ignored); image 1: 2 px class 1, 2 px class 2
    labels = torch.tensor([[0, 0, 0, 1, 255, 0, 0, 0], [1, 1, 2, 2, 255, 255, 255, 255]])
    labels[0, 5:] = 255
    # freq0 = 3 / 4; freq1 = 3 / (4 + 4); freq2 = 2 / 4; median = 1/2
    expected = torch.tensor([0.5 / 0.75, 0.5 / 0.375, 0.5 / 0.5, 0.0])
    for batches in (labels, [labels[:1], labels[1:]]):  # one tensor, or an iterable of batches
        with pytest.warns(RuntimeWarning, match="never appear"):
            w = segkernels.median_frequency_weights(batches, 4)
        assert torch.allclose(w, expected)
    with pytest.raises(IndexError, match="outside \\[0, 4\\)"):
        segkernels.median_frequency_weights(torch.tensor([[0, 7]]), 4)


def test_median_frequency_weights_even_count_takes_the_mean_of_the_middle_two():
    # One image per row: freq0 = 3/8, freq1 = 4/8, freq2 = 3/4, freq3 = 2/8; the median of
    # (0.25, 0.375, 0.5, 0.75) is 0.4375, not torch.median's lower 0.375.
    labels = torch.tensor([[0, 0, 1, 3], [2, 2, 2, 0], [1, 1, 1, 3]])
    w = segkernels.median_frequency_weights(labels, 4)
    expected = 0.4375 / torch.tensor([3 / 8, 4 / 8, 3 / 4, 2 / 8])
    assert torch.allclose(w, expected.float())


def test_median_frequency_weights_skips_empty_batches_and_checks_arguments():
    labels = torch.tensor([[0, 0, 1, 3], [2, 2, 2, 0], [1, 1, 1, 3]])
    empty = torch.zeros(0, 4, dtype=torch.long)
    expected = segkernels.median_frequency_weights(labels, 4)
    assert torch.equal(segkernels.median_frequency_weights([empty, labels[:2], empty, labels[2:]], 4), expected)
    with pytest.raises(ValueError, match="no images"):
        segkernels.median_frequency_weights(empty, 4)
    with pytest.raises(ValueError, match="no images"):
        segkernels.median_frequency_weights(iter([]), 4)
    for bad in (labels.bool(), labels.to(torch.complex64), labels.float(), labels[0]):
        with pytest.raises(TypeError, match="integer label tensors"):
            segkernels.median_frequency_weights(bad, 4)
    for bad in (5, None, "labels"):
        with pytest.raises(TypeError, match="label_batches"):
            segkernels.median_frequency_weights(bad, 4)
    with pytest.raises(TypeError, match="num_classes"):
        segkernels.median_frequency_weights(labels, True)
    with pytest.raises(TypeError, match="ignore_index"):
        segkernels.median_frequency_weights(labels, 4, ignore_index=None)


@requires_kernels
def test_segnet_shapes_forward_backward():
    model = segkernels.nn.SegNet(num_classes=5, in_channels=3, width=8)
    x = torch.randn(2, 3, 45, 61, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 5, 45, 61)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError):
        segkernels.nn.SegNet(0)
