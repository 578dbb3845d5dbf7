"""Pooling geometry shared by the public API and the fake kernels: argument normalisation (as
F.max_pool*d and F.max_unpool*d take them), pooled and unpooled sizes, and the layout the
kernels keep."""

from __future__ import annotations

import numbers
from typing import List, Sequence, Tuple, Union

import torch

from ..._checks import ArgumentTypeError, ArgumentValueError, channels_last_format

IntOrSeq = Union[int, Sequence[int]]


def _tuple(value: IntOrSeq, nd: int, name: str, allow_single: bool = True) -> Tuple[int, ...]:
    # Plain ints and tuples or lists of them first: the numbers.Integral checks below go through
    # ABC machinery, about 4 us per argument, a tenth of a small map's whole call.
    if type(value) is int:
        return (value,) * nd
    if type(value) in (tuple, list) and len(value) == nd and all(type(v) is int for v in value):
        return tuple(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value),) * nd
    try:
        seq = tuple(value) if not isinstance(value, str) else None  # type: ignore[arg-type]
    except TypeError:
        seq = None
    if seq is None or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in seq):
        raise ArgumentTypeError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    if len(seq) == 1 and allow_single:  # F.max_pool*d broadcasts (k,); F.max_unpool*d raises
        seq = seq * nd
    if len(seq) != nd:
        raise ArgumentValueError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    return tuple(int(v) for v in seq)


def pool_params(nd, kernel_size, stride, padding, dilation, pooling=True):
    kernel = _tuple(kernel_size, nd, "kernel_size", pooling)
    # F.max_pool*d treats stride=None and stride=[] alike: default to the kernel size.
    no_stride = stride is None or (pooling and isinstance(stride, (list, tuple)) and len(stride) == 0)
    stride_t = kernel if no_stride else _tuple(stride, nd, "stride", pooling)
    pad = _tuple(padding, nd, "padding", pooling)
    dil = _tuple(dilation, nd, "dilation", pooling)
    if any(k <= 0 for k in kernel):
        raise ArgumentValueError(f"kernel_size must be positive, got {kernel}")
    if any(s <= 0 for s in stride_t):
        raise ArgumentValueError(f"stride must be positive, got {stride_t}")
    if any(d <= 0 for d in dil):
        raise ArgumentValueError(f"dilation must be positive, got {dil}")
    # Unpooling takes a negative padding (only the default output size uses it), as F.max_unpool*d.
    if pooling and any(p < 0 for p in pad):
        raise ArgumentValueError(f"padding must be non-negative, got {pad}")
    if pooling and any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ArgumentValueError(f"padding must be at most half of kernel_size, got padding={pad}, kernel_size={kernel}")
    return kernel, stride_t, pad, dil


def pooled_extent(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Pooled length of one axis (ATen's rule, including its ceil_mode correction)."""
    span = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def default_unpool_size(pooled: int, k: int, s: int, p: int, d: int) -> int:
    return (pooled - 1) * s - 2 * p + d * (k - 1) + 1


def unpool_output_size(in_spatial, kernel, stride, pad, dil, output_size) -> List[int]:
    nd = len(kernel)
    default = [default_unpool_size(in_spatial[i], kernel[i], stride[i], pad[i], dil[i]) for i in range(nd)]
    if output_size is None:
        return default
    try:
        size = list(output_size)
    except TypeError:
        raise ArgumentTypeError(f"output_size must be a sequence of ints, got {output_size!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        raise ArgumentTypeError(f"output_size must be a sequence of ints, got {output_size!r}")
    size = [int(v) for v in size]
    if len(size) == nd + 2:
        size = size[2:]
    if len(size) != nd:
        raise ArgumentValueError(
            f"output_size should be a sequence containing {nd} or {nd + 2} elements, but it has a length of {len(size)}"
        )
    for i in range(nd):
        lo, hi = default[i] - stride[i], default[i] + stride[i]
        if not lo < size[i] < hi:
            raise ArgumentValueError(f'invalid output_size "{list(output_size)}" (dim {i} must be between {lo} and {hi})')
    return size


def check_output_size(size: Sequence[int], input: torch.Tensor) -> None:
    if any(v < 0 for v in size):
        raise ArgumentValueError(
            f"the unpooled size {list(size)} of input {tuple(input.shape)} is negative: check kernel_size, stride "
            "and padding"
        )


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels keep: channels-last when the tensor is so and not plainly contiguous."""
    return channels_last_format(t) or torch.contiguous_format

