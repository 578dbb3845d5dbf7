"""Triton kernel of the confusion matrix (the CUDA back end; on CPU tensors under
TRITON_INTERPRET=1 for the tests): per block of positions, a running argmax over the classes
in registers, then an in-register histogram merged with integer atomics, so the result is
deterministic. Registered as the op's CUDA kernel at the end."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _library
from .registration import MAX_CLASSES

@triton.jit
def _argmax_step(best, pred, v, c):
    # torch.argmax: first maximum wins, and the first NaN wins over everything.
    take = (best == best) & ((v > best) | (v != v))
    return tl.where(take, v, best), tl.where(take, c, pred)

@triton.jit
def _confusion_kernel(
    x_ptr,
    lab_ptr,
    cm_ptr,
    bad_ptr,
    spatial,
    classes,
    ignore_index,
    stride_n,
    stride_c,
    stride_p,
    tiles_per_image,
    FROM_LOGITS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    STATIC_CLASSES: tl.constexpr,
    NUM_BINS: tl.constexpr,
    USE_HISTOGRAM: tl.constexpr,
):
    # One flat grid axis: a second one would cap the batch at 65535 (CUDA's grid y limit).
    pid = tl.program_id(0).to(tl.int64)
    n = pid // tiles_per_image
    pid_p = pid - n * tiles_per_image
    # int64 (pid * 0 + ...): (C - 1) * stride_c may pass 2**31 on large maps.
    stride_c64 = pid * 0 + stride_c
    bad = tl.zeros([BLOCK], dtype=tl.int64)
    if USE_HISTOGRAM:
        hist = tl.zeros([NUM_BINS], dtype=tl.int32)
    # TILES tiles per program: the histogram is flushed once per program, not per tile.
    for t in range(TILES):
        offs = (pid_p * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < spatial
        ptrs = x_ptr + n * stride_n + offs * stride_p
        if FROM_LOGITS:
            best = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
            pred = tl.zeros([BLOCK], dtype=tl.int64)
            if STATIC_CLASSES > 0:
                # Unrolled: every class's load is in flight at once.
                for c in tl.static_range(1, STATIC_CLASSES):
                    v = tl.load(ptrs + c * stride_c64, mask=mask, other=0.0).to(ACC)
                    best, pred = _argmax_step(best, pred, v, c)
            else:
                for c in range(1, classes):
                    v = tl.load(ptrs + c * stride_c64, mask=mask, other=0.0).to(ACC)
                    best, pred = _argmax_step(best, pred, v, c)
        else:
            pred = tl.load(ptrs, mask=mask, other=0).to(tl.int64)
        lab = tl.load(lab_ptr + n * spatial + offs, mask=mask, other=ignore_index)
        counted = mask & (lab != ignore_index)
        good = counted & (lab >= 0) & (lab < classes) & (pred >= 0) & (pred < classes)
        bad += (counted & ~good).to(tl.int64)
        bins = tl.where(good, lab * classes + pred, 0)
        if USE_HISTOGRAM:
            # One atomic per non-empty bin per program instead of one per position:
            # thousands of positions land in the same few bins, and same-address atomics
            # serialise.
            hist += tl.histogram(bins.to(tl.int32), NUM_BINS, mask=good)
        else:
            tl.atomic_add(cm_ptr + bins, tl.full([BLOCK], 1, tl.int64), mask=good)
    bad_count = tl.sum(bad, axis=0)
    tl.atomic_add(bad_ptr, bad_count, mask=bad_count > 0)
    if USE_HISTOGRAM:
        nb = tl.arange(0, NUM_BINS)
        tl.atomic_add(cm_ptr + nb, hist.to(tl.int64), mask=(nb < classes * classes) & (hist > 0))

_HISTOGRAM_MAX_BINS = 4096

def _confusion_matrix_triton(input: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int):
    # The public wrapper checks everything; these guard direct op calls, as the C++ op does.
    if not 0 < num_classes <= MAX_CLASSES:
        raise ValueError(
            f"segkernels.confusion_matrix: num_classes must be in [1, {MAX_CLASSES}], got {num_classes}"
        )
    if labels.dtype != torch.int64 or (not input.is_floating_point() and input.dtype != torch.int64):
        raise TypeError("segkernels.confusion_matrix: labels (and a prediction map) must be int64")
    expected = (input.shape[0], *input.shape[2:]) if input.is_floating_point() else tuple(input.shape)
    if tuple(labels.shape) != expected or (input.is_floating_point() and input.shape[1] != num_classes):
        raise ValueError(
            f"segkernels.confusion_matrix: input {tuple(input.shape)} and labels {tuple(labels.shape)} "
            f"do not match for num_classes={num_classes}"
        )
    from_logits = input.is_floating_point()
    n = labels.shape[0]
    spatial = labels[0].numel() if n > 0 else 0
    if from_logits:
        x = input
        if x.dim() == 2:
            # (N, C) rows: one "image" of N positions, read through its own strides (a grid
            # axis per row would launch a program per position).
            n, spatial = 1, x.shape[0]
            stride_n, stride_c, stride_p = 0, x.stride(1), x.stride(0)
        else:
            channels_last = not x.is_contiguous() and x.permute(0, *range(2, x.dim()), 1).is_contiguous()
            if not channels_last:
                x = x.contiguous()
            stride_n, stride_c = x.stride(0), x.stride(1)
            stride_p = num_classes if channels_last else 1
    else:
        # A prediction map and its labels line up element for element: one flat "image".
        x = input.contiguous()
        n, spatial = 1, x.numel()
        stride_n, stride_c, stride_p = 0, 0, 1
    lab = labels.contiguous()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=input.device)
    invalid = torch.zeros(1, dtype=torch.int64, device=input.device)
    if n == 0 or spatial == 0:
        return matrix, invalid
    bins = triton.next_power_of_2(num_classes * num_classes)
    # Sizes for the GPU, smaller ones for the interpreter (CPU tensors in the tests), where
    # big blocks only cost time. Chosen by the mode, not the device, so that the sm_90
    # ahead-of-time test compiles what a GPU runs.
    interpreting = _library.triton_interpreting()
    block = 1024 if interpreting else 512
    tiles = 2 if interpreting else 8
    tiles_per_image = triton.cdiv(spatial, block * tiles)
    grid = (tiles_per_image * n,)
    _confusion_kernel[grid](
        x,
        lab,
        matrix,
        invalid,
        spatial,
        num_classes,
        ignore_index,
        stride_n,
        stride_c,
        stride_p,
        tiles_per_image,
        FROM_LOGITS=from_logits,
        # float64 logits compare in float64: a float32 cast would merge near-ties (and
        # values past float32's range) that torch.argmax tells apart.
        ACC=tl.float64 if input.dtype == torch.float64 else tl.float32,
        BLOCK=block,
        TILES=tiles,
        STATIC_CLASSES=num_classes if from_logits and num_classes <= 32 else 0,
        NUM_BINS=bins if bins <= _HISTOGRAM_MAX_BINS else 1,
        USE_HISTOGRAM=bins <= _HISTOGRAM_MAX_BINS,
    )
    return matrix, invalid


if _library.kernels_available():  # the op's schema comes from the compiled extension
    torch.library.register_kernel("segkernels::confusion_matrix", "cuda", _confusion_matrix_triton)
