"""Architecture blocks of the seed systems on compact-index pooling: light-weight RefineNet's
chained residual pooling, FRRN's full-resolution residual unit, and FCN's learnable bilinear
upsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ArgumentValueError, check_bool, check_int, check_tensor
from ..ops.max_unpool import max_pool2d_with_indices

__all__ = ["ChainedResidualPooling", "FRRU", "BilinearUpsample", "bilinear_kernel"]


class ChainedResidualPooling(nn.Module):
    """Light-weight RefineNet's chained residual pooling (Nekrasov et al., BMVC 2018; RefineNet,
    CVPR 2017): per stage, top = conv1x1(maxpool(top)) and x = x + top, the pooling
    kernel_size x kernel_size, stride 1, padding kernel_size // 2, the 1 x 1 convolutions
    without bias. The poolings keep uint8 in-window indices for their backward, not the input
    and int64 indices that nn.MaxPool2d keeps: the same values and gradients as the plain block,
    about a third of its autograd-saved bytes. forward(x (N, channels, H, W)) -> same shape.
    Attribute names of the convolutions follow the official code ("{i}_outvar_dimred")."""

    def __init__(self, channels: int, stages: int = 4, kernel_size: int = 5) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", 1)
        self.stages = check_int(stages, "stages", 1)
        self.kernel_size = check_int(kernel_size, "kernel_size", 1)
        if self.kernel_size % 2 == 0:
            raise ArgumentValueError(f"kernel_size must be odd (the map keeps its size), got {kernel_size}")
        for i in range(self.stages):
            setattr(self, f"{i + 1}_outvar_dimred", nn.Conv2d(channels, channels, 1, bias=False))

    def convs(self):
        return [getattr(self, f"{i + 1}_outvar_dimred") for i in range(self.stages)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ArgumentValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        k = self.kernel_size
        top = x
        for conv in self.convs():
            top = conv(max_pool2d_with_indices(top, k, 1, k // 2, compact=True)[0])
            x = top + x
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stages={self.stages}, kernel_size={self.kernel_size}"


class FRRU(nn.Module):
    """FRRN's full-resolution residual unit (Pohlen et al., CVPR 2017).

    forward(y, z) -> (y', z'): y (N, in_channels, H / scale, W / scale) is the pooling stream,
    z (N, residual_channels, H, W) the full-resolution residual stream. z is max-pooled by
    scale (compact uint8 indices), concatenated with y, and passed through two 3 x 3
    convolution-BatchNorm-ReLU layers (out_channels, no conv bias) to give y'; a 1 x 1
    convolution of y' to residual_channels (with bias), upsampled by scale (nearest), is added
    to z to give z'. As the paper's unit and the common PyTorch port (pytorch-semseg's FRRU),
    with residual_channels=32."""

    def __init__(self, in_channels: int, out_channels: int, scale: int, residual_channels: int = 32) -> None:
        super().__init__()
        self.in_channels = check_int(in_channels, "in_channels", 1)
        self.out_channels = check_int(out_channels, "out_channels", 1)
        self.scale = check_int(scale, "scale", 1)
        self.residual_channels = check_int(residual_channels, "residual_channels", 1)
        c = in_channels + residual_channels
        self.conv1 = nn.Sequential(nn.Conv2d(c, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv_res = nn.Conv2d(out_channels, residual_channels, 1)

    def forward(self, y: torch.Tensor, z: torch.Tensor):
        check_tensor(y, "y")
        check_tensor(z, "z")
        s = self.scale
        if z.dim() != 4 or z.shape[1] != self.residual_channels or z.shape[2] % s or z.shape[3] % s:
            raise ArgumentValueError(f"z must be (N, {self.residual_channels}, H, W) with H and W multiples of "
                                     f"scale={s}, got {tuple(z.shape)}")
        expected = (z.shape[0], self.in_channels, z.shape[2] // s, z.shape[3] // s)
        if tuple(y.shape) != expected:
            raise ArgumentValueError(f"y must be {expected} for z {tuple(z.shape)}, got {tuple(y.shape)}")
        pooled = max_pool2d_with_indices(z, s, s, compact=True)[0] if s > 1 else z
        y_prime = self.conv2(self.conv1(torch.cat([y, pooled], dim=1)))
        res = self.conv_res(y_prime)
        if s > 1:
            res = F.interpolate(res, scale_factor=s, mode="nearest")
        return y_prime, z + res

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, scale={self.scale}, "
                f"residual_channels={self.residual_channels}")


def bilinear_kernel(factor: int, dtype=torch.float32) -> torch.Tensor:
    """FCN's bilinear upsampling filter for a transposed convolution of stride factor: the
    (2 * factor - factor % 2)^2 outer product of 1 - |i - center| / factor."""
    factor = check_int(factor, "factor", 1)
    size = 2 * factor - factor % 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = 1 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    return torch.outer(og, og).to(dtype)


class BilinearUpsample(nn.Module):
    """FCN's in-network upsampling: a depthwise transposed convolution of stride factor whose
    kernel starts as bilinear interpolation (bilinear_kernel) and is learnt with the network
    (learnable=True; a fixed buffer otherwise). Output (N, C, factor * H, factor * W), equal to
    F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False) at
    initialisation away from a border of factor pixels (the transposed convolution pads with
    zeros where F.interpolate clamps)."""

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", 1)
        self.factor = check_int(factor, "factor", 1)
        self.learnable = check_bool(learnable, "learnable")
        kernel = bilinear_kernel(factor).expand(channels, 1, -1, -1).clone()
        if learnable:
            self.weight = nn.Parameter(kernel)
        else:
            self.register_buffer("weight", kernel)
        self.padding = (kernel.shape[-1] - factor) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor(x, "x")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ArgumentValueError(f"x must be (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.factor, padding=self.padding,
                                  groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, learnable={self.learnable}"
