"""Convolution over a label map without its one-hot tensor, and the class fractions of a
downsampled label map.

A convolution over a one-hot map (label-structure autoencoders, SPADE's label-conditioned
normalisation) is a gather: each output position sums, for each tap, the weight column of the
class found there. :func:`one_hot_conv2d` computes exactly ``F.conv2d(one_hot(labels), weight,
bias, ...)`` that way, C times fewer operations and never an (N, C, H, W) tensor;
:func:`label_fractions` is ``F.avg_pool2d(one_hot(labels), factor)``, the soft labels of a
downsampled map.

Gradients: weight and bias (labels get none). They are sums in a fixed order on every device
(on the CPU, float32 sums over runs of at least 512 positions added into float64 totals, all
float64 for float64 weights; float32 on CUDA; no atomics), so they are bitwise repeatable.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ... import _library
from ..._checks import (
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_device,
    check_float_tensor,
    check_ignore_index,
    check_int,
    check_tensor,
    is_integer_tensor,
)
from .reference import one_hot_map, reference_label_fractions, reference_one_hot_conv2d
from .registration import output_size

if _library.kernels_available():
    from .registration import OneHotConvFunction

    if _library.triton_available():
        from . import triton as _triton  # noqa: F401  (registers the CUDA kernels)

__all__ = [
    "one_hot_conv2d",
    "label_fractions",
    "one_hot_map",
    "reference_one_hot_conv2d",
    "reference_label_fractions",
]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)

# Integer dtypes the kernels read in place; others (uint16/32/64) are converted to int64.
_NATIVE_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

IntPair = Union[int, Sequence[int]]


def _pair(value, name: str, minimum: int) -> list:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ArgumentValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return [check_int(v, name, minimum) for v in value]
    v = check_int(value, name, minimum)
    return [v, v]


def _check_labels(labels, name: str = "labels") -> torch.Tensor:
    check_tensor(labels, name)
    if not is_integer_tensor(labels):
        raise ArgumentTypeError(f"{name} must be an integer tensor of class indices, got {labels.dtype}")
    if labels.dim() != 3:
        raise ArgumentValueError(f"{name} must be (N, H, W), got {tuple(labels.shape)}")
    return labels if labels.dtype in _NATIVE_LABEL_DTYPES else labels.long()


def _same_padding(kernel, dilation, stride):
    """padding='same' as F.conv2d: total d * (k - 1) per side pair, the odd one extra at the end."""
    if stride != [1, 1]:
        raise ArgumentValueError(f"padding='same' needs stride 1 (as F.conv2d), got stride={stride}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    return [t // 2 for t in total], [t - t // 2 * 2 for t in total]


def one_hot_conv2d(
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    *,
    ignore_index: int = 255,
) -> torch.Tensor:
    """``F.conv2d(one_hot(labels), weight, bias, stride, padding, dilation)`` without the one-hot map.

    Args:
        labels: (N, H, W) class indices, any integer dtype, any layout. Pixels equal to
            ignore_index are all-zero in the one-hot map (as is the zero padding).
        weight: (O, C, kh, kw) float16/bfloat16/float32/float64, C the number of classes.
        bias: (O,) in weight's dtype, or None.
        stride, padding, dilation: ints or pairs, as F.conv2d; padding may also be 'valid' or
            'same' (stride 1).
        ignore_index: the label of pixels that belong to no class.

    Returns:
        (N, O, Ho, Wo) contiguous, in weight's dtype (under torch.autocast, the autocast dtype,
        as F.conv2d). Differentiable in weight and bias, with bitwise repeatable gradients.

    Raises IndexError (also a RuntimeError) for a label outside [0, C) that is not ignore_index;
    on CUDA that check costs one host synchronisation per call.
    """
    check_float_tensor(weight, "weight")
    if weight.dim() != 4 or weight.shape[1] == 0 or weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ArgumentValueError(
            f"weight must be (out_channels, num_classes, kh, kw) with at least one class and tap, got {tuple(weight.shape)}"
        )
    labels = _check_labels(labels)
    check_device(labels, weight.device, "labels")
    ignore_index = check_ignore_index(ignore_index)
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            padding, extra = _same_padding(weight.shape[2:], dilation, stride)
            if any(extra):
                # F.conv2d puts the odd pixel of padding at the end; ignored labels there are the same zeros.
                if not _fits(labels.dtype, ignore_index):
                    labels = labels.long()
                labels = torch.nn.functional.pad(labels, (0, extra[1], 0, extra[0]), value=ignore_index)
        else:
            raise ArgumentValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        padding = _pair(padding, "padding", 0)
    if bias is not None:
        check_float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ArgumentValueError(f"bias must be (out_channels,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_device(bias, weight.device, "bias")
    if _library.autocast_on(weight.device):  # F.conv2d's autocast policy: the lower-precision dtype
        dtype = torch.get_autocast_dtype(weight.device.type)
        weight = weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif bias is not None and bias.dtype != weight.dtype:
        raise ArgumentTypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    _, _, ho, wo = output_size(labels.shape, weight.shape, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ArgumentValueError(
            f"the dilated kernel ({dilation[0] * (weight.shape[2] - 1) + 1}, {dilation[1] * (weight.shape[3] - 1) + 1}) "
            f"is larger than the padded labels ({labels.shape[1] + 2 * padding[0]}, {labels.shape[2] + 2 * padding[1]})"
        )
    # The CUDA kernels accumulate in float32: float64 on CUDA runs the reference.
    kernel = weight.dtype != torch.float64 or weight.device.type != "cuda"
    try:
        if kernel and _library.use_kernel("one_hot_conv2d", weight.device, GPU_KERNEL):
            return _library.call_op(torch.ops.segkernels.one_hot_conv2d.default, OneHotConvFunction, labels,
                                    weight, bias, stride, padding, dilation, ignore_index)
        return reference_one_hot_conv2d(labels, weight, bias, stride, padding, dilation, ignore_index)
    except IndexError as exc:  # a label outside [0, C): the kernels' and the reference's check
        raise ArgumentIndexError(f"labels: {exc}") from None


def _fits(dtype: torch.dtype, value: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max


def label_fractions(labels: torch.Tensor, num_classes: int, factor: int, *, ignore_index: int = 255) -> torch.Tensor:
    """The share of each class in every factor x factor block of a label map:
    ``F.avg_pool2d(one_hot(labels), factor)`` without the one-hot map.

    Args:
        labels: (N, H, W) class indices, any integer dtype and layout.
        num_classes: C.
        factor: block side (>= 1); the last H % factor rows and W % factor columns are dropped,
            as avg_pool2d does.
        ignore_index: pixels in no class (they count in the block's area, not in any class).

    Returns:
        (N, C, H // factor, W // factor) float32. Not differentiable (labels are indices).
        Raises IndexError for a label outside [0, C) that is not ignore_index.
    """
    labels = _check_labels(labels)
    num_classes = check_int(num_classes, "num_classes", 1)
    factor = check_int(factor, "factor", 1)
    ignore_index = check_ignore_index(ignore_index)
    if min(labels.shape[1:]) < factor:
        raise ArgumentValueError(f"labels (H, W) = {tuple(labels.shape[1:])} must be at least factor = {factor} on "
                                 "each side (as avg_pool2d's output may not be empty)")
    try:
        if _library.use_kernel("label_fractions", labels.device, GPU_KERNEL):
            return torch.ops.segkernels.label_fractions.default(labels, num_classes, factor, ignore_index)
        return reference_label_fractions(labels, num_classes, factor, ignore_index)
    except IndexError as exc:
        raise ArgumentIndexError(f"labels: {exc}") from None
