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
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ... import _library

_call = _library.call_below_autograd

IntOrSeq = Union[int, Sequence[int]]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_unpool2d",
    "max_unpool3d",
    "reference_max_pool_with_indices",
    "reference_max_unpool",
    "compact_to_flat_indices",
]


# ----------------------------------------------------------------------------------------------
# Argument handling


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
        seq = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}") from None
    if len(seq) == 1 and allow_single:  # F.max_pool*d broadcasts (k,); F.max_unpool*d raises
        seq = seq * nd
    if len(seq) != nd or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in seq):
        raise ValueError(f"{name} must be an int or a sequence of {nd} ints, got {value!r}")
    return tuple(int(v) for v in seq)


def _check_input(input: torch.Tensor, nd: int, name: str = "input") -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() not in (nd + 1, nd + 2):
        shape = "(N, C, D, H, W) or (C, D, H, W)" if nd == 3 else "(N, C, H, W) or (C, H, W)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(input.shape)}")


def _pool_params(nd, kernel_size, stride, padding, dilation, pooling=True):
    kernel = _tuple(kernel_size, nd, "kernel_size", pooling)
    # F.max_pool*d treats stride=None and stride=[] alike: default to the kernel size.
    no_stride = stride is None or (pooling and isinstance(stride, (list, tuple)) and len(stride) == 0)
    stride_t = kernel if no_stride else _tuple(stride, nd, "stride", pooling)
    pad = _tuple(padding, nd, "padding", pooling)
    dil = _tuple(dilation, nd, "dilation", pooling)
    if any(k <= 0 for k in kernel):
        raise ValueError(f"kernel_size must be positive, got {kernel}")
    if any(s <= 0 for s in stride_t):
        raise ValueError(f"stride must be positive, got {stride_t}")
    if any(d <= 0 for d in dil):
        raise ValueError(f"dilation must be positive, got {dil}")
    # Unpooling takes a negative padding (only the default output size uses it), as F.max_unpool*d.
    if pooling and any(p < 0 for p in pad):
        raise ValueError(f"padding must be non-negative, got {pad}")
    if pooling and any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ValueError(f"padding must be at most half of kernel_size, got padding={pad}, kernel_size={kernel}")
    return kernel, stride_t, pad, dil


