"""Plain-PyTorch reference of upsample_argmax: the upsampled logits, then torch.argmax."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["reference_upsample_argmax"]


def reference_upsample_argmax(logits: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """F.interpolate(mode="bilinear") in float64, then argmax over the classes (first maximum,
    NaN counting as the largest, as torch.argmax)."""
    up = F.interpolate(logits.double(), size=(int(size[0]), int(size[1])), mode="bilinear",
                       align_corners=align_corners)
    return up.argmax(dim=1)
