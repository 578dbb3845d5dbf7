"""Tempered-softmax distillation losses over dense maps, fused: one pass reads the student(s) and
the teacher once and writes the loss and the student gradient.

``kd_loss`` (pixel-wise KD with axis="channel", channel-wise distillation with axis="spatial",
several students against one teacher) and ``seg_kd_loss`` (Hinton's hard CE + soft KD total).
CPU: C++ (csrc/kd_loss). CUDA: Triton (triton.py).

Design:
- The gradient is computed in the forward and kept in the input dtype; the backward only
  multiplies it by the incoming gradient. The kernels are bound by their exponentials, so
  recomputing in the backward would run them twice; the price is one saved input-sized tensor.
- The ops return unreduced loss maps (float32, 1/C of the input), reduced here with torch ops:
  "mean" over valid positions needs no host read of the count.
- The shifted logit at a row's maximum is exactly 0 whatever the compiler fuses (kd_loss.h,
  shifted_logit), so tiny temperatures and rows spanning the float range stay finite.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ... import _library
from ..._checks import (
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_bool,
    check_choice,
    check_float_tensor,
    check_ignore_index,
    check_labels,
    check_real,
    check_temperature,
    labels_out_of_range,
)
from .reference import cross_entropy_or_zero, reference_kd_loss, reference_seg_kd_loss
from .registration import _acc_dtype

if _library.kernels_available():
    from .registration import KDLossFunction, SegKDLossFunction

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernels)

__all__ = ["kd_loss", "seg_kd_loss", "reference_kd_loss", "reference_seg_kd_loss"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)

# The divergences, in the order of the ops' `divergence` argument (csrc/kd_loss/kd_loss.h).
DIVERGENCES = ("kl", "ce", "reverse_kl", "js")


def _check_beta(beta) -> float:
    beta = check_real(beta, "beta")
    if not 0.0 < beta < 1.0:
        raise ArgumentValueError(f"beta must be in the open interval (0, 1), got {beta!r}")
    return beta

# ----------------------------------------------------------------------------------------------
# Public API


def _check_logits(x, name: str) -> None:
    check_float_tensor(x, name)
    if not 2 <= x.dim() <= 5:
        raise ArgumentValueError(
            f"{name} must be (N, C, *spatial) with 0 to 3 spatial dims, got shape {tuple(x.shape)}"
        )


def _check_like_teacher(x, name: str, teacher: torch.Tensor) -> None:
    _check_logits(x, name)
    if x.shape != teacher.shape:
        raise ArgumentValueError(f"{name} {tuple(x.shape)} and teacher {tuple(teacher.shape)} must have the same shape")
    if x.device != teacher.device:
        raise ArgumentValueError(f"{name} ({x.device}) and teacher ({teacher.device}) must be on the same device")


def _check_temperature_range(temperature: float, dtype: torch.dtype, squared: bool) -> None:
    # The kernels compute in float32 for 16- and 32-bit logits: a 1 / T or T^2 past that range
    # turns the maximum's own term into 0 * inf and the loss into NaN.
    fmax = torch.finfo(_acc_dtype(dtype)).max
    if temperature < 1.0 / fmax or (squared and temperature > math.sqrt(fmax)):
        what = "1 / T" if temperature < 1.0 else "T^2 (the T^2 scale)"
        raise ArgumentValueError(
            f"temperature={temperature!r} is out of range for {dtype} logits: {what} overflows their "
            f"{_acc_dtype(dtype)} arithmetic (pass float64 logits{'' if temperature < 1.0 else ' or scale_by_t2=False'})"
        )


def _check_labels(labels, teacher: torch.Tensor) -> torch.Tensor:
    return check_labels(labels, (teacher.shape[0], *teacher.shape[2:]), teacher.device).long()


def _rows_as_map(x: torch.Tensor) -> torch.Tensor:
    """(N, C) logits as the (1, C, N, 1) map whose memory they are (channels-last when x is
    contiguous): one image of N positions runs the kernels at full width, where N images of
    one position each paid a per-image cost (about 4x slower on (200000, 19) on the CPU)."""
    return x.t().unsqueeze(0).unsqueeze(-1)


def _loss_dtypes(tensors: Sequence[torch.Tensor], names: Sequence[str]) -> tuple:
    """(dtype to compute in, dtype of the result) for logits of one device.

    Outside autocast the logits must share a dtype, which the loss keeps. Under autocast for
    their device, as PyTorch's own losses (log_softmax, kl_div and cross_entropy autocast to
    float32): mixed dtypes are promoted (a bfloat16 student against a float32 teacher), and a
    16-bit loss comes out in float32. The kernels read 16-bit logits as they are; only their
    float32 result is kept instead of being rounded to 16 bits.
    """
    dtypes = [t.dtype for t in tensors]
    if not _library.autocast_on(tensors[0].device):
        for name, d in zip(names[1:], dtypes[1:]):
            if d != dtypes[0]:
                raise ArgumentTypeError(f"{name} ({d}) and {names[0]} ({dtypes[0]}) must have the same dtype "
                                "(mixed dtypes are promoted under torch.autocast only)")
        return dtypes[0], dtypes[0]
    common = dtypes[0]
    for d in dtypes[1:]:
        common = torch.promote_types(common, d)
    return common, (torch.float32 if common in (torch.float16, torch.bfloat16) else common)


def _use_kernels(op: str, teacher: torch.Tensor) -> bool:
    # The Triton kernels compute in float32: float64 on CUDA runs the reference.
    if teacher.is_cuda and teacher.dtype == torch.float64:
        return False
    return _library.use_kernel(op, teacher.device, GPU_KERNEL)


def kd_loss(
    student: Union[torch.Tensor, Sequence[torch.Tensor]],
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    axis: str = "channel",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    divergence: str = "kl",
    reduction: str = "mean",
    scale_by_t2: bool = True,
    beta: float = 0.5,
) -> torch.Tensor:
    """Tempered-softmax distillation loss between dense logit maps, fused (one pass each way).

    Args:
        student: logits (N, C, *spatial) with 0 to 3 spatial dims, float32/float16/bfloat16/
            float64; or a list of K such students, distilled from the same teacher in one pass
            that reads the teacher once (the result then has a leading K dim).
        teacher: logits of the same shape and dtype (under torch.autocast the dtypes may differ
            and are promoted). When it requires grad (online or mutual distillation) it gets its
            gradient, computed in the same fused pass, as F.kl_div gives it.
        temperature: T > 0; both distributions are softmax(logits / T). With 16- or 32-bit
            logits 1 / T, and T^2 when it scales the loss, must fit in float32 (ValueError
            otherwise).
        axis: "channel": a distribution over the C channels at every position (pixel-wise KD);
            "spatial": a distribution over all positions of every (n, c) (channel-wise KD).
        labels: optional (N, *spatial) integer map (axis="channel" only); positions equal to
            ignore_index contribute nothing and get a zero gradient.
        divergence: "kl" = sum p_t (log p_t - log p_s) (0 where p_t = 0); "ce" = -sum p_t log p_s;
            "reverse_kl" = KL(P_s || P_t) = sum p_s (log p_s - log p_t); "js" = the generalised
            Jensen-Shannon divergence beta KL(P_t || M) + (1 - beta) KL(P_s || M),
            M = beta P_t + (1 - beta) P_s, with log M = logsumexp(log beta + log p_t,
            log(1 - beta) + log p_s): finite where a class's probability underflows under both
            distributions. A NaN teacher logit gives NaN where it reaches (its position, or its
            (n, c) row), as F.kl_div does.
        reduction: "mean" (over valid positions for axis="channel", over N * C rows for
            "spatial"; 0 with a zero gradient when there is none), "sum", or "none" (the
            (N, *spatial) or (N, C) map).
        scale_by_t2: multiply the loss by T^2 (keeps the gradient scale independent of T).
        beta: the teacher's weight in "js"'s mixture, in the open interval (0, 1) (0.5 is the
            usual JSD); ValueError outside it.

    Returns:
        The loss in the input dtype: a scalar, the map for reduction="none", with a leading (K,)
        dim for a list of students. Computed in float32 for 16-bit inputs, and returned in
        float32 under torch.autocast (as F.kl_div is).
    """
    multi = isinstance(student, (list, tuple))
    students = list(student) if multi else [student]
    if multi and not students:
        raise ArgumentValueError("student must be a tensor or a non-empty list of tensors")
    _check_logits(teacher, "teacher")
    names = [f"student[{i}]" if multi else "student" for i in range(len(students))]
    for name, s in zip(names, students):
        _check_like_teacher(s, name, teacher)
    dtype, out_dtype = _loss_dtypes([teacher, *students], ["teacher", *names])
    teacher = teacher.to(dtype)
    students = [s.to(dtype) for s in students]
    temperature = check_temperature(temperature)
    scale_by_t2 = check_bool(scale_by_t2, "scale_by_t2")
    _check_temperature_range(temperature, dtype, scale_by_t2)
    check_choice(axis, "axis", ("channel", "spatial"))
    check_choice(divergence, "divergence", DIVERGENCES)
    beta = _check_beta(beta)
    check_choice(reduction, "reduction", ("mean", "sum", "none"))
    ignore_index = check_ignore_index(ignore_index)
    if labels is not None:
        if axis != "channel":
            raise ArgumentValueError("labels (an ignore mask) are only supported with axis='channel'")
        labels = _check_labels(labels, teacher)
    spatial = axis == "spatial"

    if not _use_kernels("kd_loss", teacher):
        return reference_kd_loss(students if multi else students[0], teacher, temperature=temperature, axis=axis,
                                 labels=labels, ignore_index=ignore_index, divergence=divergence,
                                 reduction=reduction, scale_by_t2=scale_by_t2, beta=beta).to(out_dtype)
    rows = not spatial and teacher.dim() == 2
    if rows:
        students, teacher = [_rows_as_map(x) for x in students], _rows_as_map(teacher)
        labels = labels.view(1, -1, 1) if labels is not None else None
    args = (labels, temperature, spatial, DIVERGENCES.index(divergence), scale_by_t2, ignore_index,
            _library.may_need_gradient(teacher), beta)
    op = torch.ops.segkernels.kd_loss.default
    if torch.compiler.is_compiling():  # the op with its registered autograd
        maps = op(students, teacher, *args)[0]
    else:
        maps = _library.apply_function(KDLossFunction, (teacher, *args, *students),
                                       lambda: _library.call_below_autograd(op, students, teacher, *args))[0]
    if rows:
        maps = maps.reshape(maps.shape[0], -1)
    if reduction == "none":
        out = maps
    else:
        out = maps.flatten(1).sum(1)
        if reduction == "mean":
            if spatial:
                out = out / max(1, maps[0].numel())
            elif labels is not None:
                out = out / (labels != ignore_index).sum().clamp_min(1).to(out.dtype)
            else:
                out = out / max(1, maps[0].numel())
    out = out.to(out_dtype)
    return out if multi else out[0]


def seg_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    class_weight: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
    align_corners: bool = False,
    divergence: str = "kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Hinton's total in one pass: hard_weight * F.cross_entropy(student, labels,
    weight=class_weight, ignore_index=ignore_index) + soft_weight * kd_loss(student, teacher,
    temperature=temperature, labels=labels, ignore_index=ignore_index).

    Shapes: student, teacher (N, C, *spatial); labels (N, *spatial) with values in [0, C) or
    ignore_index; otherwise IndexError on the CPU, and on CUDA (where raising would need a host
    synchronisation) a NaN loss and gradient, never an out-of-bounds read. When every
    position is ignored the result is 0 with a zero gradient (F.cross_entropy would give NaN).
    A teacher that requires grad gets the soft part's gradient, computed in the same pass.
    class_weight gets no gradient (as in F.cross_entropy, it must not require one). Returns a
    scalar in the input dtype (float32 under torch.autocast, with mixed dtypes promoted, as
    F.cross_entropy and F.kl_div are).

    Labels (N, H, W) larger than (N, C, h, w) logits (an FCN's output against full-resolution
    labels): the hard term is segkernels.cross_entropy of the logits bilinearly upsampled to
    the labels (align_corners as F.interpolate; the same weighted mean over labelled
    full-resolution pixels, 0 when there is none), never forming them, and the soft term is
    the distillation at the logits' resolution over every position (the labels do not name
    those positions). Two passes then, not one.

    divergence and beta choose the soft part's divergence as in kd_loss ("kl" by default;
    "ce", "reverse_kl", "js"). Other than "kl", the hard and soft parts run as two fused ops
    (segkernels.cross_entropy's kernel for (N, C, H, W) logits, then kd_loss), with the same
    means and the same 0 for a part with no labelled position.
    """
    _check_logits(teacher, "teacher")
    _check_like_teacher(student, "student", teacher)
    dtype, out_dtype = _loss_dtypes([teacher, student], ["teacher", "student"])
    student, teacher = student.to(dtype), teacher.to(dtype)
    temperature = check_temperature(temperature)
    _check_temperature_range(temperature, dtype, True)
    ignore_index = check_ignore_index(ignore_index)
    align_corners = check_bool(align_corners, "align_corners")
    check_choice(divergence, "divergence", DIVERGENCES)
    beta = _check_beta(beta)
    upsampled = _labels_larger(labels, teacher)
    if not upsampled:
        labels = _check_labels(labels, teacher)
    hard_weight = check_real(hard_weight, "hard_weight")
    soft_weight = check_real(soft_weight, "soft_weight")
    if class_weight is not None:
        check_float_tensor(class_weight, "class_weight")
        if tuple(class_weight.shape) != (teacher.shape[1],):
            raise ArgumentValueError(
                f"class_weight must be (C,) = ({teacher.shape[1]},), got {tuple(class_weight.shape)}"
            )
        if class_weight.device != teacher.device:
            raise ArgumentValueError(f"class_weight must be on {teacher.device}, got {class_weight.device}")
        if class_weight.requires_grad and torch.is_grad_enabled():
            raise ArgumentValueError(
                "class_weight must not require grad: seg_kd_loss gives it none (as F.cross_entropy)"
            )
    if upsampled:
        return _seg_kd_loss_upsampled(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight,
                                      ignore_index, align_corners, divergence, beta).to(out_dtype)
    if divergence != "kl":
        return _seg_kd_loss_two_ops(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight,
                                    ignore_index, divergence, beta).to(out_dtype)
    try:
        if not _use_kernels("seg_kd_loss", teacher):
            return reference_seg_kd_loss(student, teacher, labels, temperature=temperature, hard_weight=hard_weight,
                                         soft_weight=soft_weight, class_weight=class_weight,
                                         ignore_index=ignore_index).to(out_dtype)
        if teacher.dim() == 2:
            student, teacher, labels = _rows_as_map(student), _rows_as_map(teacher), labels.view(1, -1, 1)
        args = (student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index,
                _library.may_need_gradient(teacher))
        loss = _library.call_op(torch.ops.segkernels.seg_kd_loss.default, SegKDLossFunction, *args)[0]
    except IndexError as exc:  # a label outside [0, C): the CPU kernel's and F.cross_entropy's check
        raise ArgumentIndexError(f"labels: {exc}") from None
    return loss.to(out_dtype)


