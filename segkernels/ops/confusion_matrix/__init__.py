"""Confusion matrix of a segmentation, with the argmax over the logits fused in.

``confusion_matrix(logits_or_predictions, labels, num_classes)`` reads the logits once and
never materialises the prediction map. CPU: C++ (csrc/confusion_matrix). CUDA: Triton
(triton.py).
"""

from __future__ import annotations

import torch

from ... import _library
from .reference import reference_confusion_matrix
from .registration import MAX_CLASSES

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernel)

__all__ = ["confusion_matrix", "reference_confusion_matrix"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)


def confusion_matrix(
    input: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion matrix (num_classes, num_classes) int64: rows are true classes, columns predictions.

    Args:
        input: logits (N, C, *spatial) of any float dtype, C == num_classes, NCHW or
            channels-last (the argmax is fused in, ties to the lowest class as torch.argmax,
            NaN counting as the largest value); or an integer prediction map (N, *spatial).
        labels: integer (N, *spatial); positions equal to ignore_index are not counted.
        num_classes: C.

    Raises:
        ValueError for a label (or prediction) outside [0, num_classes) other than ignore_index.
        On CUDA that check reads one number back from the device (a synchronisation); under
        torch.compile it is skipped.
    """
    if not isinstance(input, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("input and labels must be torch.Tensor")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 < num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be an int in [1, {MAX_CLASSES}], got {num_classes!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != input.device:
        raise ValueError(f"labels must be on the device of input ({input.device}), got {labels.device}")
    if input.is_floating_point():
        if input.dim() < 2 or tuple(labels.shape) != (input.shape[0], *input.shape[2:]):
            raise ValueError(
                f"logits (N, C, *spatial) need labels (N, *spatial): got input {tuple(input.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        if input.shape[1] != num_classes:
            raise ValueError(f"logits have {input.shape[1]} channels but num_classes={num_classes}")
    else:
        if input.is_complex() or input.dtype == torch.bool:
            raise TypeError(f"input must be float logits or an integer prediction map, got {input.dtype}")
        if input.shape != labels.shape:
            raise ValueError(
                f"a prediction map must have the shape of labels: got {tuple(input.shape)} and {tuple(labels.shape)}"
            )
        input = input.long()
    labels = labels.long()
    if not _library.use_kernel("confusion_matrix", input.device, GPU_KERNEL):
        return reference_confusion_matrix(input, labels, num_classes, ignore_index)
    matrix, invalid = torch.ops.segkernels.confusion_matrix.default(input, labels, num_classes, ignore_index)
    if not torch.compiler.is_compiling() and int(invalid.item()) > 0:
        raise ValueError(
            f"{int(invalid.item())} positions have a label or prediction outside [0, {num_classes}) "
            f"that is not ignore_index={ignore_index}"
        )
    return matrix
