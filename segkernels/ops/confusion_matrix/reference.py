"""Plain-PyTorch reference of the confusion matrix: argmax, then a bincount."""

from __future__ import annotations

import torch

__all__ = ["reference_confusion_matrix"]


def reference_confusion_matrix(
    input: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """argmax (first maximum wins, NaN counts as largest, as torch.argmax) then a bincount."""
    pred = input.argmax(dim=1) if input.is_floating_point() else input
    pred = pred.reshape(-1).long()
    lab = labels.reshape(-1).long()
    keep = lab != ignore_index
    pred, lab = pred[keep], lab[keep]
    if bool(((lab < 0) | (lab >= num_classes) | (pred < 0) | (pred >= num_classes)).any()):
        raise IndexError(f"labels and predictions must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    return torch.bincount(lab * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)

