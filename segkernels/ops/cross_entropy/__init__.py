"""Cross-entropy straight from low-resolution logits: F.cross_entropy of the logits bilinearly
upsampled to the labels' size (FCN's in-network upsampling and pixel-wise loss), without the
upsampled logits, their softmax or their gradient.

CPU: C++ (csrc/cross_entropy). CUDA: Triton (triton.py). The ops return per-row sums (or the
per-pixel map for reduction="none") and the labelled pixels' weight sums; the reduction is done
here with torch ops, so "mean" needs no host read.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _library
from ..._checks import (
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_bool,
    check_choice,
    check_device,
    check_float_tensor,
    check_ignore_index,
    check_real,
    check_tensor,
    is_integer_tensor,
)
from .reference import reference_cross_entropy
from .registration import acc_dtype

if _library.kernels_available():
    from .registration import CrossEntropyFunction

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernels)

__all__ = ["cross_entropy", "reference_cross_entropy"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)


def _check_target(target, input: torch.Tensor) -> torch.Tensor:
    check_tensor(target, "target")
    if not is_integer_tensor(target):
        raise ArgumentTypeError(f"target must be an integer tensor (class indices), got {target.dtype}")
    check_device(target, input.device, "target")
    if target.dim() != 3:
        raise ArgumentValueError(f"target must be (N, H, W), got shape {tuple(target.shape)}")
    if target.shape[0] != input.shape[0]:
        raise ArgumentValueError(f"target's batch ({target.shape[0]}) must match input's ({input.shape[0]})")
    if target.shape[1] < input.shape[2] or target.shape[2] < input.shape[3]:
        raise ArgumentValueError(
            f"target {tuple(target.shape[1:])} must be at least as large as input's map {tuple(input.shape[2:])} "
            "(the logits are upsampled to the labels, never downsampled)"
        )
    return target


def _check_args(input, target, weight, ignore_index, reduction, label_smoothing, align_corners):
    """The checked arguments (target, weight in the accumulation dtype, ignore_index,
    label_smoothing, align_corners)."""
    check_float_tensor(input, "input")
    if input.dim() != 4:
        raise ArgumentValueError(f"input must be (N, C, h, w) logits, got shape {tuple(input.shape)}")
    if input.shape[1] == 0:
        raise ArgumentValueError("input needs at least one class (C >= 1)")
    target = _check_target(target, input)
    if target.numel() and 0 in input.shape[2:]:
        raise ArgumentValueError(f"input's map must not be empty, got {tuple(input.shape)}")
    if weight is not None:
        check_float_tensor(weight, "weight")
        if tuple(weight.shape) != (input.shape[1],):
            raise ArgumentValueError(f"weight must be (C,) = ({input.shape[1]},), got {tuple(weight.shape)}")
        check_device(weight, input.device, "weight")
        if weight.requires_grad and torch.is_grad_enabled():
            raise ArgumentValueError("weight must not require grad: cross_entropy gives it none (as F.cross_entropy)")
        weight = weight.to(acc_dtype(input.dtype))
    ignore_index = check_ignore_index(ignore_index)
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    label_smoothing = check_real(label_smoothing, "label_smoothing", minimum=0.0)
    if label_smoothing > 1.0:
        raise ArgumentValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    align_corners = check_bool(align_corners, "align_corners")
    return target, weight, ignore_index, label_smoothing, align_corners


def loss_and_weight_sums(input, target, weight, ignore_index, label_smoothing, align_corners, per_pixel,
                         name: str = "target"):
    """For checked arguments: (the (N, H, W) per-pixel loss with per_pixel, else the (N, H) sums
    of each label row's losses; the (N, H) sums of the labelled pixels' weights), in float32
    (float64 for float64 input). The reduced loss is sum / weight sum for "mean"."""
    use = _library.use_kernel("cross_entropy", input.device, GPU_KERNEL)
    if use and input.is_cuda and input.dtype == torch.float64:  # the Triton kernels compute in float32
        use = False
    acc = acc_dtype(input.dtype)
    if not use:
        with torch.autocast(input.device.type, enabled=False):
            loss = reference_cross_entropy(input.to(acc), target, weight, ignore_index, "none", label_smoothing,
                                           align_corners)
        labelled = target != ignore_index
        w = weight[torch.where(labelled, target, 0).long()] if weight is not None else torch.ones((), dtype=acc,
                                                                                                   device=input.device)
        weight_sum = torch.where(labelled, w, 0.0).sum(-1)
        return (loss if per_pixel else loss.sum(-1)), weight_sum
    target = target.contiguous()
    args = (input, target, weight, ignore_index, label_smoothing, align_corners, per_pixel,
            _library.may_need_gradient(input))
    try:
        loss, weight_sum, _log_sum = _library.call_op(torch.ops.segkernels.cross_entropy.default,
                                                      CrossEntropyFunction, *args)
    except IndexError as exc:  # a label outside [0, C): the kernels' check
        raise ArgumentIndexError(f"{name} holds {exc}") from None
    return loss, weight_sum


def mean_or_zero(input, target, weight, ignore_index, align_corners, name: str = "target") -> torch.Tensor:
    """cross_entropy's weighted mean, but 0 with a zero gradient (not NaN) when no pixel counts:
    the hard term of seg_kd_loss and the Self-Regulation losses for full-resolution labels."""
    target, weight, ignore_index, _, align_corners = _check_args(input, target, weight, ignore_index, "mean", 0.0,
                                                                 align_corners)
    rows, weight_rows = loss_and_weight_sums(input, target, weight, ignore_index, 0.0, align_corners, False, name)
    total, denominator = rows.sum(), weight_rows.sum()
    return torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1), 0.0)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    align_corners: bool = False,
) -> torch.Tensor:
    """F.cross_entropy of input bilinearly upsampled to target's size, without forming it.

    Equals ``F.cross_entropy(F.interpolate(input, size=target.shape[1:], mode="bilinear",
    align_corners=align_corners), target.long(), weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)``, and plain F.cross_entropy when
    the sizes match. Extra memory: the input-sized gradient and 4 bytes a label pixel.

    Args:
        input: (N, C, h, w) logits, float16/bfloat16/float32/float64, any layout (channels_last
            included; its gradient keeps it). 16-bit logits are read as they are and the loss
            is computed in float32.
        target: (N, H, W) class indices with H >= h, W >= w, any integer dtype (uint8 label
            maps included), values in [0, C) or ignore_index (IndexError otherwise).
        weight: optional (C,) class weights (no gradient, as F.cross_entropy).
        ignore_index, reduction, label_smoothing: as F.cross_entropy. "mean" divides by the sum
            of the labelled pixels' weights (their count without weights): NaN when every
            pixel is ignored, as F.cross_entropy, while "sum" is then 0; the gradient is 0.
        align_corners: as F.interpolate.

    Returns the loss in input's dtype (float32 under torch.autocast, as F.cross_entropy), a
    scalar or the (N, H, W) map for reduction="none". Differentiable with respect to input
    (deterministic: no atomics), under torch.func transforms and forward-mode AD.
    """
    target, weight, ignore_index, label_smoothing, align_corners = _check_args(
        input, target, weight, ignore_index, reduction, label_smoothing, align_corners)
    out_dtype = input.dtype
    if _library.autocast_on(input.device) and input.dtype in (torch.float16, torch.bfloat16):
        out_dtype = torch.float32
    loss, weight_sum = loss_and_weight_sums(input, target, weight, ignore_index, label_smoothing, align_corners,
                                            reduction == "none")
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / weight_sum.sum()
    return loss.to(out_dtype)
