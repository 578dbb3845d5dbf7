"""Triton kernels of the label-map convolution and label_fractions (the CUDA back end; on CPU
tensors under TRITON_INTERPRET=1 for the tests), their launchers, and their registration as the
ops' CUDA kernels.

- Forward: one program per (block of output positions, block of output channels); each tap
  gathers, for every position, the weight column of the class found there (weight is small and
  stays in cache). No one-hot tensor; float32 accumulation.
- Weight backward: one program per (block of output channels, block of classes, tap) walks every
  position in order and adds grad_output (channels x positions) times the one-hot block of the
  tap's classes (positions x classes), built in registers, with tl.dot: a fixed summation order,
  so the gradient is bitwise repeatable, no atomics, and no one-hot tensor in memory. Its
  operations are those of the dense convolution's weight gradient (the gather form needs
  scattered adds); float32 products in IEEE precision, since the one-hot factor is exact.
- label_fractions: one program per (image, block of output cells, block of classes) counts the
  classes of each cell's factor x factor pixels in registers.
- float16, bfloat16 and float32 (float32 accumulation); float64 runs the reference.
- Labels outside [0, C) that are not ignore_index contribute nothing; the launcher counts them
  over the whole map (read by a tap or not, each pixel once), reads the count once (one
  synchronisation) and raises IndexError, as the CPU kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _library
from ..._library import new_output


@triton.jit
def _tap_class(lab_ptr, n, oy, ox, i, j, inside_p, H, W, sN, sH, sW, sh, sw, ph, pw, dh, dw, classes, ignore_index):
    # The class at tap (i, j) of each position, -1 where the tap reads the padding, an ignored
    # pixel or an invalid label (which the launchers count over the whole map).
    iy = oy * sh - ph + i * dh
    ix = ox * sw - pw + j * dw
    inside = inside_p & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    lab = tl.load(lab_ptr + n * sN + iy * sH + ix * sW, mask=inside, other=0).to(tl.int64)
    valid = inside & (lab != ignore_index) & (lab >= 0) & (lab < classes)
    return tl.where(valid, lab, -1)


@triton.jit
def _forward_kernel(lab_ptr, w_ptr, b_ptr, out_ptr, positions, Ho, Wo, H, W, sN, sH, sW, sh, sw, ph, pw, dh,
                    dw, classes, out_channels, ignore_index, KH: tl.constexpr, KW: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_o = tl.program_id(1)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < positions
    hw = Ho * Wo
    n = p // hw
    q = p - n * hw
    oy = q // Wo
    ox = q - oy * Wo
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < out_channels
    taps = KH * KW
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=omask, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            c = _tap_class(lab_ptr, n, oy, ox, i, j, pmask, H, W, sN, sH, sW, sh, sw, ph, pw, dh, dw, classes,
                           ignore_index)
            cs = tl.maximum(c, 0)
            w = tl.load(w_ptr + o[None, :] * (classes * taps) + cs[:, None] * taps + (i * KW + j),
                        mask=(c >= 0)[:, None] & omask[None, :], other=0.0)
            acc += w.to(tl.float32)
    out = out_ptr + (n * out_channels * hw + q)[:, None] + o[None, :].to(tl.int64) * hw
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & omask[None, :])


@triton.jit
def _weight_backward_kernel(lab_ptr, g_ptr, gw_ptr, positions, Ho, Wo, H, W, sN, sH, sW, sh, sw, ph, pw, dh, dw,
                            classes, out_channels, ignore_index, KH: tl.constexpr, KW: tl.constexpr,
                            BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
                            IEEE: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = tl.program_id(2)
    i = t // KW
    j = t - i * KW
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = o < out_channels
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = Ho * Wo
    acc = tl.zeros([BLOCK_O, BLOCK_C], dtype=tl.float32)
    for start in range(0, positions, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P).to(tl.int64)
        pmask = p < positions
        n = p // hw
        q = p - n * hw
        oy = q // Wo
        ox = q - oy * Wo
        c = _tap_class(lab_ptr, n, oy, ox, i, j, pmask, H, W, sN, sH, sW, sh, sw, ph, pw, dh, dw, classes,
                       ignore_index)
        g = tl.load(g_ptr + (n * out_channels * hw + q)[None, :] + o[:, None].to(tl.int64) * hw,
                    mask=omask[:, None] & pmask[None, :], other=0.0)
        onehot = (c[:, None] == cls[None, :]).to(g.dtype)
        if IEEE:
            acc += tl.dot(g, onehot, input_precision="ieee")
        else:
            acc += tl.dot(g, onehot)
    taps = KH * KW
    dst = gw_ptr + o[:, None] * (classes * taps) + cls[None, :] * taps + t
    tl.store(dst, acc.to(gw_ptr.dtype.element_ty), mask=omask[:, None] & (cls < classes)[None, :])


@triton.jit
def _fractions_kernel(lab_ptr, out_ptr, cells_per_image, Wo, sN, sH, sW, classes, factor, area,
                      ignore_index, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    blocks = tl.cdiv(cells_per_image, BLOCK)
    n = pid // blocks
    cell = (pid - n * blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cell < cells_per_image
    oy = cell // Wo
    ox = cell - oy * Wo
    cls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    counts = tl.zeros([BLOCK, BLOCK_C], dtype=tl.int32)
    for fy in range(factor):
        for fx in range(factor):
            lab = tl.load(lab_ptr + n * sN + (oy * factor + fy) * sH + (ox * factor + fx) * sW, mask=mask,
                          other=0).to(tl.int64)
            valid = mask & (lab != ignore_index) & (lab >= 0) & (lab < classes)
            counts += ((lab[:, None] == cls[None, :]) & valid[:, None]).to(tl.int32)
    out = out_ptr + (n * classes + cls[None, :].to(tl.int64)) * cells_per_image + cell[:, None]
    tl.store(out, counts.to(tl.float32) / area,  # a count over the area, as avg_pool2d
              mask=mask[:, None] & (cls < classes)[None, :])


def _raise_invalid(labels: torch.Tensor, classes: int, ignore_index: int) -> None:
    """IndexError if any pixel of labels is invalid, read by a tap or not (as the CPU kernels and
    the reference), each pixel counted once: one pass over the labels and the one host
    synchronisation of the launch. The kernels treat an invalid label as no class."""
    count = int(((labels != ignore_index) & ((labels < 0) | (labels >= classes))).sum().item())
    if count:
        raise IndexError(f"labels hold {count} value(s) outside [0, {classes}) that are not ignore_index={ignore_index}")


def _geometry(labels, weight_size, stride, padding, dilation):
    n, h, w = labels.shape
    o, c, kh, kw = weight_size
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"segkernels.one_hot_conv2d: the dilated kernel is larger than the padded labels "
                         f"({h + 2 * padding[0]}, {w + 2 * padding[1]})")
    return n, h, w, o, c, kh, kw, ho, wo


def _check_dtype(t: torch.Tensor, name: str) -> None:
    # float32 accumulation and products: float64 runs the reference (the public function routes it).
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"segkernels.one_hot_conv2d: the CUDA kernels take float16, bfloat16 or float32 {name}, "
                        f"got {t.dtype}")


def _one_hot_conv2d_triton(labels, weight, bias, stride, padding, dilation, ignore_index):
    _check_dtype(weight, "weight")
    n, h, w, o, c, kh, kw, ho, wo = _geometry(labels, weight.shape, stride, padding, dilation)
    weight = weight.contiguous()
    out = new_output((n, o, ho, wo), dtype=weight.dtype, device=weight.device)
    positions = n * ho * wo
    if out.numel() == 0:
        return out
    interpreting = _library.triton_interpreting()
    block_p = 32 if interpreting else 64
    block_o = min(triton.next_power_of_2(o), 16 if interpreting else 64)
    grid = (triton.cdiv(positions, block_p), triton.cdiv(o, block_o))
    _forward_kernel[grid](
        labels, weight, bias if bias is not None else weight, out, positions, ho, wo, h, w, *labels.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], c, o, ignore_index, KH=kh, KW=kw,
        HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_O=block_o)
    _raise_invalid(labels, c, ignore_index)
    return out


def _one_hot_conv2d_weight_backward_triton(grad, labels, weight_size, stride, padding, dilation, ignore_index):
    _check_dtype(grad, "grad_output")
    n, h, w, o, c, kh, kw, ho, wo = _geometry(labels, weight_size, stride, padding, dilation)
    _raise_invalid(labels, c, ignore_index)
    grad = grad.contiguous()
    grad_weight = new_output(tuple(weight_size), dtype=grad.dtype, device=grad.device)
    # The bias gradient: torch's reduction (deterministic), accumulated in float32 for 16-bit grads.
    grad_bias = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
    if grad_weight.numel() == 0:
        return grad_weight, grad_bias
    positions = n * ho * wo
    if positions == 0:
        return grad_weight.zero_(), grad_bias
    interpreting = _library.triton_interpreting()
    # tl.dot needs blocks of at least 16 along every side.
    block_o = 16 if interpreting else min(64, max(16, triton.next_power_of_2(o)))
    block_c = 16 if interpreting else min(64, max(16, triton.next_power_of_2(c)))
    block_p = 16 if interpreting else 64
    grid = (triton.cdiv(o, block_o), triton.cdiv(c, block_c), kh * kw)
    _weight_backward_kernel[grid](
        labels, grad, grad_weight, positions, ho, wo, h, w, *labels.stride(), stride[0], stride[1], padding[0],
        padding[1], dilation[0], dilation[1], c, o, ignore_index, KH=kh, KW=kw, BLOCK_P=block_p, BLOCK_O=block_o,
        BLOCK_C=block_c, IEEE=grad.dtype == torch.float32)
    return grad_weight, grad_bias


def _label_fractions_triton(labels, num_classes, factor, ignore_index):
    n, h, w = labels.shape
    ho, wo = h // factor, w // factor
    out = new_output((n, num_classes, ho, wo), dtype=torch.float32, device=labels.device)
    if out.numel() == 0:
        return out
    interpreting = _library.triton_interpreting()
    block = 32 if interpreting else 128
    block_c = min(triton.next_power_of_2(num_classes), 16 if interpreting else 32)
    cells = ho * wo
    grid = (n * triton.cdiv(cells, block), triton.cdiv(num_classes, block_c))
    _fractions_kernel[grid](labels, out, cells, wo, *labels.stride(), num_classes, factor,
                            float(factor * factor), ignore_index, BLOCK=block, BLOCK_C=block_c)
    _raise_invalid(labels, num_classes, ignore_index)
    return out


if _library.kernels_available():  # the ops' schemas come from the compiled extension
    torch.library.register_kernel("segkernels::one_hot_conv2d", "cuda", _one_hot_conv2d_triton)
    torch.library.register_kernel("segkernels::one_hot_conv2d_weight_backward", "cuda",
                                  _one_hot_conv2d_weight_backward_triton)
    torch.library.register_kernel("segkernels::label_fractions", "cuda", _label_fractions_triton)
