"""LayerStats: the sufficient statistics of one conv layer for channel pruning, accumulated
batch by batch and all-reduced across ranks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ArgumentTypeError, ArgumentValueError, check_int
from ..ops.pruning import channel_gram

__all__ = ["LayerStats"]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class LayerStats:
    """Sufficient statistics of one Conv2d for channel pruning, accumulated over calibration data.

    Holds, in float64 on the conv's device: A = Xf^T Xf (cK, cK), B = Xf^T Y (cK, n), the column
    sums x_sum (cK,) and y_sum (n,), y_sq = ||Y||^2 and the row count, where Xf are the unfolded
    input patches (columns ordered (channel, tap) as F.unfold) and Y the targets at the sampled
    output positions. Everything the LASSO and the least-squares refit need; rows are never kept.
    """

    def __init__(self, conv: nn.Conv2d):
        if not isinstance(conv, nn.Conv2d):
            raise ArgumentTypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ArgumentValueError(f"conv must have groups=1 (channel pruning of grouped convs is not supported), got {conv.groups}")
        if isinstance(conv.padding, str):
            raise ArgumentValueError(f"conv.padding must be explicit integers, got {conv.padding!r}")
        if conv.padding_mode != "zeros":
            raise ArgumentValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride = _pair(conv.stride)
        self.padding = _pair(conv.padding)
        self.dilation = _pair(conv.dilation)
        self.K = self.kernel_size[0] * self.kernel_size[1]
        device = conv.weight.device
        cK, n = self.in_channels * self.K, self.out_channels
        dd = dict(dtype=torch.float64, device=device)
        self.A = torch.zeros(cK, cK, **dd)
        self.B = torch.zeros(cK, n, **dd)
        self.x_sum = torch.zeros(cK, **dd)
        self.y_sum = torch.zeros(n, **dd)
        self.y_sq = torch.zeros((), **dd)
        self.count = torch.zeros((), **dd)

    @property
    def rows(self) -> int:
        return int(self.count.item())

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        out = []
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation):
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    def patches(self, x: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
        """Unfolded patches (N * P, c*K) at output positions (rows, cols) of shape (N, P), or all."""
        if rows is None:
            u = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
            return u.transpose(1, 2).reshape(-1, u.shape[1])
        N, c, H, W = x.shape
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        kh, kw = self.kernel_size
        ti = torch.arange(kh, device=x.device).repeat_interleave(kw) * dh  # (K,)
        tj = torch.arange(kw, device=x.device).repeat(kh) * dw
        hi = rows[:, :, None] * sh - ph + ti  # (N, P, K), may fall in the zero padding
        wi = cols[:, :, None] * sw - pw + tj
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        nidx = torch.arange(N, device=x.device)[:, None, None]
        # Gathers only the sampled taps (no padded copy of x); taps in the padding read a clamped
        # neighbour and are zeroed. Advanced indices first, then the sliced channel dim.
        g = x[nidx, :, hi.clamp(0, H - 1), wi.clamp(0, W - 1)]  # (N, P, K, c)
        g = torch.where(inside[..., None], g, g.new_zeros(()))
        return g.permute(0, 1, 3, 2).reshape(N * rows.shape[1], c * self.K)

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        positions_per_image: Optional[int] = 10,
        generator: Optional[torch.Generator] = None,
    ) -> "LayerStats":
        """Adds a batch.

        Args:
            x: the conv's input (N, c, H, W), any float dtype, taken from the network being pruned.
            y: the target output (N, n, H', W') of the original layer, without its bias.
            positions_per_image: random output positions sampled per image (without replacement,
                at most H' * W'); None takes every position.
            generator: for the sampling (on y's device).
        """
        self._check_batch(x, y)
        if positions_per_image is not None:
            positions_per_image = check_int(positions_per_image, "positions_per_image", 1)
        xf, yf, _, _ = self.sample_rows(x, y, positions_per_image, generator)
        if xf.shape[0]:
            self.update_rows(xf, yf)
        return self

    def _check_batch(self, x, y) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ArgumentTypeError("x and y must be torch.Tensor")
        if not x.is_floating_point() or not y.is_floating_point():
            raise ArgumentTypeError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ArgumentValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        expected = (x.shape[0], self.out_channels, ho, wo)
        if tuple(y.shape) != expected:
            raise ArgumentValueError(f"y must be {expected} (the conv's output for x), got {tuple(y.shape)}")
        if x.device != self.A.device or y.device != self.A.device:
            raise ArgumentValueError(f"x and y must be on {self.A.device}, got {x.device} and {y.device}")

    def sample_rows(self, x: torch.Tensor, y: torch.Tensor, positions_per_image: Optional[int],
                    generator: Optional[torch.Generator] = None, holdout: int = 0):
        """Rows (patches (rows, c*K), targets (rows, n)) at positions_per_image random output
        positions of every image (all positions for None), and at up to `holdout` further positions
        of each image, disjoint from those: (xf, yf, xh, yh). x and y as in update()."""
        N, (ho, wo) = x.shape[0], self.output_size(x.shape[2], x.shape[3])
        P = ho * wo if positions_per_image is None else min(positions_per_image, ho * wo)
        held = min(holdout, ho * wo - P)
        if held == 0 and P == ho * wo and N * P > 0:  # every position: one unfold
            none = (x.new_zeros(0, self.A.shape[0]), y.new_zeros(0, self.out_channels))
            return (self.patches(x, None, None), y.permute(0, 2, 3, 1).reshape(-1, self.out_channels)) + none
        scores = torch.rand(N, ho * wo, device=y.device, generator=generator)
        fitted = scores.topk(P, dim=1).indices  # P distinct positions per image
        # The held-out positions: the next highest scores, among those not fitted.
        rest = scores.scatter(1, fitted, float("-inf")).topk(held, dim=1).indices
        picked = []
        for part in (fitted, rest):
            if part.shape[1] == 0 or N == 0:
                picked += [x.new_zeros(0, self.A.shape[0]), y.new_zeros(0, self.out_channels)]
                continue
            rows, cols = part // wo, part % wo
            picked.append(self.patches(x, rows, cols))
            picked.append(y[torch.arange(N, device=y.device)[:, None], :, rows, cols].reshape(-1, self.out_channels))
        return tuple(picked)

    @torch.no_grad()
    def update_rows(self, patches: torch.Tensor, targets: torch.Tensor) -> "LayerStats":
        """Adds explicit rows: patches (rows, c*K) ordered (channel, tap) as F.unfold, and
        targets (rows, n) without bias (for rows sampled elsewhere)."""
        if not isinstance(patches, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ArgumentTypeError("patches and targets must be torch.Tensor")
        cK, n = self.A.shape[0], self.out_channels
        if patches.dim() != 2 or patches.shape[1] != cK:
            raise ArgumentValueError(f"patches must be (rows, {cK}), got {tuple(patches.shape)}")
        if tuple(targets.shape) != (patches.shape[0], n):
            raise ArgumentValueError(f"targets must be ({patches.shape[0]}, {n}), got {tuple(targets.shape)}")
        if not patches.is_floating_point() or not targets.is_floating_point():
            raise ArgumentTypeError(f"patches and targets must be floating point, got {patches.dtype} and {targets.dtype}")
        if patches.device != self.A.device or targets.device != self.A.device:
            raise ArgumentValueError(f"patches and targets must be on {self.A.device}")
        xf = patches.double()
        yf = targets.double()
        self.A.addmm_(xf.t(), xf)
        self.B.addmm_(xf.t(), yf)
        self.x_sum += xf.sum(0)
        self.y_sum += yf.sum(0)
        self.y_sq += (yf * yf).sum()
        self.count += xf.shape[0]
        return self

    def all_reduce(self, group=None) -> "LayerStats":
        """Sums the statistics over the ranks of a torch.distributed group (in place)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("all_reduce needs an initialised torch.distributed process group")
        for t in (self.A, self.B, self.x_sum, self.y_sum, self.y_sq, self.count):
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    def gram(self, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """G (c, c) and q (c,) of the per-channel contributions for this conv's weight."""
        self._check_weight(weight)
        return channel_gram(self.A, self.B, weight.detach().to(self.A))

    def _check_usable(self) -> None:
        if self.rows == 0:
            raise ArgumentValueError("stats holds no rows: call update() with calibration data first")
        if not all(bool(torch.isfinite(t).all()) for t in (self.A, self.B, self.x_sum, self.y_sum, self.y_sq)):
            raise ArgumentValueError("stats hold a NaN or inf: the calibration inputs or outputs were not finite")

    def _check_weight(self, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor):
            raise ArgumentTypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        expected = (self.out_channels, self.in_channels, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ArgumentValueError(f"weight must be {expected} for these statistics, got {tuple(weight.shape)}")

