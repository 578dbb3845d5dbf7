"""Triton kernels of cross_entropy over upsampled logits (the CUDA back end; on CPU tensors under
TRITON_INTERPRET=1 for the tests). They follow csrc/cross_entropy/cross_entropy.h step by step,
with the interpolation taps from upsample_argmax's host-side tables (F.interpolate's).

- Forward: one program per output row; per block of columns, an online softmax over the classes
  (running maximum and rescaled sum), each logit interpolated from its four taps. The row's
  loss and weight sums are reduced in the program: deterministic.
- Backward: one program per block of input cells of one input row, holding all classes; it
  gathers the gradient of every output pixel whose taps read those cells (each pixel is
  recomputed by the up to 2 x 2 programs that share it), so there are no atomics and the result
  is bitwise repeatable.
- A label outside [0, C) that is not ignore_index makes its pixel's loss (and so the reduced
  loss) NaN: raising would need a host synchronisation (the package's error policy for CUDA).
Registered as the ops' CUDA kernels at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _library
from ..upsample_argmax.reference import axis_table
from .registration import acc_dtype, new_grad


@triton.jit
def _forward_kernel(
    x_ptr, target_ptr, weight_ptr, loss_ptr, wsum_ptr, log_sum_ptr,
    y0_ptr, y1_ptr, wy0_ptr, wy1_ptr, x0_ptr, x1_ptr, wx0_ptr, wx1_ptr,
    classes, out_h, out_w, stride_n, stride_c, stride_h, stride_w,
    ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, PER_PIXEL: tl.constexpr, SAVE_LOG_SUM: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # n * out_h + Y
    n = row // out_h
    y = row - n * out_h
    wy0 = tl.load(wy0_ptr + y).to(ACC)
    wy1 = tl.load(wy1_ptr + y).to(ACC)
    base = x_ptr + n * stride_n
    r0 = base + tl.load(y0_ptr + y) * stride_h
    r1 = base + tl.load(y1_ptr + y) * stride_h
    stride_c64 = row * 0 + stride_c  # int64: (C - 1) * stride_c may pass 2**31
    cf = classes.to(ACC)
    w_total = cf
    if HAS_WEIGHT:  # summed here: a host-side sum would synchronise
        w_total = 0.0
        for c in range(0, classes):
            w_total += tl.load(weight_ptr + c).to(ACC)
    loss_acc = tl.zeros([BLOCK], dtype=ACC)
    weight_acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, out_w, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < out_w
        t = tl.load(target_ptr + row * out_w + cols, mask=mask, other=0).to(tl.int64)
        labelled = mask & (t != ignore_index)
        in_range = (t >= 0) & (t < classes)
        wx0 = tl.load(wx0_ptr + cols, mask=mask, other=0.0).to(ACC)
        wx1 = tl.load(wx1_ptr + cols, mask=mask, other=0.0).to(ACC)
        c0 = tl.load(x0_ptr + cols, mask=mask, other=0) * stride_w
        c1 = tl.load(x1_ptr + cols, mask=mask, other=0) * stride_w
        m = tl.full([BLOCK], float("-inf"), ACC)
        s = tl.zeros([BLOCK], dtype=ACC)
        swz = tl.zeros([BLOCK], dtype=ACC)
        zt = tl.zeros([BLOCK], dtype=ACC)
        for c in range(0, classes):
            off = c * stride_c64
            x00 = tl.load(r0 + off + c0, mask=labelled, other=0.0).to(ACC)
            x01 = tl.load(r0 + off + c1, mask=labelled, other=0.0).to(ACC)
            x10 = tl.load(r1 + off + c0, mask=labelled, other=0.0).to(ACC)
            x11 = tl.load(r1 + off + c1, mask=labelled, other=0.0).to(ACC)
            z = (x00 * wx0 + x01 * wx1) * wy0 + (x10 * wx0 + x11 * wx1) * wy1
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
            m = m_new
            wc = tl.load(weight_ptr + c).to(ACC) if HAS_WEIGHT else 1.0
            swz += wc * z
            zt = tl.where(t == c, z, zt)
        ts = tl.where(labelled & in_range, t, 0)
        w_t = tl.load(weight_ptr + ts, mask=labelled, other=0.0).to(ACC) if HAS_WEIGHT else 1.0
        log_s = tl.log(s)
        nll = (m - zt) + log_s
        loss = (1.0 - smoothing) * w_t * nll + smoothing / cf * (w_total * (m + log_s) - swz)
        loss = tl.where(in_range, loss, float("nan"))
        loss = tl.where(labelled, loss, 0.0)
        saved = tl.where(labelled, tl.where(in_range, log_s, float("nan")), 0.0)
        loss_acc += loss
        weight_acc += tl.where(labelled, w_t, 0.0)
        if PER_PIXEL:
            tl.store(loss_ptr + row * out_w + cols, loss, mask=mask)
        if SAVE_LOG_SUM:
            tl.store(log_sum_ptr + row * out_w + cols, saved, mask=mask)
    if not PER_PIXEL:
        tl.store(loss_ptr + row, tl.sum(loss_acc, axis=0))
    tl.store(wsum_ptr + row, tl.sum(weight_acc, axis=0))


@triton.jit
def _backward_kernel(
    grad_ptr, x_ptr, target_ptr, weight_ptr, log_sum_ptr, out_ptr,
    y0_ptr, y1_ptr, wy0_ptr, wy1_ptr, x0_ptr, x1_ptr, wx0_ptr, wx1_ptr,
    ystart_ptr, ycount_ptr, xstart_ptr, xcount_ptr,
    classes, in_h, in_w, out_h, out_w, stride_n, stride_c, stride_h, stride_w,
    g_n, g_h, g_w, o_n, o_c, o_h, o_w,
    ignore_index, smoothing, tiles_per_row, max_rows, max_cols,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, CB: tl.constexpr, BX: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    q = pid // tiles_per_row  # n * in_h + y
    tile = pid - q * tiles_per_row
    n = q // in_h
    y = q - n * in_h
    xs = tile * BX + tl.arange(0, BX)  # input columns of this program
    xmask = xs < in_w
    cls = tl.arange(0, CB)
    cmask = cls < classes
    cf = classes.to(ACC)
    e = smoothing / cf
    stride_c64 = pid * 0 + stride_c
    coff = cls.to(tl.int64) * stride_c64
    base = x_ptr + n * stride_n
    wc = tl.load(weight_ptr + cls, mask=cmask, other=0.0).to(ACC) if HAS_WEIGHT else tl.where(cmask, 1.0, 0.0)
    w_total = tl.sum(wc, axis=0)
    x_first = tl.load(xstart_ptr + xs, mask=xmask, other=0)
    x_count = tl.load(xcount_ptr + xs, mask=xmask, other=0)
    y_first = tl.load(ystart_ptr + y)
    y_count = tl.load(ycount_ptr + y)
    acc = tl.zeros([CB, BX], dtype=ACC)
    for i in range(0, max_rows):
        Y = y_first + i
        row_ok = i < y_count
        Yc = tl.where(row_ok, Y, 0)
        a = tl.load(y0_ptr + Yc)
        b = tl.load(y1_ptr + Yc)
        # This input row's weight in output row Y (both taps may read it).
        wy = tl.where(a == y, tl.load(wy0_ptr + Yc).to(ACC), 0.0) + tl.where(b == y, tl.load(wy1_ptr + Yc).to(ACC), 0.0)
        wya = tl.load(wy0_ptr + Yc).to(ACC)
        wyb = tl.load(wy1_ptr + Yc).to(ACC)
        ra = base + a * stride_h
        rb = base + b * stride_h
        for k in range(0, max_cols):
            X = x_first + k
            pmask = xmask & row_ok & (k < x_count)
            Xc = tl.where(pmask, X, 0)
            pix = (n * out_h + Yc) * out_w + Xc
            t = tl.load(target_ptr + pix, mask=pmask, other=0).to(tl.int64)
            labelled = pmask & (t != ignore_index)
            ts = tl.where(labelled & (t >= 0) & (t < classes), t, 0)
            log_s = tl.load(log_sum_ptr + pix, mask=labelled, other=0.0)
            g = tl.load(grad_ptr + n * g_n + Yc * g_h + Xc * g_w, mask=labelled, other=0.0)
            i0 = tl.load(x0_ptr + Xc, mask=pmask, other=0)
            i1 = tl.load(x1_ptr + Xc, mask=pmask, other=0)
            w0 = tl.load(wx0_ptr + Xc, mask=pmask, other=0.0).to(ACC)
            w1 = tl.load(wx1_ptr + Xc, mask=pmask, other=0.0).to(ACC)
            wx = tl.where(i0 == xs, w0, 0.0) + tl.where(i1 == xs, w1, 0.0)
            m2 = cmask[:, None] & labelled[None, :]
            o0 = coff[:, None] + (i0 * stride_w)[None, :]
            o1 = coff[:, None] + (i1 * stride_w)[None, :]
            x00 = tl.load(ra + o0, mask=m2, other=0.0).to(ACC)
            x01 = tl.load(ra + o1, mask=m2, other=0.0).to(ACC)
            x10 = tl.load(rb + o0, mask=m2, other=0.0).to(ACC)
            x11 = tl.load(rb + o1, mask=m2, other=0.0).to(ACC)
            z = (x00 * w0[None, :] + x01 * w1[None, :]) * wya + (x10 * w0[None, :] + x11 * w1[None, :]) * wyb
            onehot = cls[:, None] == ts[None, :]
            m = tl.max(tl.where(cmask[:, None], z, float("-inf")), axis=0)
            p = tl.exp(z - (m + log_s)[None, :])
            w_t = tl.load(weight_ptr + ts, mask=labelled, other=0.0).to(ACC) if HAS_WEIGHT else 1.0
            kb = g * (1.0 - smoothing) * w_t
            ka = kb + g * e * w_total
            dz = ka[None, :] * p - tl.where(onehot, kb[None, :], 0.0) - (g * e)[None, :] * wc[:, None]
            acc += tl.where(m2, dz * (wy * wx)[None, :], 0.0)
    out = out_ptr + n * o_n + y * o_h + cls.to(tl.int64)[:, None] * o_c + (xs * o_w)[None, :]
    tl.store(out, acc, mask=cmask[:, None] & xmask[None, :])


def _tables(input: torch.Tensor, size, align_corners: bool):
    table_dtype = acc_dtype(input.dtype)
    h, w = input.shape[2:]
    return (axis_table(h, size[0], align_corners, table_dtype, input.device),
            axis_table(w, size[1], align_corners, table_dtype, input.device))


def _support(i0: torch.Tensor, i1: torch.Tensor, in_size: int):
    """For each input index, the first output index whose taps read it and how many do (the
    taps are non-decreasing, so they form one run), and the longest run."""
    idx = torch.arange(in_size, device=i0.device)
    first = torch.searchsorted(i1.contiguous(), idx)  # first output with i1 >= index
    last = torch.searchsorted(i0.contiguous(), idx, right=True)  # one past the last with i0 <= index
    count = (last - first).clamp_min(0)
    return first, count, int(count.max()) if in_size else 0


def _forward_triton(input, target, weight, ignore_index, label_smoothing, align_corners, per_pixel, save_log_sum):
    n, classes, h, w = input.shape
    H, W = target.shape[1:]
    acc = acc_dtype(input.dtype)
    new = _library.new_output
    loss = new((n, H, W) if per_pixel else (n, H), dtype=acc, device=input.device)
    wsum = new((n, H), dtype=acc, device=input.device)
    log_sum = new((n, H, W) if save_log_sum else (0,), dtype=acc, device=input.device)
    if target.numel() == 0:
        return loss, wsum, log_sum
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = _tables(input, (H, W), align_corners)
    wt = weight.to(acc).contiguous() if weight is not None else wy0  # any pointer when unused
    block = 64 if _library.triton_interpreting() else 256
    _forward_kernel[(n * H,)](
        input, target, wt, loss, wsum, log_sum if save_log_sum else loss,
        y0, y1, wy0, wy1, x0, x1, wx0, wx1,
        classes, H, W, *input.stride(), ignore_index, label_smoothing,
        HAS_WEIGHT=weight is not None, PER_PIXEL=per_pixel, SAVE_LOG_SUM=save_log_sum,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
    )
    return loss, wsum, log_sum


def _backward_triton(grad, input, target, weight, log_sum, ignore_index, label_smoothing, align_corners):
    n, classes, h, w = input.shape
    H, W = target.shape[1:]
    acc = acc_dtype(input.dtype)
    out = new_grad(input)
    if out.numel() == 0:
        return out
    if target.numel() == 0:
        return out.zero_()
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = _tables(input, (H, W), align_corners)
    ystart, ycount, max_rows = _support(y0, y1, h)
    xstart, xcount, max_cols = _support(x0, x1, w)
    wt = weight.to(acc).contiguous() if weight is not None else wy0
    cb = triton.next_power_of_2(classes)
    cap = 1024 if _library.triton_interpreting() else 4096
    bx = max(1, min(triton.next_power_of_2(w), cap // cb))
    tiles = triton.cdiv(w, bx)
    _backward_kernel[(n * h * tiles,)](
        grad, input, target, wt, log_sum, out,
        y0, y1, wy0, wy1, x0, x1, wx0, wx1, ystart, ycount, xstart, xcount,
        classes, h, w, H, W, *input.stride(), *grad.stride(), *out.stride(),
        ignore_index, label_smoothing, tiles, max_rows, max_cols,
        HAS_WEIGHT=weight is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32, CB=cb, BX=bx,
    )
    return out


if _library.kernels_available():  # the ops' schemas come from the compiled extension
    torch.library.register_kernel("segkernels::cross_entropy", "cuda", _forward_triton)
    torch.library.register_kernel("segkernels::cross_entropy_backward", "cuda", _backward_triton)
