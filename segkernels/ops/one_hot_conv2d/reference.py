"""Plain-PyTorch references of the label-map convolution: the one-hot map, then F.conv2d or
F.avg_pool2d (the definitions the kernels must match)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["one_hot_map", "reference_one_hot_conv2d", "reference_label_fractions"]


def one_hot_map(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, num_classes, H, W): 1 where labels == c, all-zero at ignored pixels. Raises IndexError
    for a label outside [0, num_classes) that is not ignore_index."""
    labels = labels.long()
    counted = labels != ignore_index
    bad = counted & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise IndexError(f"labels hold {int(bad.sum())} value(s) outside [0, {num_classes}) that are not "
                         f"ignore_index={ignore_index}")
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    return ((labels.unsqueeze(1) == classes) & counted.unsqueeze(1)).to(dtype)


def reference_one_hot_conv2d(labels: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                             dilation: Sequence[int] = (1, 1), ignore_index: int = 255) -> torch.Tensor:
    """F.conv2d over the one-hot map of labels, in weight's dtype."""
    onehot = one_hot_map(labels, weight.shape[1], ignore_index, weight.dtype)
    return F.conv2d(onehot, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


def reference_label_fractions(labels: torch.Tensor, num_classes: int, factor: int,
                              ignore_index: int = 255) -> torch.Tensor:
    """F.avg_pool2d of the float32 one-hot map: (N, num_classes, H // factor, W // factor)."""
    return F.avg_pool2d(one_hot_map(labels, num_classes, ignore_index), factor)
