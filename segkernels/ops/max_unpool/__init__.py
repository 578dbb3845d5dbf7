"""SegNet max-pooling with indices and max-unpooling by indices (2-D and 3-D).

Indices come in two forms:

* int64 plane-flat indices, exactly as ``F.max_pool2d(..., return_indices=True)`` returns them;
* compact uint8 in-window offsets ``(dz * kH + dy) * kW + dx`` (``compact=True``): 1/8 of the
  index memory. Unpooling compact indices needs the pooling's kernel_size, stride, padding and
  dilation.

Unpooling rule (deterministic everywhere): an output element takes the value of the entry
that names it; when several entries name the same element, the one latest in scan order
(largest pooled flat index) wins, as PyTorch's CPU kernel does. For indices produced by
max-pooling every such entry holds the same value, so the result equals ``F.max_unpool2d`` on
either device.

``check_indices=True`` (default) validates every index; on CUDA this costs one host
synchronisation (reading back a match count the kernel accumulates as it runs) and, only when
that count is off, one extra pass over the indices. With ``check_indices=False`` there is no
synchronisation; invalid entries are then skipped (never written out of bounds), and int64
entries that point outside their own pooling window are skipped too (they are valid for
PyTorch, so keep the check on for indices that did not come from max-pooling).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ... import _library
from ..._checks import (
    FLOAT_DTYPES,
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_bool,
    check_tensor,
    in_suggested_layout,
    is_integer_tensor,
)
from .geometry import (
    IntOrSeq,
    check_output_size as _check_output_size,
    pool_params as _pool_params,
    pooled_extent,
    unpool_output_size as _unpool_output_size,
)
from .reference import compact_to_flat_indices, reference_max_pool_with_indices, reference_max_unpool

if _library.kernels_available():
    from .registration import MaxPoolFunction, MaxUnpoolFunction


__all__ = [
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_unpool2d",
    "max_unpool3d",
    "reference_max_pool_with_indices",
    "reference_max_unpool",
    "compact_to_flat_indices",
]

GPU_KERNEL = "cuda"  # what runs CUDA tensors (see _library.use_kernel)


# ----------------------------------------------------------------------------------------------
# Argument handling


def _check_input(input: torch.Tensor, nd: int, name: str = "input", integers: bool = False) -> None:
    check_tensor(input, name)
    if not (input.dtype in FLOAT_DTYPES or (integers and is_integer_tensor(input))):
        kinds = "a floating or integer" if integers else "a floating"
        raise ArgumentTypeError(f"{name} must be {kinds} tensor, got {input.dtype}")
    if input.dim() not in (nd + 1, nd + 2):
        shape = "(N, C, D, H, W) or (C, D, H, W)" if nd == 3 else "(N, C, H, W) or (C, H, W)"
        raise ArgumentValueError(f"{name} must have shape {shape}, got {tuple(input.shape)}")


# ----------------------------------------------------------------------------------------------
# Public API


def _unbatched(input: torch.Tensor, nd: int) -> bool:
    return input.dim() == nd + 1


def _max_pool_nd(nd, input, kernel_size, stride, padding, dilation, ceil_mode, compact):
    # Integer maps too, as PyTorch's CPU pooling takes them (its unpooling does not).
    _check_input(input, nd, integers=True)
    check_bool(ceil_mode, "ceil_mode")
    check_bool(compact, "compact")
    kernel, stride_t, pad, dil = _pool_params(nd, kernel_size, stride, padding, dilation)
    unbatched = _unbatched(input, nd)
    if 0 in (input.shape if unbatched else input.shape[1:]):
        raise ArgumentValueError(
            f"input must have a non-zero size in every dimension but the batch, got {tuple(input.shape)}"
        )
    x = input.unsqueeze(0) if unbatched else input
    if compact and math.prod(kernel) > 256:
        raise ArgumentValueError(
            f"compact=True stores uint8 in-window offsets, so the window may have at most 256 elements; "
            f"kernel_size={kernel} has {math.prod(kernel)}"
        )
    for i in range(nd):
        out = pooled_extent(x.shape[2 + i], kernel[i], stride_t[i], pad[i], dil[i], ceil_mode)
        if out <= 0:
            raise ArgumentValueError(
                f"input spatial size {tuple(x.shape[2:])} is too small for kernel_size={kernel}, "
                f"dilation={dil}, padding={pad}: the pooled size would be {out}"
            )
    # The kernels are for floating maps; integer ones take ATen's pooling (the reference).
    if x.is_floating_point() and _library.use_kernel(f"max_pool{nd}d_with_indices", x.device, GPU_KERNEL):
        # The output keeps the input's layout by its stride order, as PyTorch's pooling does.
        args = (in_suggested_layout(x), list(kernel), list(stride_t), list(pad), list(dil), ceil_mode, compact)
        values, indices = _library.call_op(torch.ops.segkernels.max_pool_with_indices.default, MaxPoolFunction, *args)
    else:
        values, indices = reference_max_pool_with_indices(x, kernel, stride_t, pad, dil, ceil_mode, compact)
    if unbatched:
        values, indices = values.squeeze(0), indices.squeeze(0)
    return values, indices


def _max_unpool_nd(nd, input, indices, kernel_size, stride, padding, output_size, dilation, check_indices):
    _check_input(input, nd)
    check_indices = check_bool(check_indices, "check_indices")
    check_tensor(indices, "indices")
    if indices.dtype not in (torch.int64, torch.uint8):
        raise ArgumentTypeError(
            f"indices must be int64 (flat, as from F.max_pool{nd}d) or uint8 (compact=True), got {indices.dtype}"
        )
    if indices.shape != input.shape:
        raise ArgumentValueError(f"indices must have the shape of input {tuple(input.shape)}, got {tuple(indices.shape)}")
    if indices.device != input.device:
        raise ArgumentValueError(f"indices must be on the device of input ({input.device}), got {indices.device}")
    # As F.max_unpool*d: every dimension after the first must be non-empty (for an unbatched
    # (C, *spatial) input too).
    if 0 in input.shape[1:]:
        raise ArgumentValueError(
            f"input must have a non-zero size in every dimension after the first, got {tuple(input.shape)}"
        )
    kernel, stride_t, pad, dil = _pool_params(nd, kernel_size, stride, padding, dilation, pooling=False)
    if indices.dtype == torch.uint8 and math.prod(kernel) > 256:
        raise ArgumentValueError(f"compact uint8 indices need a window of at most 256 elements; kernel_size={kernel}")
    unbatched = _unbatched(input, nd)
    x = input.unsqueeze(0) if unbatched else input
    idx = indices.unsqueeze(0) if unbatched else indices
    size = _unpool_output_size(x.shape[2:], kernel, stride_t, pad, dil, output_size)
    _check_output_size(size, input)
    if any(p < 0 for p in pad):
        if indices.dtype == torch.uint8:
            raise ArgumentValueError(f"compact indices need the pooling's padding, which is non-negative; got padding={pad}")
        # Then padding only sets the default size: the kernels get none, and check every index,
        # since the windows they would assume are not the ones the indices came from.
        pad, check_indices = (0,) * nd, True
    try:
        if _library.use_kernel(f"max_unpool{nd}d", x.device, GPU_KERNEL):
            args = (in_suggested_layout(x), idx, list(kernel), list(stride_t), list(pad), list(dil), size,
                    check_indices)
            out = _library.call_op(torch.ops.segkernels.max_unpool.default, MaxUnpoolFunction, *args)
        else:
            out = reference_max_unpool(x, idx, kernel, stride_t, pad, dil, size)
    except IndexError as exc:  # an index outside the output, found by the kernel (or the reference)
        raise ArgumentIndexError(f"indices: {exc}") from None
    return out.squeeze(0) if unbatched else out


def max_pool2d_with_indices(
    input: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: Optional[IntOrSeq] = None,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    ceil_mode: bool = False,
    *,
    compact: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """2-D max-pooling that also returns where each maximum came from.

    Args:
        input: (N, C, H, W) or (C, H, W), float16/bfloat16/float32/float64; NCHW or channels_last.
        kernel_size, stride (default kernel_size), padding, dilation, ceil_mode: as F.max_pool2d.
        compact: False gives int64 plane-flat indices identical to
            ``F.max_pool2d(..., return_indices=True)`` (ties and NaN included); True gives uint8
            in-window offsets ``dy * kW + dx`` (1/8 of the index memory; window <= 256 elements).

    Returns:
        (values, indices), each (N, C, H_out, W_out) in the layout of ``input``.
    """
    return _max_pool_nd(2, input, kernel_size, stride, padding, dilation, ceil_mode, compact)


def max_pool3d_with_indices(
    input: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: Optional[IntOrSeq] = None,
    padding: IntOrSeq = 0,
    dilation: IntOrSeq = 1,
    ceil_mode: bool = False,
    *,
    compact: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """3-D sibling of :func:`max_pool2d_with_indices` for (N, C, D, H, W) volumes; compact
    offsets are ``(dz * kH + dy) * kW + dx``."""
    return _max_pool_nd(3, input, kernel_size, stride, padding, dilation, ceil_mode, compact)


def max_unpool2d(
    input: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: Optional[IntOrSeq] = None,
    padding: IntOrSeq = 0,
    output_size: Optional[Sequence[int]] = None,
    *,
    dilation: IntOrSeq = 1,
    check_indices: bool = True,
) -> torch.Tensor:
    """Places each value of ``input`` at the position its index names; zeros elsewhere.

    Args:
        input: pooled map (N, C, H, W) or (C, H, W), any float dtype, NCHW or channels_last.
        indices: same shape; int64 plane-flat (as F.max_pool2d returns) or uint8 compact offsets
            (from ``compact=True``; then pass the pooling's kernel_size, stride, padding, dilation).
        output_size: (H_out, W_out) or (N, C, H_out, W_out); default
            ``(H - 1) * stride - 2 * padding + dilation * (kernel_size - 1) + 1``, and a given size
            must lie strictly within ``stride`` of it (F.max_unpool2d's rule).
        check_indices: validate every index (see the module docstring for the cost).

    Returns:
        (N, C, H_out, W_out) in the layout of ``input``. Differentiable with respect to input.

    Raises:
        TypeError / ValueError for bad arguments, IndexError for an index outside the output.
    """
    return _max_unpool_nd(2, input, indices, kernel_size, stride, padding, output_size, dilation, check_indices)


def max_unpool3d(
    input: torch.Tensor,
    indices: torch.Tensor,
    kernel_size: IntOrSeq,
    stride: Optional[IntOrSeq] = None,
    padding: IntOrSeq = 0,
    output_size: Optional[Sequence[int]] = None,
    *,
    dilation: IntOrSeq = 1,
    check_indices: bool = True,
) -> torch.Tensor:
    """3-D sibling of :func:`max_unpool2d` for (N, C, D, H, W) volumes."""
    return _max_unpool_nd(3, input, indices, kernel_size, stride, padding, output_size, dilation, check_indices)
