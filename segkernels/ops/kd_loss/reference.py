"""Plain-PyTorch references of the distillation losses: the eager formulas, never bent to match
a kernel. The tests compare every back end with these in float64; the public API falls back to
them when no compiled kernel can run."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["reference_kd_loss", "reference_seg_kd_loss", "cross_entropy_or_zero"]


def _reference_one(s, t, temperature, axis, labels, ignore_index, divergence, scale_by_t2, beta=0.5):
    if axis == "spatial":
        s, t, dim = (s.flatten(2), t.flatten(2), 2) if s.dim() > 2 else (s.unsqueeze(2), t.unsqueeze(2), 2)
    else:
        dim = 1
    lps = F.log_softmax(s / temperature, dim=dim)
    lpt = F.log_softmax(t / temperature, dim=dim)
    pt = lpt.exp()
    ps = lps.exp()
    zero = torch.zeros_like(pt)
    if divergence == "kl":
        term = torch.where(pt != 0, pt * (lpt - lps), zero)
    elif divergence == "ce":
        term = torch.where(pt != 0, -pt * lps, zero)
    elif divergence == "reverse_kl":
        term = torch.where(ps != 0, ps * (lps - lpt), zero)
    else:  # "js": beta KL(P_t || M) + (1 - beta) KL(P_s || M), M = beta P_t + (1 - beta) P_s
        lm = torch.logaddexp(math.log(beta) + lpt, math.log1p(-beta) + lps)
        term = beta * torch.where(pt != 0, pt * (lpt - lm), zero) + (1 - beta) * torch.where(ps != 0, ps * (lps - lm),
                                                                                               zero)
    per = term.sum(dim)  # (N, *spatial) or (N, C)
    if scale_by_t2:
        per = per * (temperature * temperature)
    if labels is not None:
        per = torch.where(labels != ignore_index, per, torch.zeros_like(per))
    return per


def reference_kd_loss(
    student,
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
    """log_softmax / softmax / the divergence's sum over the softmax axis, in eager PyTorch (see
    kd_loss); "js" takes log M as the log-sum-exp of log beta + log p_t and log(1 - beta) + log p_s."""
    if isinstance(student, (list, tuple)):
        return torch.stack(
            [
                reference_kd_loss(s, teacher, temperature=temperature, axis=axis, labels=labels,
                                  ignore_index=ignore_index, divergence=divergence, reduction=reduction,
                                  scale_by_t2=scale_by_t2, beta=beta)
                for s in student
            ]
        )
    per = _reference_one(student, teacher, temperature, axis, labels, ignore_index, divergence, scale_by_t2, beta)
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    if axis == "spatial":
        denom = max(1, per.numel())
        return total / denom
    if labels is not None:
        return total / (labels != ignore_index).sum().clamp_min(1)
    return total / max(1, per.numel())


def cross_entropy_or_zero(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """F.cross_entropy's (weighted) mean, but 0 with a zero gradient, not NaN, when no position
    counts (all ignored, an empty batch, or weights summing to 0 over the counted positions)."""
    total = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    counted = labels != ignore_index
    if weight is None:
        denominator = counted.sum().to(total.dtype)
    else:
        safe = torch.where(counted, labels, torch.zeros_like(labels))
        denominator = torch.where(counted, weight[safe], torch.zeros((), dtype=weight.dtype)).sum().to(total.dtype)
    return torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1), 0)


def reference_seg_kd_loss(
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
    """hard_weight * F.cross_entropy + soft_weight * reference_kd_loss (eager PyTorch), with the
    contract's one departure from F.cross_entropy: a hard term of 0, not NaN, when no position
    counts (all ignored, an empty batch, or weights summing to 0 over the counted positions).

    Labels larger than (N, C, h, w) logits: the hard term on the logits bilinearly upsampled to
    the labels (F.interpolate), the soft term at the logits' resolution over every position."""
    weight = class_weight.to(student.dtype) if class_weight is not None else None
    if student.dim() == 4 and tuple(labels.shape[1:]) != tuple(student.shape[2:]):
        up = F.interpolate(student, size=tuple(labels.shape[1:]), mode="bilinear", align_corners=align_corners)
        hard = cross_entropy_or_zero(up, labels, ignore_index, weight)
        soft = reference_kd_loss(student, teacher, temperature=temperature, divergence=divergence, beta=beta)
        return hard_weight * hard + soft_weight * soft
    hard = cross_entropy_or_zero(student, labels, ignore_index, weight)
    soft = reference_kd_loss(student, teacher, temperature=temperature, labels=labels, ignore_index=ignore_index,
                             divergence=divergence, beta=beta)
    return hard_weight * hard + soft_weight * soft

