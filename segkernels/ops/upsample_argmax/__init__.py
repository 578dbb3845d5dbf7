"""The argmax of bilinearly upsampled logits without the upsampled logits: full-resolution
predictions from an FCN's low-resolution output.

``upsample_argmax(logits, size)`` equals ``F.interpolate(logits, size, mode="bilinear",
align_corners=...).argmax(1)`` up to near-ties, reading the logits once and writing only the
(N, H, W) index map. CPU: C++ (csrc/upsample_argmax). CUDA: Triton (triton.py).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from ... import _library
from ..._checks import ArgumentTypeError, ArgumentValueError, check_bool, check_int, check_tensor
from . import registration  # noqa: F401  (fake kernel and vmap rule)
from .reference import reference_upsample_argmax

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernel)

__all__ = ["upsample_argmax", "reference_upsample_argmax"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _size(size) -> list:
    if isinstance(size, (tuple, list)):  # torch.Size included
        if len(size) != 2:
            raise ArgumentValueError(f"size must be (H, W), got {tuple(size)!r}")
        return [check_int(s, "size", 1) for s in size]
    raise ArgumentTypeError(f"size must be a pair of ints (H, W), got {type(size).__name__}")


def upsample_argmax(logits: torch.Tensor, size: Union[Sequence[int], torch.Size], *,
                    align_corners: bool = False) -> torch.Tensor:
    """Class map (N, H, W) int64 of the logits bilinearly resized to size, as
    ``F.interpolate(logits, size, mode="bilinear", align_corners=align_corners).argmax(1)``.

    Args:
        logits: (N, C, h, w) float16/bfloat16/float32/float64, any layout (channels_last
            included). Interpolation runs in float32 (float64 for float64 logits).
        size: (H, W), usually the label map's size; any positive size (bilinear, no
            antialiasing, as F.interpolate).
        align_corners: as F.interpolate.

    Ties go to the lowest class and NaN counts as the largest value, as torch.argmax. The
    interpolation's rounding may differ from F.interpolate's, so a prediction may differ from
    the eager one where the two largest interpolated logits are equal to rounding.
    Not differentiable (an index map).
    """
    check_tensor(logits, "logits")
    if logits.dtype not in _FLOAT_DTYPES:
        raise ArgumentTypeError(f"logits must be a floating tensor (float16, bfloat16, float32 or float64), got "
                                f"{logits.dtype}")
    if logits.dim() != 4 or 0 in logits.shape[1:]:
        raise ArgumentValueError(f"logits must be (N, C, h, w) with C, h, w >= 1, got {tuple(logits.shape)}")
    out_size = _size(size)
    align_corners = check_bool(align_corners, "align_corners")
    if not _library.use_kernel("upsample_argmax", logits.device, GPU_KERNEL):
        return reference_upsample_argmax(logits, out_size, align_corners)
    return torch.ops.segkernels.upsample_argmax.default(logits, out_size, align_corners)
