"""Modules over the segkernels ops, drop-in for their torch.nn namesakes."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .max_unpool import (
    IntOrSeq,
    max_pool2d_with_indices,
    max_pool3d_with_indices,
    max_unpool2d,
    max_unpool3d,
)

from .segnet import SegNet  # noqa: E402

__all__ = ["MaxPool2d", "MaxPool3d", "MaxUnpool2d", "MaxUnpool3d", "SegNet"]


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
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
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
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


class MaxUnpool2d(_MaxUnpoolNd):
    """Like nn.MaxUnpool2d; also takes compact uint8 indices (pass the pooling's dilation)."""

    _unpool = staticmethod(max_unpool2d)


class MaxUnpool3d(_MaxUnpoolNd):
    """Like nn.MaxUnpool3d; also takes compact uint8 indices."""

    _unpool = staticmethod(max_unpool3d)

# Distillation losses (segkernels/kd_loss.py, segkernels/self_regulation.py)
from .self_regulation import ChannelWiseKDLoss, KDLoss, SelfRegulationLoss  # noqa: E402

__all__ += ["KDLoss", "ChannelWiseKDLoss", "SelfRegulationLoss"]

from .instancefcn import InstanceFCNHead  # noqa: E402

__all__ += ["InstanceFCNHead"]
