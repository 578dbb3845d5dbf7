"""Loss modules: CrossEntropyLoss over low-resolution logits, and the distillation modules over
kd_loss: KDLoss, ChannelWiseKDLoss and the Self-Regulation losses (Zhang et al.,
"Self-Regulation for Semantic Segmentation", ICCV 2021)."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import (
    ArgumentTypeError,
    check_bool,
    ArgumentValueError,
    check_choice,
    check_ignore_index,
    check_int,
    check_real,
    check_tensor,
    check_temperature,
    is_integer_tensor,
    labels_out_of_range,
)
from ..ops.cross_entropy import cross_entropy, mean_or_zero
from ..ops.kd_loss import DIVERGENCES, kd_loss
from ..ops.kd_loss import _check_beta as check_beta
from ..ops.kd_loss.reference import cross_entropy_or_zero
from ..ops.upsample_argmax import upsample_argmax

__all__ = ["CrossEntropyLoss", "KDLoss", "ChannelWiseKDLoss", "SelfRegulationLoss", "presence_targets"]


class CrossEntropyLoss(nn.Module):
    """nn.CrossEntropyLoss for dense maps whose labels may be larger than the logits:
    segkernels.cross_entropy (the logits bilinearly upsampled to the labels inside the loss,
    never formed). forward(input (N, C, h, w), target (N, H, W)). weight is a buffer, as in
    nn.CrossEntropyLoss, so .to() moves it."""

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, align_corners: bool = False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
        self.label_smoothing = check_real(label_smoothing, "label_smoothing", minimum=0.0)
        self.align_corners = bool(align_corners)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, align_corners={self.align_corners}")


class KDLoss(nn.Module):
    """Pixel-wise tempered-softmax distillation (softmax over channels), ignore-label aware.

    forward(student, teacher, labels=None): student (N, C, *spatial) or a list of students,
    teacher of the same shape, labels (N, *spatial) optional. See segkernels.kd_loss.
    """

    def __init__(self, temperature: float = 1.0, *, ignore_index: int = 255, divergence: str = "kl",
                 reduction: str = "mean", scale_by_t2: bool = True, beta: float = 0.5) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.ignore_index = ignore_index
        self.divergence = check_choice(divergence, "divergence", DIVERGENCES)
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2
        self.beta = check_beta(beta)

    def forward(self, student, teacher: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student, teacher, temperature=self.temperature, axis="channel", labels=labels,
                       ignore_index=self.ignore_index, divergence=self.divergence, reduction=self.reduction,
                       scale_by_t2=self.scale_by_t2, beta=self.beta)

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "js" else ""
        return f"temperature={self.temperature}, divergence={self.divergence!r}{beta}, reduction={self.reduction!r}"


class ChannelWiseKDLoss(nn.Module):
    """Channel-wise distillation (Shu et al., CWD): for every (n, c) a softmax over all spatial
    positions; mean over the N * C rows, times T^2. forward(student, teacher)."""

    def __init__(self, temperature: float = 4.0, *, divergence: str = "kl", reduction: str = "mean",
                 scale_by_t2: bool = True, beta: float = 0.5) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.divergence = check_choice(divergence, "divergence", DIVERGENCES)
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2
        self.beta = check_beta(beta)

    def forward(self, student, teacher: torch.Tensor) -> torch.Tensor:
        return kd_loss(student, teacher, temperature=self.temperature, axis="spatial", divergence=self.divergence,
                       reduction=self.reduction, scale_by_t2=self.scale_by_t2, beta=self.beta)

    def extra_repr(self) -> str:
        beta = f", beta={self.beta}" if self.divergence == "js" else ""
        return f"temperature={self.temperature}, divergence={self.divergence!r}{beta}, reduction={self.reduction!r}"


def presence_targets(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(N, num_classes) float: 1 where the class occurs in the image's labels (ignored excluded)."""
    lab = labels.flatten(1).long()  # flatten, not reshape(N, -1): N may be 0
    valid = lab != ignore_index
    idx = torch.where(valid, lab, torch.full_like(lab, num_classes))
    out = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    out.scatter_(1, idx, 1.0)
    return out[:, :num_classes]


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Mean, and 0 for an empty batch (F.binary_cross_entropy_with_logits' mean is NaN there).
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / max(logits.numel(), 1)


class SelfRegulationLoss(nn.Module):
    """The Self-Regulation total: weights[0] * MEA-cls + weights[1] * MEA-seg + weights[2] * SR-L
    + weights[3] * SR-F.

    forward(class_maps, presence_logits, labels) -> (total, parts):
        class_maps: E >= 2 exits' logits (N, C, h, w), deepest first, at the labels' resolution
            or below it (h <= H, w <= W): then bilinearly upsampled to the labels inside the
            losses (segkernels.cross_entropy, align_corners as given), never formed.
        presence_logits: E image-level presence logits (N, C), same order.
        labels: (N, H, W) integer, in [0, C) or ignore_index where unlabelled. Out of range:
            IndexError on the CPU; on CUDA (no host synchronisation) NaN total and parts.
        parts: dict with "mea_cls", "mea_seg", "sr_l", "sr_f" (each summed over exits).

    - MEA-seg: per-exit pixel cross-entropy with the labels.
    - MEA-cls: per-exit multi-label BCE of the presence logits against the classes in the labels.
    - SR-F, sr_f="hard" (the official code): the shallowest exit's argmax (detached; of its
      upsampled logits, segkernels.upsample_argmax, for low-resolution maps) is a hard label for
      every deeper exit (pixel CE; ignored pixels stay ignored). sr_f="soft" (the paper):
      tempered soft cross-entropy from the shallowest exit (teacher, detached) to every deeper
      exit, T^2-scaled, through one multi-student kd_loss: mean over labelled pixels, or over
      every position for low-resolution maps (the labels do not name those positions; the maps
      must then share one size).
    - SR-L: BCE of each shallow exit's presence logits against sigmoid of the deepest exit's
      (detached).
    """

    def __init__(self, num_classes: int, weights: Tuple[float, float, float, float] = (0.2, 0.8, 1.0, 1.0),
                 sr_f: str = "hard", temperature: float = 1.0, ignore_index: int = 255,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        if len(tuple(weights)) != 4:
            raise ArgumentValueError(f"weights must be 4 numbers (mea_cls, mea_seg, sr_l, sr_f), got {weights!r}")
        self.weights = tuple(check_real(w, f"weights[{i}]") for i, w in enumerate(weights))
        self.sr_f = check_choice(sr_f, "sr_f", ("hard", "soft"))
        # Checked in both modes: "hard" does not use it, but a NaN or negative value is a mistake.
        self.temperature = check_temperature(temperature)
        self.ignore_index = check_ignore_index(ignore_index)
        self.align_corners = check_bool(align_corners, "align_corners")

    def forward(self, class_maps: Sequence[torch.Tensor], presence_logits: Sequence[torch.Tensor],
                labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        check_tensor(labels, "labels")
        if not is_integer_tensor(labels):
            raise ArgumentTypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 3:
            raise ArgumentValueError(f"labels must be (N, H, W), got {tuple(labels.shape)}")
        labels = labels.long()
        maps, pres = list(class_maps), list(presence_logits)
        if len(maps) < 2 or len(pres) != len(maps):
            raise ArgumentValueError(
                f"need E >= 2 class maps and as many presence logits, got {len(maps)} and {len(pres)}"
            )
        n, c = labels.shape[0], self.num_classes
        for i, m in enumerate(maps):
            check_tensor(m, f"class_maps[{i}]")
            if (m.dim() != 4 or m.shape[1] != c or m.shape[0] != n or not 1 <= m.shape[2] <= labels.shape[1]
                    or not 1 <= m.shape[3] <= labels.shape[2]):
                raise ArgumentValueError(f"class_maps[{i}] must be (N, C, h, w) = ({n}, {c}, h, w) with (h, w) at "
                                         f"most the labels' {tuple(labels.shape[1:])}, got {tuple(m.shape)}")
        for i, p in enumerate(pres):
            check_tensor(p, f"presence_logits[{i}]")
            if tuple(p.shape) != (n, c):
                raise ArgumentValueError(f"presence_logits[{i}] must be (N, C) = ({n}, {c}), got {tuple(p.shape)}")
        ii = self.ignore_index
        # Out-of-range labels are not left to F.cross_entropy (a device-side assert on CUDA).
        # The CPU raises; elsewhere raising would need a host synchronisation, so they are
        # ignored and the total and every part come out NaN.
        bad = ((labels < 0) | (labels >= c)) & (labels != ii)
        poisoned = bad.any()
        if labels.device.type == "cpu" and bool(poisoned):
            raise labels_out_of_range(c, ii)
        labels = labels.masked_fill(bad, ii)
        target = presence_targets(labels, c, ii)
        size = tuple(labels.shape[1:])
        ac = self.align_corners

        def hard_ce(m, y):  # the mean over labelled pixels, 0 when none; upsampled inside for small maps
            if tuple(m.shape[2:]) == size:
                return cross_entropy_or_zero(m, y, ii)
            return mean_or_zero(m, y, None, ii, ac, name="labels")

        mea_seg = sum(hard_ce(m, labels) for m in maps)
        mea_cls = sum(_bce(p, target.to(p.dtype)) for p in pres)
        shallow = maps[-1].detach()
        if self.sr_f == "hard":
            pseudo = shallow.argmax(1) if tuple(shallow.shape[2:]) == size else upsample_argmax(
                shallow, size, align_corners=ac)
            pseudo = torch.where(labels == ii, labels, pseudo)
            sr_f = sum(hard_ce(m, pseudo) for m in maps[:-1])
        elif all(tuple(m.shape[2:]) == size for m in maps):
            sr_f = kd_loss(maps[:-1], shallow, temperature=self.temperature, labels=labels, ignore_index=ii,
                           divergence="ce").sum()
        else:
            sr_f = kd_loss(maps[:-1], shallow, temperature=self.temperature, divergence="ce").sum()
        deep = torch.sigmoid(pres[0].detach())
        sr_l = sum(_bce(p, deep) for p in pres[1:])
        w = self.weights
        total = w[0] * mea_cls + w[1] * mea_seg + w[2] * sr_l + w[3] * sr_f
        parts = {"mea_cls": mea_cls, "mea_seg": mea_seg, "sr_l": sr_l, "sr_f": sr_f}
        if labels.device.type != "cpu":
            nan = float("nan")
            total = torch.where(poisoned, nan, total)
            parts = {k: torch.where(poisoned, nan, v) for k, v in parts.items()}
        return total, parts
