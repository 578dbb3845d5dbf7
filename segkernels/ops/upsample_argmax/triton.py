"""Triton kernel of upsample_argmax (the CUDA back end; on CPU tensors under
TRITON_INTERPRET=1 for the tests): one program per block of columns of an output row, a running
argmax over the classes in registers, the interpolation taps from per-axis tables built on the
host as csrc/upsample_argmax/upsample_argmax.h does. Registered as the op's CUDA kernel at the
end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _library
from .reference import axis_table


@triton.jit
def _upsample_argmax_kernel(
    x_ptr,
    out_ptr,
    y0_ptr,
    y1_ptr,
    wy0_ptr,
    wy1_ptr,
    x0_ptr,
    x1_ptr,
    wx0_ptr,
    wx1_ptr,
    classes,
    out_h,
    out_w,
    stride_n,
    stride_c,
    stride_h,
    stride_w,
    tiles_per_row,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One flat grid axis: a second one would cap the rows at 65535 (CUDA's grid y limit).
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles_per_row  # n * out_h + Y
    tile = pid - row * tiles_per_row
    n = row // out_h
    y = row - n * out_h
    cols = tile * BLOCK + tl.arange(0, BLOCK)
    mask = cols < out_w
    wy0 = tl.load(wy0_ptr + y).to(ACC)
    wy1 = tl.load(wy1_ptr + y).to(ACC)
    wx0 = tl.load(wx0_ptr + cols, mask=mask, other=0.0).to(ACC)
    wx1 = tl.load(wx1_ptr + cols, mask=mask, other=0.0).to(ACC)
    # int64 offsets: (C - 1) * stride_c may pass 2**31 on large maps.
    base = x_ptr + n * stride_n
    r0 = base + tl.load(y0_ptr + y) * stride_h
    r1 = base + tl.load(y1_ptr + y) * stride_h
    c0 = tl.load(x0_ptr + cols, mask=mask, other=0) * stride_w
    c1 = tl.load(x1_ptr + cols, mask=mask, other=0) * stride_w
    stride_c64 = pid * 0 + stride_c
    best = tl.zeros([BLOCK], dtype=ACC)
    pred = tl.zeros([BLOCK], dtype=tl.int64)
    for c in range(0, classes):
        off = c * stride_c64
        x00 = tl.load(r0 + off + c0, mask=mask, other=0.0).to(ACC)
        x01 = tl.load(r0 + off + c1, mask=mask, other=0.0).to(ACC)
        x10 = tl.load(r1 + off + c0, mask=mask, other=0.0).to(ACC)
        x11 = tl.load(r1 + off + c1, mask=mask, other=0.0).to(ACC)
        v = (x00 * wx0 + x01 * wx1) * wy0 + (x10 * wx0 + x11 * wx1) * wy1
        # torch.argmax: first maximum wins, and the first NaN wins over everything.
        take = (c == 0) | ((best == best) & ((v > best) | (v != v)))
        best = tl.where(take, v, best)
        pred = tl.where(take, c, pred)
    tl.store(out_ptr + row * out_w + cols, pred, mask=mask)


def _upsample_argmax_triton(logits: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    n, classes, h, w = logits.shape
    out_h, out_w = int(size[0]), int(size[1])
    out = torch.empty((n, out_h, out_w), dtype=torch.int64, device=logits.device)
    if out.numel() == 0:
        return out
    acc = tl.float64 if logits.dtype == torch.float64 else tl.float32
    table_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y0, y1, wy0, wy1 = axis_table(h, out_h, align_corners, table_dtype, logits.device)
    x0, x1, wx0, wx1 = axis_table(w, out_w, align_corners, table_dtype, logits.device)
    # Sizes for the GPU, a smaller one for the interpreter; by mode, not device, so that the
    # sm_90 ahead-of-time test compiles what a GPU runs.
    block = 64 if _library.triton_interpreting() else 256
    tiles_per_row = triton.cdiv(out_w, block)
    grid = (n * out_h * tiles_per_row,)
    _upsample_argmax_kernel[grid](
        logits, out, y0, y1, wy0, wy1, x0, x1, wx0, wx1, classes, out_h, out_w,
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), tiles_per_row,
        ACC=acc, BLOCK=block,
    )
    return out


if _library.kernels_available():  # the op's schema comes from the compiled extension
    torch.library.register_kernel("segkernels::upsample_argmax", "cuda", _upsample_argmax_triton)
