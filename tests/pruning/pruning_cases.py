"""Shared helpers of the pruning tests: a conv layer, and every row of its explicit regression
(unfolded patches and outputs), the ground truth the Gram statistics are checked against; a small
VGG-style network to prune; a free port for the gloo ranks."""

import socket

import torch
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


def _vgg(device="cpu", seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10), nn.ReLU(),
    ).to(device)
    with torch.no_grad():  # channels of very different importance, and non-trivial BN statistics
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.exp(2 * torch.randn(m.out_channels, 1, 1, 1, device=device)))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net.eval()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
