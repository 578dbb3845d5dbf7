"""Shared helpers of the pruning tests: a conv layer, and every row of its explicit regression
(unfolded patches and outputs), the ground truth the Gram statistics are checked against."""

import torch.nn.functional as F
from torch import nn


def _conv(c, n, k=3, stride=1, padding=1, dilation=1, device="cpu", bias=True):
    conv = nn.Conv2d(c, n, k, stride=stride, padding=padding, dilation=dilation, bias=bias).to(device)
    return conv


def _explicit_rows(conv, x):
    """Every row of the layer: patches Xf (rows, cK) and targets Y (rows, n) without bias."""
    u = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    xf = u.transpose(1, 2).reshape(-1, u.shape[1]).double()
    y = F.conv2d(x, conv.weight.detach(), None, conv.stride, conv.padding, conv.dilation)
    yf = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
    return xf, yf, y
