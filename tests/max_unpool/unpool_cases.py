"""Shared geometries, shapes and call helpers of the max_pool / max_unpool tests: random inputs
(with ties or NaN), our pooling and unpooling for a geometry, and ATen's pooling."""

import torch
import torch.nn.functional as F

import segkernels


# (kernel, stride, padding, dilation, ceil_mode): disjoint and overlapping windows, padding,
# dilation holes, stride > kernel (gaps), ceil_mode.
GEOMETRIES_2D = [
    ((2, 2), (2, 2), (0, 0), (1, 1), False),
    ((3, 3), (2, 2), (1, 1), (1, 1), True),
    ((3, 2), (1, 2), (1, 0), (1, 1), False),
    ((2, 3), (3, 4), (1, 1), (2, 1), True),
    ((3, 3), (3, 3), (1, 0), (1, 1), True),
    ((2, 2), (1, 1), (0, 0), (2, 2), False),
    ((2, 2), (2, 2), (1, 1), (1, 1), True),
    # Overlapping windows (the separable forward and the per-plane backward): RefineNet's 5 x 5
    # stride-1 pooling, an even window, and a wide window with ceil_mode.
    ((5, 5), (1, 1), (2, 2), (1, 1), False),
    ((4, 3), (1, 1), (1, 1), (1, 1), False),
    ((5, 4), (2, 1), (2, 2), (1, 1), True),
]
GEOMETRIES_3D = [
    ((2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False),
    ((3, 2, 3), (2, 2, 1), (1, 1, 1), (1, 1, 1), True),
    ((2, 2, 2), (3, 2, 3), (0, 1, 0), (2, 1, 1), False),
]
SHAPES_2D = [(2, 3, 9, 11), (1, 5, 8, 8), (3, 2, 13, 7)]
SHAPES_3D = [(2, 3, 6, 7, 9), (1, 2, 5, 8, 6)]


def _random_input(shape, dtype, device, kind="randn"):
    if kind == "ties":  # few distinct values: many equal maxima per window
        return torch.randint(-2, 3, shape, device=device).to(dtype)
    x = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if kind == "nan":
        mask = torch.rand(shape, device=device) < 0.15
        x = x.masked_fill(mask, float("nan"))
        x = x.masked_fill(torch.rand(shape, device=device) < 0.1, float("-inf"))
    return x


def _pool(x, geometry, compact=False):
    k, s, p, d, c = geometry
    fn = segkernels.max_pool2d_with_indices if len(k) == 2 else segkernels.max_pool3d_with_indices
    return fn(x, k, s, p, d, c, compact=compact)


def _unpool(v, i, geometry, output_size, **kw):
    k, s, p, d, _ = geometry
    fn = segkernels.max_unpool2d if len(k) == 2 else segkernels.max_unpool3d
    return fn(v, i, k, s, p, output_size, dilation=d, **kw)


def _aten_pool(x, geometry):
    k, s, p, d, c = geometry
    fn = F.max_pool2d if len(k) == 2 else F.max_pool3d
    return fn(x, k, s, p, d, c, return_indices=True)
