"""InstanceFCN head (Dai et al., ECCV 2016): k * k position-sensitive score maps and a
per-position objectness logit, assembled into m x m instance masks by
:func:`segkernels.ps_assemble`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .._checks import ArgumentValueError, check_int
from ..ops.ps_assemble import ps_assemble

__all__ = ["InstanceFCNHead"]


class InstanceFCNHead(nn.Module):
    """The two branches of InstanceFCN on a (stride-8) feature map.

    * instance branch: 1x1 conv to ``hidden``, ReLU, 3x3 conv to k * k score maps;
    * objectness branch: 3x3 conv to ``hidden``, ReLU, 1x1 conv to one logit per position.

    Args:
        in_channels: channels of the feature map.
        k: position-sensitive grid (k x k cells; the paper uses 5).
        m: window side on the feature map (the paper uses 21 on the stride-8 map).
        hidden: channels of each branch's hidden layer (512 in the paper).
    """

    def __init__(self, in_channels: int, k: int = 5, m: int = 21, hidden: int = 512) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("k", k), ("m", m), ("hidden", hidden)):
            check_int(value, name, 1)
        if not k <= m:
            raise ArgumentValueError(f"need 1 <= k <= m, got k={k}, m={m}")
        self.k, self.m = k, m
        self.instance = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, k * k, 3, padding=1)
        )
        self.objectness = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1)
        )

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """features (N, in_channels, H, W) -> (scores (N, k * k, H, W), objectness logits (N, 1, H, W))."""
        return self.instance(features), self.objectness(features)

    def _top_left(self, centres: torch.Tensor, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        half = self.m // 2
        return centres // width - half, centres % width - half

    def sample_windows(
        self, objectness: torch.Tensor, n: int = 256, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Draws n training windows per image, centres uniform over the map's positions.

        Args:
            objectness: (N, 1, H, W) (only its shape and device are used).
            n: windows per image.
            generator: optional torch.Generator on objectness's device.

        Returns:
            windows (N * n, 3) int64 rows (batch_index, y0, x0), image-major, for
            :func:`segkernels.ps_assemble` (top-left = centre - m // 2).
        """
        if objectness.dim() != 4 or objectness.shape[1] != 1:
            raise ArgumentValueError(f"objectness must have shape (N, 1, H, W), got {tuple(objectness.shape)}")
        n = check_int(n, "n", 0)
        batch, _, h, w = objectness.shape
        device = objectness.device
        centres = torch.randint(h * w, (batch, n), generator=generator, device=device)
        y0, x0 = self._top_left(centres, w)
        b = torch.arange(batch, device=device).view(-1, 1).expand(batch, n)
        return torch.stack([b, y0, x0], dim=-1).reshape(-1, 3)

    def propose(
        self, scores: torch.Tensor, objectness: torch.Tensor, top_n: int = 100
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top_n windows per image by objectness, with their assembled masks.

        Args:
            scores: (N, k * k, H, W) from forward.
            objectness: (N, 1, H, W) logits from forward.
            top_n: windows per image (at most H * W are returned).

        Returns:
            windows (N * t, 3) int64 (batch_index, y0, x0), image-major, best first;
            objectness logits (N * t,); mask logits (N * t, 1, m, m) (apply sigmoid), where
            t = min(top_n, H * W). No host synchronisation.
        """
        if objectness.dim() != 4 or objectness.shape[1] != 1:
            raise ArgumentValueError(f"objectness must have shape (N, 1, H, W), got {tuple(objectness.shape)}")
        if scores.dim() != 4 or scores.shape[0] != objectness.shape[0] or scores.shape[2:] != objectness.shape[2:]:
            raise ArgumentValueError(
                f"scores must have shape (N, k * k, H, W) matching objectness {tuple(objectness.shape)}, "
                f"got {tuple(scores.shape)}"
            )
        batch, _, h, w = objectness.shape
        t = min(check_int(top_n, "top_n", 0), h * w)
        values, centres = objectness.flatten(1).topk(t, dim=1)
        y0, x0 = self._top_left(centres, w)
        b = torch.arange(batch, device=objectness.device).view(-1, 1).expand(batch, t)
        windows = torch.stack([b, y0, x0], dim=-1).reshape(-1, 3)
        masks = ps_assemble(scores, windows, k=self.k, m=self.m, check_windows=False)
        return windows, values.reshape(-1), masks

    def extra_repr(self) -> str:
        return f"k={self.k}, m={self.m}"
