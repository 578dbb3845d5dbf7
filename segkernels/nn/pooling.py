"""Modules over the segkernels ops, drop-in for their torch.nn namesakes."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.max_unpool import (
    IntOrSeq,
    max_pool2d_with_indices,
    max_pool3d_with_indices,
    max_unpool2d,
    max_unpool3d,
)

__all__ = ["MaxPool2d", "MaxPool3d", "MaxUnpool2d", "MaxUnpool3d"]


class _MaxPoolNd(nn.Module):
    _pool = staticmethod(max_pool2d_with_indices)

    def __init__(
        self,
        kernel_size: IntOrSeq,
        stride: Optional[IntOrSeq] = None,
        padding: IntOrSeq = 0,
        dilation: IntOrSeq = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        compact: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode
        self.compact = compact

    def forward(self, input: torch.Tensor):
        values, indices = type(self)._pool(
            input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, compact=self.compact
        )
        return (values, indices) if self.return_indices else values

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}, compact={self.compact}"
        )


class MaxPool2d(_MaxPoolNd):
    """Like nn.MaxPool2d; ``compact=True`` returns uint8 in-window indices (1/8 the memory)."""

    _pool = staticmethod(max_pool2d_with_indices)


class MaxPool3d(_MaxPoolNd):
    """Like nn.MaxPool3d; ``compact=True`` returns uint8 in-window indices."""

    _pool = staticmethod(max_pool3d_with_indices)


class _MaxUnpoolNd(nn.Module):
    _unpool = staticmethod(max_unpool2d)
    _nd = 2

    def __init__(
        self,
        kernel_size: IntOrSeq,
        stride: Optional[IntOrSeq] = None,
        padding: IntOrSeq = 0,
        *,
        dilation: IntOrSeq = 1,
        check_indices: bool = True,
    ) -> None:
        super().__init__()
        # Tuples, as torch.nn.MaxUnpool*d keeps them.
        self.kernel_size = _as_tuple(kernel_size, self._nd)
        self.stride = _as_tuple(stride if stride is not None else kernel_size, self._nd)
        self.padding = _as_tuple(padding, self._nd)
        self.dilation = _as_tuple(dilation, self._nd)
        self.check_indices = check_indices

    def forward(
        self, input: torch.Tensor, indices: torch.Tensor, output_size: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        return type(self)._unpool(
            input,
            indices,
            self.kernel_size,
            self.stride,
            self.padding,
            output_size,
            dilation=self.dilation,
            check_indices=self.check_indices,
        )

    def extra_repr(self) -> str:
        text = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1,) * self._nd:  # torch.nn's repr, plus what it lacks when it matters
            text += f", dilation={self.dilation}"
        return text


def _as_tuple(value, nd: int):
    """torch.nn.modules.utils._ntuple's rule: an iterable stays as it is (as a tuple), a scalar repeats."""
    try:
        return tuple(value)
    except TypeError:
        return (value,) * nd


class MaxUnpool2d(_MaxUnpoolNd):
    """Like nn.MaxUnpool2d; also takes compact uint8 indices (pass the pooling's dilation)."""

    _unpool = staticmethod(max_unpool2d)


class MaxUnpool3d(_MaxUnpoolNd):
    """Like nn.MaxUnpool3d; also takes compact uint8 indices."""

    _unpool = staticmethod(max_unpool3d)
    _nd = 3
