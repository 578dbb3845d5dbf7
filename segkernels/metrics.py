"""SegNet's evaluation numbers and class balancing, on top of confusion_matrix."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Dict, Union

import torch

from ._checks import (
    ArgumentTypeError,
    ArgumentValueError,
    check_ignore_index,
    check_int,
    is_integer_tensor,
    labels_out_of_range,
)

__all__ = ["segmentation_scores", "median_frequency_weights"]


def segmentation_scores(cm: torch.Tensor) -> Dict[str, torch.Tensor]:
    """SegNet's G, C and mIoU from a confusion matrix (rows = true class, columns = predicted).

    Returns a dict of float64 tensors:
        global_accuracy: correct pixels / counted pixels (G).
        per_class_accuracy: TP / pixels of the class in the labels; NaN for a class absent from
            the labels (undefined).
        mean_class_accuracy: mean of per_class_accuracy over the classes present in the labels (C).
        per_class_iou: TP / (TP + FP + FN); NaN for a class absent from both labels and predictions.
        mean_iou: mean of per_class_iou over the classes present in labels or predictions (mIoU).
    Classes left out are left out of the means, so the means are never NaN (0 for an empty matrix).
    """
    if not isinstance(cm, torch.Tensor) or cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ArgumentValueError(
            f"cm must be a square (num_classes, num_classes) tensor, got {getattr(cm, 'shape', cm)}"
        )
    if cm.dtype == torch.bool or cm.is_complex():
        raise ArgumentTypeError(f"cm must hold integer or float counts, got {cm.dtype}")
    cm = cm.to(torch.float64)
    # Counts: anything else would give scores outside [0, 1] or NaN means without a word.
    if cm.numel() and not bool(((cm >= 0) & (cm == cm.floor()) & cm.isfinite()).all()):
        raise ArgumentValueError("cm must hold counts: finite, non-negative whole numbers")
    tp = cm.diagonal()
    in_labels = cm.sum(dim=1)
    in_preds = cm.sum(dim=0)
    union = in_labels + in_preds - tp
    total = cm.sum()
    nan = torch.full_like(tp, float("nan"))
    per_class_accuracy = torch.where(in_labels > 0, tp / in_labels.clamp(min=1), nan)
    per_class_iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    zero = torch.zeros((), dtype=torch.float64, device=cm.device)

    def mean_present(values, present):
        count = present.sum()
        return torch.where(count > 0, torch.where(present, values, zero).sum() / count.clamp(min=1), zero)

    return {
        "global_accuracy": torch.where(total > 0, tp.sum() / total.clamp(min=1), zero),
        "mean_class_accuracy": mean_present(per_class_accuracy, in_labels > 0),
        "per_class_accuracy": per_class_accuracy,
        "mean_iou": mean_present(per_class_iou, union > 0),
        "per_class_iou": per_class_iou,
    }


def median_frequency_weights(
    label_batches: Union[torch.Tensor, Iterable[torch.Tensor]], num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """SegNet's median frequency balancing: w_c = median(freq) / freq_c.

    freq_c = pixels of class c / total pixels of the images in which c is present (pixels equal
    to ignore_index are counted in neither). The median is over the classes that were seen (for
    an even count, the mean of the two middle frequencies, as numpy.median); a class never seen
    gets weight 0, with a warning.

    Args:
        label_batches: one integer label tensor (N, *spatial), or an iterable of them; each of
            the N entries is one image. Empty batches are skipped.
        num_classes: number of classes.
        ignore_index: label value that is not counted.
    Returns:
        (num_classes,) float32 weights, on the device of the labels.
    """
    num_classes = check_int(num_classes, "num_classes", 1)
    ignore_index = check_ignore_index(ignore_index)
    if isinstance(label_batches, torch.Tensor):
        batches = [label_batches]
    elif isinstance(label_batches, Iterable) and not isinstance(label_batches, (str, bytes)):
        batches = label_batches
    else:
        raise ArgumentTypeError(
            f"label_batches must be a label tensor or an iterable of them, got {type(label_batches).__name__}"
        )
    class_pixels = None
    image_pixels = None
    for labels in batches:
        if not isinstance(labels, torch.Tensor) or not is_integer_tensor(labels) or labels.dim() < 2:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ArgumentTypeError(f"label_batches must hold integer label tensors of shape (N, *spatial), got {got}")
        if labels.shape[0] == 0:
            continue
        flat = labels.reshape(labels.shape[0], -1).long()
        valid = flat != ignore_index
        if bool(((flat < 0) | (flat >= num_classes))[valid].any()):
            raise labels_out_of_range(num_classes, ignore_index, name="label_batches")
        safe = torch.where(valid, flat, torch.zeros_like(flat))
        counts = torch.zeros(flat.shape[0], num_classes, dtype=torch.float64, device=flat.device)
        counts.scatter_add_(1, safe, valid.to(torch.float64))  # per-image pixel counts per class
        present = counts > 0
        if class_pixels is None:
            class_pixels = torch.zeros(num_classes, dtype=torch.float64, device=flat.device)
            image_pixels = torch.zeros_like(class_pixels)
        class_pixels += counts.sum(0)
        image_pixels += (present * valid.sum(1, keepdim=True)).sum(0)
    if class_pixels is None:
        raise ArgumentValueError("label_batches holds no images")
    seen = class_pixels > 0
    if not bool(seen.all()):
        missing = torch.nonzero(~seen).flatten().tolist()
        warnings.warn(f"median_frequency_weights: classes {missing} never appear; their weight is 0", RuntimeWarning)
    if not bool(seen.any()):
        return torch.zeros(num_classes, dtype=torch.float32, device=class_pixels.device)
    freq = class_pixels / image_pixels.clamp(min=1)
    # torch.median gives the lower of the two middle values for an even count; SegNet's median
    # (numpy's) is their mean.
    median = freq[seen].quantile(0.5)
    weights = torch.where(seen, median / freq.clamp(min=1e-300), torch.zeros_like(freq))
    return weights.to(torch.float32)
