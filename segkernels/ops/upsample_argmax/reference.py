"""Plain-PyTorch reference of upsample_argmax: the upsampled logits, then torch.argmax."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["reference_upsample_argmax", "axis_table"]


def reference_upsample_argmax(logits: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """F.interpolate(mode="bilinear") in float64, then argmax over the classes (first maximum,
    NaN counting as the largest, as torch.argmax)."""
    up = F.interpolate(logits.double(), size=(int(size[0]), int(size[1])), mode="bilinear",
                       align_corners=align_corners)
    return up.argmax(dim=1)


def axis_table(in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype, device) -> tuple:
    """The per-output-index taps (i0, i1, w0, w1) of one axis, as linear_tap in
    csrc/upsample_argmax/upsample_argmax.h computes them: in dtype (the logits' accumulation
    type, float32 or float64), an unchanged axis copied."""
    o = torch.arange(out_size, dtype=torch.int64)
    if in_size == out_size:
        one = torch.ones(out_size, dtype=dtype)
        return tuple(t.to(device) for t in (o, o, one, one * 0))
    of = o.to(dtype)
    if align_corners:
        scale = torch.tensor(in_size - 1, dtype=dtype) / (out_size - 1) if out_size > 1 else torch.zeros((), dtype=dtype)
        src = scale * of
    else:
        # One rounding of scale * (i + 0.5) - 0.5 (an FMA, as in the header): exact in float64
        # for a float32 scale, then rounded once.
        scale = torch.tensor(in_size, dtype=dtype) / out_size
        src = (scale.double() * (of.double() + 0.5) - 0.5).to(dtype).clamp_min(0.0)
    i0 = src.long().clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = (src - i0.to(dtype)).clamp(0.0, 1.0)
    return tuple(t.to(device) for t in (i0, i1, 1.0 - w1, w1))
