"""Confusion matrix of a segmentation, with the argmax over the logits fused in.

``confusion_matrix(logits_or_predictions, labels, num_classes)`` reads the logits once and
never materialises the prediction map. CPU: C++ (csrc/confusion_matrix). CUDA: Triton
(triton.py).
"""

from __future__ import annotations

import torch

from ... import _library
from ..._checks import (
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_device,
    check_bool,
    check_ignore_index,
    check_int,
    check_tensor,
    is_integer_tensor,
)
from .reference import reference_confusion_matrix
from .registration import MAX_CLASSES
from ..upsample_argmax import upsample_argmax

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernel)

__all__ = ["confusion_matrix", "reference_confusion_matrix"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)


def confusion_matrix(
    input: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255, *,
    align_corners: bool = False
) -> torch.Tensor:
    """Confusion matrix (num_classes, num_classes) int64: rows are true classes, columns predictions.

    Args:
        input: logits (N, C, *spatial) of any float dtype, C == num_classes, NCHW or
            channels-last (the argmax is fused in, ties to the lowest class as torch.argmax,
            NaN counting as the largest value); or an integer prediction map (N, *spatial).
            Logits (N, C, h, w) smaller than labels (N, H, W) are scored as
            ``F.interpolate(input, (H, W), mode="bilinear", align_corners=align_corners)``
            would be, through upsample_argmax, without the upsampled logits (predictions may
            differ from that eager path only where the two largest interpolated logits are
            equal to rounding).
        labels: integer (N, *spatial); positions equal to ignore_index are not counted.
        num_classes: C.
        align_corners: for logits smaller than the labels, as F.interpolate.

    Raises:
        IndexError for a label (or prediction) outside [0, num_classes) other than ignore_index.
        On CUDA that check reads one number back from the device (a synchronisation); under
        torch.compile it is skipped.
    """
    check_tensor(input, "input")
    check_tensor(labels, "labels")
    num_classes = check_int(num_classes, "num_classes", 1, MAX_CLASSES)
    ignore_index = check_ignore_index(ignore_index)
    if not is_integer_tensor(labels):
        raise ArgumentTypeError(f"labels must be an integer tensor, got {labels.dtype}")
    check_device(labels, input.device, "labels")
    align_corners = check_bool(align_corners, "align_corners")
    if input.is_floating_point():
        low_resolution = (input.dim() == 4 and labels.dim() == 3 and input.shape[0] == labels.shape[0]
                          and tuple(input.shape[2:]) != tuple(labels.shape[1:]))
        if not low_resolution and (input.dim() < 2 or tuple(labels.shape) != (input.shape[0], *input.shape[2:])):
            raise ArgumentValueError(
                f"logits (N, C, *spatial) need labels (N, *spatial): got input {tuple(input.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        if input.shape[1] != num_classes:
            raise ArgumentValueError(f"logits have {input.shape[1]} channels but num_classes={num_classes}")
        if low_resolution:
            return _from_low_resolution(input, labels, num_classes, ignore_index, align_corners)
    else:
        if not is_integer_tensor(input):
            raise ArgumentTypeError(f"input must be float logits or an integer prediction map, got {input.dtype}")
        if input.shape != labels.shape:
            raise ArgumentValueError(
                f"a prediction map must have the shape of labels: got {tuple(input.shape)} and {tuple(labels.shape)}"
            )
        input = input.long()
    labels = labels.long()
    if not _library.use_kernel("confusion_matrix", input.device, GPU_KERNEL):
        return reference_confusion_matrix(input, labels, num_classes, ignore_index)
    matrix, invalid = torch.ops.segkernels.confusion_matrix.default(input, labels, num_classes, ignore_index)
    if not torch.compiler.is_compiling() and int(invalid.item()) > 0:
        raise ArgumentIndexError(
            f"{int(invalid.item())} positions have a label or prediction outside [0, {num_classes}) "
            f"that is not ignore_index={ignore_index}"
        )
    return matrix


# Pixels of the prediction map held at once when scoring low-resolution logits: the map is
# int64, so 32 MiB at most, whatever the batch.
_CHUNK_PIXELS = 1 << 22


def _from_low_resolution(logits, labels, num_classes, ignore_index, align_corners):
    """Logits (N, C, h, w), C checked, against labels (N, H, W) of another size."""
    h, w = logits.shape[2:]
    H, W = labels.shape[1:]
    if H < h or W < w:
        raise ArgumentValueError(
            f"logits (N, C, h, w) need labels (N, H, W) of their size or larger (logits are upsampled, labels never "
            f"downsampled): got input {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=logits.device)
    if H * W == 0:  # no pixel to count
        return matrix
    step = max(1, _CHUNK_PIXELS // (H * W))
    for start in range(0, logits.shape[0], step):
        pred = upsample_argmax(logits[start:start + step], (H, W), align_corners=align_corners)
        matrix = matrix + confusion_matrix(pred, labels[start:start + step], num_classes, ignore_index)
    return matrix
