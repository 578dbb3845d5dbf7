"""Plain-PyTorch references of max-pooling with indices and max-unpooling, and the conversions
between compact in-window offsets and plane-flat indices."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "compact_to_flat_indices",
    "flat_to_compact_indices",
    "reference_max_pool_with_indices",
    "reference_max_unpool",
]


def _axis_coords(nd: int, sizes: Sequence[int], device) -> List[torch.Tensor]:
    """Broadcastable coordinate grids over the spatial axes of an (N, C, *sizes) tensor."""
    coords = []
    for i, n in enumerate(sizes):
        shape = [1, 1] + [1] * nd
        shape[2 + i] = n
        coords.append(torch.arange(n, device=device).view(shape))
    return coords


def compact_to_flat_indices(
    indices: torch.Tensor,
    full_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """Converts compact uint8 in-window offsets to int64 plane-flat indices (-1 where the offset
    is >= the window size or its tap lies outside the full map)."""
    nd = len(kernel_size)
    off = indices.long()
    pooled_coords = _axis_coords(nd, indices.shape[2:], indices.device)
    flat = torch.zeros_like(off)
    valid = off < math.prod(kernel_size)
    rem = off
    for i in range(nd):
        inner = math.prod(kernel_size[i + 1 :])
        tap = rem // inner
        rem = rem - tap * inner
        coord = pooled_coords[i] * stride[i] - padding[i] + tap * dilation[i]
        valid = valid & (coord >= 0) & (coord < full_size[i])
        flat = flat * full_size[i] + coord
    return torch.where(valid, flat, torch.full_like(flat, -1))


def flat_to_compact_indices(
    indices: torch.Tensor, full_size: Sequence[int], kernel_size, stride, padding, dilation
) -> torch.Tensor:
    """Converts int64 plane-flat indices from max-pooling to compact uint8 in-window offsets."""
    nd = len(kernel_size)
    pooled_coords = _axis_coords(nd, indices.shape[2:], indices.device)
    rem = indices
    coords = []
    for i in reversed(range(nd)):
        coords.append(rem % full_size[i])
        rem = rem // full_size[i]
    coords.reverse()
    off = torch.zeros_like(indices)
    for i in range(nd):
        tap = (coords[i] - (pooled_coords[i] * stride[i] - padding[i])) // dilation[i]
        off = off * kernel_size[i] + tap
    return off.to(torch.uint8)


def reference_max_pool_with_indices(
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool = False,
    compact: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ATen's max-pooling with indices, plus the compact form derived from it."""
    nd = len(kernel_size)
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    values, indices = pool(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    if compact:
        indices = flat_to_compact_indices(indices, input.shape[2:], kernel_size, stride, padding, dilation)
    return values, indices


def reference_max_unpool(
    input: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_size: Sequence[int],
) -> torch.Tensor:
    """Unpooling by the documented rule: latest entry in scan order wins; zeros elsewhere."""
    n, c = input.shape[:2]
    full = math.prod(output_size)
    if n * c == 0 or full == 0:  # nothing to write (and nothing to reshape by)
        return input.new_zeros((n, c, *output_size))
    if indices.dtype == torch.uint8:
        flat = compact_to_flat_indices(indices, output_size, kernel_size, stride, padding, dilation)
    else:
        flat = indices
    flat = flat.reshape(n * c, -1)
    if bool(((flat < 0) | (flat >= full)).any()):
        raise IndexError("max_unpool: indices hold entries outside the output")
    values = input.reshape(n * c, -1)
    order = torch.arange(flat.shape[1], device=input.device).expand_as(flat)
    winner = torch.full((n * c, full), -1, dtype=torch.long, device=input.device)
    winner.scatter_reduce_(1, flat, order, reduce="amax", include_self=True)
    gathered = values.gather(1, winner.clamp(min=0))
    out = torch.where(winner >= 0, gathered, torch.zeros((), dtype=input.dtype, device=input.device))
    return out.reshape(n, c, *output_size)