def _labels_larger(labels, teacher: torch.Tensor) -> bool:
    """Whether labels are a full-resolution (N, H, W) map for (N, C, h, w) logits of a smaller
    map (the upsampled hard term); anything else is checked as same-size labels."""
    return (isinstance(labels, torch.Tensor) and teacher.dim() == 4 and labels.dim() == 3
            and labels.shape[0] == teacher.shape[0] and tuple(labels.shape[1:]) != tuple(teacher.shape[2:])
            and labels.shape[1] >= teacher.shape[2] and labels.shape[2] >= teacher.shape[3])


def _seg_kd_loss_upsampled(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight,
                           ignore_index, align_corners, divergence="kl", beta=0.5):
    from ..cross_entropy import mean_or_zero

    hard = mean_or_zero(student, labels, class_weight, ignore_index, align_corners, name="labels")
    soft = kd_loss(student, teacher, temperature=temperature, divergence=divergence, beta=beta)
    return hard_weight * hard + soft_weight * soft.to(hard.dtype)


def _seg_kd_loss_two_ops(student, teacher, labels, class_weight, temperature, hard_weight, soft_weight, ignore_index,
                         divergence, beta):
    """seg_kd_loss with a divergence other than "kl": the hard part, then kd_loss."""
    from ..cross_entropy import mean_or_zero

    if student.dim() == 4:
        hard = mean_or_zero(student, labels, class_weight, ignore_index, False, name="labels")
    else:
        bad = ((labels < 0) | (labels >= student.shape[1])) & (labels != ignore_index)
        if student.device.type == "cpu" and bool(bad.any()):
            raise labels_out_of_range(student.shape[1], ignore_index)
        weight = class_weight.to(student.dtype) if class_weight is not None else None
        hard = cross_entropy_or_zero(student, labels.masked_fill(bad, ignore_index), ignore_index, weight)
        hard = torch.where(bad.any(), float("nan"), hard)
    soft = kd_loss(student, teacher, temperature=temperature, labels=labels, ignore_index=ignore_index,
                   divergence=divergence, beta=beta)
    return hard_weight * hard + soft_weight * soft.to(hard.dtype)
