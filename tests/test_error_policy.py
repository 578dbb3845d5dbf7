"""The error policy (README, "Error policy"; segkernels/_checks.py), across every public op:
TypeError for a wrong type or dtype, ValueError for a value or shape outside the contract,
IndexError for labels and indices out of range; each also a RuntimeError, as PyTorch's own
errors are, so that a drop-in user's `except RuntimeError` catches them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import segkernels
from segkernels import pruning


def _labels(bad):
    y = torch.zeros(2, 4, 5, dtype=torch.long)
    y[1, 2, 3] = bad
    return y


def _logits(c=3):
    return torch.randn(2, c, 4, 5)


def _sr_call(labels):
    maps = [torch.randn(2, 3, 4, 5) for _ in range(2)]
    pres = [torch.randn(2, 3) for _ in range(2)]
    return segkernels.nn.SelfRegulationLoss(3)(maps, pres, labels)


# A label outside [0, C) that is not ignore_index is an IndexError everywhere (it was an
# IndexError in seg_kd_loss but a ValueError in SelfRegulationLoss, confusion_matrix and
# median_frequency_weights).
LABEL_CASES = {
    "seg_kd_loss": lambda y: segkernels.seg_kd_loss(_logits(), _logits(), y),
    "SelfRegulationLoss": _sr_call,
    "confusion_matrix logits": lambda y: segkernels.confusion_matrix(_logits(), y, 3),
    "confusion_matrix predictions": lambda y: segkernels.confusion_matrix(torch.zeros_like(y), y, 3),
    "median_frequency_weights": lambda y: segkernels.median_frequency_weights(y, 3),
    "cross_entropy": lambda y: segkernels.cross_entropy(torch.randn(2, 3, 2, 3), y),
}


@pytest.mark.parametrize("bad", [3, -1, 254])
@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_labels_out_of_range_are_index_errors(case, bad):
    with pytest.raises(IndexError) as caught:
        LABEL_CASES[case](_labels(bad))
    assert isinstance(caught.value, RuntimeError)


def _pooled():
    x = torch.randn(1, 2, 6, 6)
    return segkernels.max_pool2d_with_indices(x, 2)


# (expected type, call). Where PyTorch has the same op, the case is one PyTorch raises
# RuntimeError for.
CASES = [
    (IndexError, lambda: segkernels.max_unpool2d(_pooled()[0], torch.full((1, 2, 3, 3), 99), 2)),
    (IndexError, lambda: segkernels.ps_assemble(torch.randn(1, 4, 5, 5), torch.tensor([[3, 0, 0]]), k=2, m=3)),
    (ValueError, lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 4, 4), 2, stride=0)),
    (ValueError, lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 1, 1), 3)),
    (ValueError, lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 8, 8), 2, padding=2)),
    (ValueError, lambda: segkernels.max_unpool3d(torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2,
                                                                                       dtype=torch.long), (2, 2))),
    (ValueError, lambda: segkernels.max_unpool2d(*_pooled(), 2, output_size=(40, 40))),
    (ValueError, lambda: segkernels.kd_loss(_logits(), _logits(4))),
    (ValueError, lambda: segkernels.kd_loss(_logits(), _logits(), temperature=0.0)),
    (ValueError, lambda: segkernels.kd_loss(_logits(), _logits(), reduction="batchmean")),
    (ValueError, lambda: segkernels.confusion_matrix(_logits(), torch.zeros(2, 4, 5, dtype=torch.long), 4)),
    (ValueError, lambda: segkernels.ps_assemble_dense(torch.randn(1, 4, 5, 5), k=2, m=3, stride=0)),
    (ValueError, lambda: segkernels.segmentation_scores(torch.ones(2, 3))),
    (ValueError, lambda: segkernels.nn.SegNet(0)),
    (ValueError, lambda: pruning.LayerStats(nn.Conv2d(4, 4, 3, groups=2))),
    (TypeError, lambda: segkernels.max_pool2d_with_indices(torch.ones(1, 1, 4, 4, dtype=torch.bool), 2)),
    (TypeError, lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 4, 4), "2")),
    (TypeError, lambda: segkernels.kd_loss(_logits(), _logits().double())),
    (TypeError, lambda: segkernels.kd_loss(_logits(), _logits(), labels=_labels(0).float())),
    (TypeError, lambda: segkernels.confusion_matrix(_logits(), _labels(0), 3.0)),
    (TypeError, lambda: segkernels.ps_assemble(torch.randn(1, 4, 5, 5), torch.zeros(1, 3), k=2, m=3)),
    (TypeError, lambda: segkernels.median_frequency_weights(_labels(0), 3, ignore_index=2.5)),
    (TypeError, lambda: segkernels.lasso_gram(torch.eye(2), torch.ones(2), torch.ones(1), n_samples="1")),
    (TypeError, lambda: pruning.LayerStats(nn.Linear(2, 2))),
]


@pytest.mark.parametrize("expected, call", CASES, ids=range(len(CASES)))
def test_each_bad_input_raises_its_type_and_runtime_error(expected, call):
    with pytest.raises(expected) as caught:
        call()
    assert isinstance(caught.value, RuntimeError), type(caught.value)
    assert type(caught.value).__module__ == "segkernels._checks", type(caught.value)


# The same bad input to PyTorch's op and to ours: ours must be catchable as what PyTorch raises
# (its RuntimeError mostly), so a drop-in user's except clause keeps working.
def _pooled_pair(nd):
    x = torch.randn((1, 2) + (4,) * nd)
    pool = torch.nn.functional.max_pool2d if nd == 2 else torch.nn.functional.max_pool3d
    return pool(x, 2, return_indices=True)


SAME_INPUT = [
    ("index out of range",
     lambda: F.max_unpool2d(_pooled_pair(2)[0], torch.full((1, 2, 2, 2), 99), 2),
     lambda: segkernels.max_unpool2d(_pooled_pair(2)[0], torch.full((1, 2, 2, 2), 99), 2)),
    ("2-element kernel to max_unpool3d",
     lambda: F.max_unpool3d(*_pooled_pair(3), (2, 2)),
     lambda: segkernels.max_unpool3d(*_pooled_pair(3), (2, 2))),
    ("stride 0", lambda: F.max_pool2d(torch.randn(1, 1, 4, 4), 2, 0),
     lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 4, 4), 2, 0)),
    ("input smaller than the window", lambda: F.max_pool2d(torch.randn(1, 1, 2, 2), 3),
     lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 2, 2), 3)),
    ("padding over half the kernel", lambda: F.max_pool2d(torch.randn(1, 1, 8, 8), 2, padding=2),
     lambda: segkernels.max_pool2d_with_indices(torch.randn(1, 1, 8, 8), 2, padding=2)),
    ("output size out of range", lambda: F.max_unpool2d(*_pooled_pair(2), 2, output_size=(9, 9)),
     lambda: segkernels.max_unpool2d(*_pooled_pair(2), 2, output_size=(9, 9))),
    ("label out of range", lambda: F.cross_entropy(torch.randn(2, 3, 4), torch.tensor([[0, 1, 5, 2], [0, 0, 0, 0]])),
     lambda: segkernels.seg_kd_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4),
                                    torch.tensor([[0, 1, 5, 2], [0, 0, 0, 0]]))),
]


@pytest.mark.parametrize("name, theirs, ours", SAME_INPUT, ids=[c[0] for c in SAME_INPUT])
def test_errors_are_catchable_as_what_pytorch_raises(name, theirs, ours):
    with pytest.raises(Exception) as pytorch_error:
        theirs()
    with pytest.raises(type(pytorch_error.value)):
        ours()
