"""Plain-PyTorch reference of cross_entropy: F.interpolate to the labels' size, then
F.cross_entropy; and the same as einsums over interpolation matrices, which autograd's
formula path and forward-mode AD use."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..upsample_argmax.reference import axis_table

__all__ = ["reference_cross_entropy", "interpolation_matrix", "upsample"]


def reference_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                            ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                            align_corners: bool = False) -> torch.Tensor:
    """F.cross_entropy(F.interpolate(input, target's size, mode="bilinear"), target.long(), ...),
    in input's dtype (the upsampled logits are formed: N * C * H * W of them)."""
    size = tuple(target.shape[1:])
    up = input if tuple(input.shape[2:]) == size else F.interpolate(input, size=size, mode="bilinear",
                                                                     align_corners=align_corners)
    return F.cross_entropy(up, target.long(), weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def interpolation_matrix(in_size: int, out_size: int, align_corners: bool, dtype: torch.dtype,
                         device) -> torch.Tensor:
    """(out_size, in_size): row o holds F.interpolate's two taps of output index o on one axis."""
    i0, i1, w0, w1 = axis_table(in_size, out_size, align_corners, dtype, device)
    m = torch.zeros(out_size, in_size, dtype=dtype, device=device)
    rows = torch.arange(out_size, device=device)
    m.index_put_((rows, i0), w0, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m


def upsample(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """Bilinear upsampling of (N, C, h, w) as two matrix products (differentiable to any order
    and under every torch.func transform); equal to F.interpolate up to rounding."""
    ry = interpolation_matrix(x.shape[2], size[0], align_corners, x.dtype, x.device)
    rx = interpolation_matrix(x.shape[3], size[1], align_corners, x.dtype, x.device)
    return torch.einsum("Yy,ncyx,Xx->ncYX", ry, x, rx)
