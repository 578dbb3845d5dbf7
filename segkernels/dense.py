"""Dense evaluation of a strided network: OverFeat's and FCN's shift-and-stitch, and OverFeat's
offset max-pooling."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._checks import ArgumentTypeError, ArgumentValueError, check_float_tensor, check_int, check_tensor
from .ops.max_unpool import max_pool2d_with_indices

__all__ = ["shift_and_stitch", "offset_max_pool2d"]


def shift_and_stitch(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, factor: int, *,
                     max_batch: Optional[int] = None) -> torch.Tensor:
    """Dense output of a network of output stride `factor` by evaluating it on shifted inputs and
    interleaving the outputs (OverFeat; FCN section 3.2).

    x (N, C, H, W) is padded with factor - 1 zeros at the bottom and right; for each shift (dy,
    dx) in [0, factor)^2, fn sees x_pad[..., dy:dy + H, dx:dx + W], and the result's
    [..., factor * i + dy, factor * j + dx] is that output's [..., i, j]. fn maps (B, C, H, W) to
    (B, C', h, w), the same (h, w) for every shift. Returns (N, C', factor * h, factor * w). For
    a stride-factor convolution this equals the same convolution at stride 1 on the padded
    input (cropped to that size): factor^2 evaluations give the stride-1 output.

    The shifts run in batches of at most max_batch images per call of fn (all N * factor^2 at
    once by default). Differentiable through fn.
    """
    if not callable(fn):
        raise ArgumentTypeError(f"fn must be callable, got {type(fn).__name__}")
    check_tensor(x, "x")
    if x.dim() != 4:
        raise ArgumentValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    factor = check_int(factor, "factor", 1)
    if max_batch is not None:
        max_batch = check_int(max_batch, "max_batch", 1)
    n, _, H, W = x.shape
    if factor == 1:
        return fn(x)
    pad = F.pad(x, (0, factor - 1, 0, factor - 1))
    # Shift-major batch: [(dy, dx) for dy, for dx] x N images.
    shifted = torch.cat([pad[..., dy:dy + H, dx:dx + W] for dy in range(factor) for dx in range(factor)])
    chunk = max(1, shifted.shape[0]) if max_batch is None else max_batch
    # An empty batch still goes through fn once, for the output's channels and size.
    outs = [fn(shifted[i:i + chunk]) for i in range(0, max(1, shifted.shape[0]), chunk)]
    for i, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.dim() != 4:
            raise ArgumentValueError(f"fn must return (B, C', h, w) tensors, got {getattr(o, 'shape', type(o))}")
        expected = max(0, min(chunk, shifted.shape[0] - i * chunk))
        if o.shape[0] != expected:
            raise ArgumentValueError(f"fn must keep the batch: got {o.shape[0]} outputs for {expected} inputs")
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if n == 0:
        return out.new_empty((0, out.shape[1], factor * out.shape[2], factor * out.shape[3]))
    c2, h, w = out.shape[1:]
    out = out.view(factor, factor, n, c2, h, w)  # (dy, dx, N, C', i, j)
    # dense[n, c, factor * i + dy, factor * j + dx] = out[dy, dx, n, c, i, j]
    return out.permute(2, 3, 4, 0, 5, 1).reshape(n, c2, h * factor, w * factor)


def offset_max_pool2d(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """OverFeat's offset max-pooling: a k x k, stride-k max-pooling at each of the k^2 offsets.

    Returns (N, k * k, C, ho, wo) with ho = (H - k + 1) // k (wo likewise), where entry
    dy * k + dx is ``F.max_pool2d(x[..., dy:dy + ho * k, dx:dx + wo * k], k, k)``. Those are
    exactly the stride-1 k x k windows at rows and columns below k * ho and k * wo, so one
    stride-1 pooling pass (separable, compact indices for the backward) gives them all,
    rearranged by offset. Differentiable (the gradient goes where F.max_pool2d's would).
    """
    check_float_tensor(x, "x")
    if x.dim() != 4:
        raise ArgumentValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    k = check_int(kernel_size, "kernel_size", 1)
    n, c, H, W = x.shape
    ho, wo = (H - k + 1) // k, (W - k + 1) // k
    if ho < 1 or wo < 1:
        raise ArgumentValueError(f"x's map {(H, W)} is too small for offset pooling with kernel_size={k} "
                                 f"(needs at least {2 * k - 1} rows and columns)")
    windows = max_pool2d_with_indices(x[..., :k * ho + k - 1, :k * wo + k - 1], k, 1, compact=True)[0]
    # windows[..., k * i + dy, k * j + dx] is offset (dy, dx)'s output (i, j).
    out = windows.reshape(n, c, ho, k, wo, k).permute(0, 3, 5, 1, 2, 4)
    return out.reshape(n, k * k, c, ho, wo)
