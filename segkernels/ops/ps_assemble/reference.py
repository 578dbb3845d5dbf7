"""Plain-PyTorch references of the position-sensitive assembly: advanced indexing over every
window's cells."""

from __future__ import annotations

import torch

__all__ = ["dense_windows", "reference_ps_assemble", "reference_ps_assemble_dense"]


def dense_windows(n: int, h: int, w: int, m: int, stride: int = 1, device=None) -> torch.Tensor:
    """Windows (n * ceil(h / stride) * ceil(w / stride), 3) of the dense op, image-major then
    row-major: the window centred at (y, x) of the stride grid has top-left (y - m // 2, x - m // 2)."""
    b = torch.arange(n, device=device)
    ys = torch.arange(0, h, stride, device=device) - m // 2
    xs = torch.arange(0, w, stride, device=device) - m // 2
    bb, yy, xx = torch.meshgrid(b, ys, xs, indexing="ij")
    return torch.stack([bb, yy, xx], dim=-1).reshape(-1, 3)


def reference_ps_assemble(
    scores: torch.Tensor, windows: torch.Tensor, k: int, m: int, pad_value: float = 0.0
) -> torch.Tensor:
    """Plain advanced indexing: (R, G, m, m). Raises IndexError for a batch index out of range."""
    n, c, h, w = scores.shape
    g = c // (k * k)
    b = windows[:, 0]
    if bool(((b < 0) | (b >= n)).any()):
        raise IndexError("reference_ps_assemble: windows hold a batch index outside the batch")
    off = torch.arange(m, device=scores.device)
    cell = off * k // m
    yy = windows[:, 1:2] + off  # (R, m)
    xx = windows[:, 2:3] + off
    ch = torch.arange(g, device=scores.device).view(g, 1, 1) * (k * k) + cell.view(1, m, 1) * k + cell.view(1, 1, m)
    valid = ((yy >= 0) & (yy < h))[:, None, :, None] & ((xx >= 0) & (xx < w))[:, None, None, :]
    if h == 0 or w == 0:  # every cell lies outside an empty map: nothing to index
        return torch.full((windows.shape[0], g, m, m), pad_value, dtype=scores.dtype, device=scores.device)
    yc = yy.clamp(0, h - 1)
    xc = xx.clamp(0, w - 1)
    picked = scores[b.view(-1, 1, 1, 1), ch.unsqueeze(0), yc[:, None, :, None], xc[:, None, None, :]]
    return torch.where(valid, picked, torch.full((), pad_value, dtype=scores.dtype, device=scores.device))


def reference_ps_assemble_dense(
    scores: torch.Tensor, k: int, m: int, stride: int = 1, pad_value: float = 0.0
) -> torch.Tensor:
    """The sparse reference on every window of the stride grid: (N, G, Ho, Wo, m, m)."""
    n, c, h, w = scores.shape
    ho, wo = -(-h // stride), -(-w // stride)
    out = reference_ps_assemble(scores, dense_windows(n, h, w, m, stride, scores.device), k, m, pad_value)
    return out.view(n, ho, wo, c // (k * k), m, m).permute(0, 3, 1, 2, 4, 5).contiguous()