def pooled_extent(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Pooled length of one axis (ATen's rule, including its ceil_mode correction)."""
    span = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _default_unpool_size(pooled: int, k: int, s: int, p: int, d: int) -> int:
    return (pooled - 1) * s - 2 * p + d * (k - 1) + 1


def _unpool_output_size(in_spatial, kernel, stride, pad, dil, output_size) -> List[int]:
    nd = len(kernel)
    default = [_default_unpool_size(in_spatial[i], kernel[i], stride[i], pad[i], dil[i]) for i in range(nd)]
    if output_size is None:
        return default
    try:
        size = list(output_size)
    except TypeError:
        raise TypeError(f"output_size must be a sequence of ints, got {output_size!r}") from None
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        raise TypeError(f"output_size must be a sequence of ints, got {output_size!r}")
    size = [int(v) for v in size]
    if len(size) == nd + 2:
        size = size[2:]
    if len(size) != nd:
        raise ValueError(
            f"output_size should be a sequence containing {nd} or {nd + 2} elements, but it has a length of {len(size)}"
        )
    for i in range(nd):
        lo, hi = default[i] - stride[i], default[i] + stride[i]
        if not lo < size[i] < hi:
            raise ValueError(f'invalid output_size "{list(output_size)}" (dim {i} must be between {lo} and {hi})')
    return size


def _check_output_size(size: Sequence[int], input: torch.Tensor) -> None:
    if any(v < 0 for v in size):
        raise ValueError(
            f"the unpooled size {list(size)} of input {tuple(input.shape)} is negative: check kernel_size, stride "
            "and padding"
        )


def _check_bool(value, name: str) -> None:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_ too
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout the kernels keep: channels-last when the tensor is so and not plainly contiguous."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# ----------------------------------------------------------------------------------------------
# Plain-PyTorch references (tests and benchmarks import these; they are also the fallback)


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
    nd = len(kernel_size)
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


# ----------------------------------------------------------------------------------------------
# Op registration: fake kernels and autograd (the C++ side registers schemas and kernels)


def _empty_like_layout(like: torch.Tensor, sizes, dtype=None) -> torch.Tensor:
    fmt = _memory_format(like)
    if len(sizes) != like.dim():
        fmt = torch.contiguous_format
    return torch.empty(sizes, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


if _library.kernels_available():
    _ops = torch.ops.segkernels

    @torch.library.register_fake("segkernels::max_pool_with_indices")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode, compact):
        pooled = [
            pooled_extent(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
            for i in range(len(kernel_size))
        ]
        sizes = list(input.shape[:2]) + pooled
        return _empty_like_layout(input, sizes), _empty_like_layout(
            input, sizes, torch.uint8 if compact else torch.int64
        )

    @torch.library.register_fake("segkernels::max_unpool")
    def _(input, indices, kernel_size, stride, padding, dilation, output_size, check_indices):
        return _empty_like_layout(input, list(input.shape[:2]) + list(output_size))

    @torch.library.register_fake("segkernels::max_unpool_backward")
    def _(grad_output, indices, kernel_size, stride, padding, dilation, only_winners):
        return _empty_like_layout(grad_output, list(indices.shape))

    @torch.library.register_fake("segkernels::max_pool_backward")
    def _(grad_output, indices, kernel_size, stride, padding, dilation, input_size):
        return _empty_like_layout(grad_output, list(grad_output.shape[:2]) + list(input_size))

    def _pool_setup(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, _ceil, _compact = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.input_size = list(input.shape[2:])
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _pool_backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad = _call(_ops.max_pool_backward.default, grad_values, indices, *ctx.geometry, ctx.input_size)
        return grad, None, None, None, None, None, None

    _pool_with_grad = _library.register_autograd(
        "segkernels::max_pool_with_indices", _pool_backward, setup_context=_pool_setup
    )

    def _unpool_setup(ctx, inputs, output):
        _input, indices, kernel_size, stride, padding, dilation, _size, _check = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.save_for_backward(indices)

    def _unpool_backward(ctx, grad_output):
        (indices,) = ctx.saved_tensors
        grad = _call(_ops.max_unpool_backward.default, grad_output, indices, *ctx.geometry, True)
        return grad, None, None, None, None, None, None, None

    _unpool_with_grad = _library.register_autograd("segkernels::max_unpool", _unpool_backward, setup_context=_unpool_setup)

    # The backward ops are linear maps whose adjoints are the forward-direction ops, which gives
    # double backward (gradgradcheck): the adjoint of the winners-only gather is unpooling
    # (latest entry wins), that of the all-entries gather is the max-pool backward (a sum).
    def _gather_setup(ctx, inputs, output):
        grad_output, indices, kernel_size, stride, padding, dilation, only_winners = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.full_size = list(grad_output.shape[2:])
        ctx.only_winners = only_winners
        ctx.save_for_backward(indices)

    def _gather_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        if ctx.only_winners:
            grad = _call(_ops.max_unpool.default, gg, indices, *ctx.geometry, ctx.full_size, False)
        else:
            grad = _call(_ops.max_pool_backward.default, gg, indices, *ctx.geometry, ctx.full_size)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("segkernels::max_unpool_backward", _gather_backward, setup_context=_gather_setup)

    def _scatter_setup(ctx, inputs, output):
        _grad_output, indices, kernel_size, stride, padding, dilation, _size = inputs
        ctx.geometry = (kernel_size, stride, padding, dilation)
        ctx.save_for_backward(indices)

    def _scatter_backward(ctx, gg):
        (indices,) = ctx.saved_tensors
        return _call(_ops.max_unpool_backward.default, gg, indices, *ctx.geometry, False), None, None, None, None, None, None

    torch.library.register_autograd("segkernels::max_pool_backward", _scatter_backward, setup_context=_scatter_setup)


# ----------------------------------------------------------------------------------------------
# Public API


def _unbatched(input: torch.Tensor, nd: int) -> bool:
    return input.dim() == nd + 1


def _max_pool_nd(nd, input, kernel_size, stride, padding, dilation, ceil_mode, compact):
    _check_input(input, nd)
    _check_bool(ceil_mode, "ceil_mode")
    _check_bool(compact, "compact")
    kernel, stride_t, pad, dil = _pool_params(nd, kernel_size, stride, padding, dilation)
    unbatched = _unbatched(input, nd)
    if 0 in (input.shape if unbatched else input.shape[1:]):
        raise ValueError(
            f"input must have a non-zero size in every dimension but the batch, got {tuple(input.shape)}"
        )
    x = input.unsqueeze(0) if unbatched else input
    if compact and math.prod(kernel) > 256:
        raise ValueError(
            f"compact=True stores uint8 in-window offsets, so the window may have at most 256 elements; "
            f"kernel_size={kernel} has {math.prod(kernel)}"
        )
    for i in range(nd):
        out = pooled_extent(x.shape[2 + i], kernel[i], stride_t[i], pad[i], dil[i], ceil_mode)
        if out <= 0:
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} is too small for kernel_size={kernel}, "
                f"dilation={dil}, padding={pad}: the pooled size would be {out}"
            )
    if _library.use_compiled(x):
        args = (x, list(kernel), list(stride_t), list(pad), list(dil), ceil_mode, compact)
        if _library.records_grad(x):
            values, indices = _pool_with_grad(*args)
        else:
            values, indices = _call(torch.ops.segkernels.max_pool_with_indices.default, *args)
    else:
        values, indices = reference_max_pool_with_indices(x, kernel, stride_t, pad, dil, ceil_mode, compact)
    if unbatched:
        values, indices = values.squeeze(0), indices.squeeze(0)
    return values, indices


def _max_unpool_nd(nd, input, indices, kernel_size, stride, padding, output_size, dilation, check_indices):
    _check_input(input, nd)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.uint8):
        raise TypeError(
            f"indices must be int64 (flat, as from F.max_pool{nd}d) or uint8 (compact=True), got {indices.dtype}"
        )
    if indices.shape != input.shape:
        raise ValueError(f"indices must have the shape of input {tuple(input.shape)}, got {tuple(indices.shape)}")
    if indices.device != input.device:
        raise ValueError(f"indices must be on the device of input ({input.device}), got {indices.device}")
    # As F.max_unpool*d: every dimension after the first must be non-empty (for an unbatched
    # (C, *spatial) input too).
    if 0 in input.shape[1:]:
        raise ValueError(
            f"input must have a non-zero size in every dimension after the first, got {tuple(input.shape)}"
        )
    kernel, stride_t, pad, dil = _pool_params(nd, kernel_size, stride, padding, dilation, pooling=False)
    if indices.dtype == torch.uint8 and math.prod(kernel) > 256:
        raise ValueError(f"compact uint8 indices need a window of at most 256 elements; kernel_size={kernel}")
    unbatched = _unbatched(input, nd)
    x = input.unsqueeze(0) if unbatched else input
    idx = indices.unsqueeze(0) if unbatched else indices
    size = _unpool_output_size(x.shape[2:], kernel, stride_t, pad, dil, output_size)
    _check_output_size(size, input)
    if any(p < 0 for p in pad):
        if indices.dtype == torch.uint8:
            raise ValueError(f"compact indices need the pooling's padding, which is non-negative; got padding={pad}")
        # Then padding only sets the default size: the kernels get none, and check every index,
        # since the windows they would assume are not the ones the indices came from.
        pad, check_indices = (0,) * nd, True
    if _library.use_compiled(x):
        args = (x, idx, list(kernel), list(stride_t), list(pad), list(dil), size, bool(check_indices))
        if _library.records_grad(x):
            out = _unpool_with_grad(*args)
        else:
            out = _call(torch.ops.segkernels.max_unpool.default, *args)
    else:
        out = reference_max_unpool(x, idx, kernel, stride_t, pad, dil, size)
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
