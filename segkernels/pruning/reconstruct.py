"""Least-squares reconstruction of a pruned layer from its statistics (a Cholesky solve of the
normal equations), and its relative error."""

from __future__ import annotations

from typing import Tuple

import torch

from .._checks import ArgumentIndexError, ArgumentTypeError, ArgumentValueError, check_real
from .stats import LayerStats

__all__ = ["reconstruct", "reconstruction_error"]


def _kept_columns(stats: LayerStats, keep: torch.Tensor) -> torch.Tensor:
    K = stats.K
    return (keep[:, None] * K + torch.arange(K)[None, :]).reshape(-1).to(stats.A.device)


def _check_ridge(ridge) -> float:
    return check_real(ridge, "ridge", minimum=0.0)


@torch.no_grad()
def reconstruct(stats: LayerStats, keep: torch.Tensor, *, ridge: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Least-squares weights and bias for the kept input channels, from the statistics.

    Minimises ||Y - Xf_S W^T - 1 b^T||^2 (+ ridge ||W||^2) over W (n, n_keep*K) and b (n,) via the
    normal equations [[A_SS, s_S], [s_S^T, rows]] [W^T; b^T] = [B_S; y_sum^T] (Cholesky; when the
    system is singular, e.g. fewer rows than unknowns or dead channels, a tiny ridge escalating
    from 1e-12 of the mean diagonal is added to the weights' block until it factorises). Equal to
    torch.linalg.lstsq on the explicit sampled rows with a ones column. Targets are as given to update() (without the original bias).

    Returns weight (n, n_keep, kh, kw) and bias (n,), float64 on the statistics' device.
    """
    if not isinstance(stats, LayerStats):
        raise ArgumentTypeError(f"stats must be a LayerStats, got {type(stats).__name__}")
    keep = _check_keep(keep, stats.in_channels)
    _check_ridge(ridge)
    stats._check_usable()
    sol = _solve_normal(stats, keep, ridge)
    n, kh, kw = stats.out_channels, *stats.kernel_size
    weight = sol[:-1].t().reshape(n, keep.numel(), kh, kw).contiguous()
    return weight, sol[-1].clone()


def _check_keep(keep, c: int) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor):
        keep = torch.as_tensor(keep)
    if keep.dtype not in (torch.int64, torch.int32) or keep.dim() != 1:
        raise ArgumentTypeError(f"keep must be a 1-D int64 tensor of channel indices, got {keep.dtype} {tuple(keep.shape)}")
    keep = keep.long().cpu()
    if keep.numel() == 0 or bool((keep < 0).any()) or bool((keep >= c).any()):
        raise ArgumentIndexError(f"keep must hold 1 to {c} channel indices in [0, {c}), got {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ArgumentValueError("keep must not repeat a channel")
    return keep


def _solve_normal(stats: LayerStats, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    cols = _kept_columns(stats, keep)
    m = cols.numel()
    Aa = torch.empty(m + 1, m + 1, dtype=torch.float64, device=stats.A.device)
    Aa[:m, :m] = stats.A[cols][:, cols]
    Aa[:m, m] = stats.x_sum[cols]
    Aa[m, :m] = stats.x_sum[cols]
    Aa[m, m] = stats.count
    if ridge:
        Aa.diagonal()[:m] += ridge
    Ba = torch.cat([stats.B[cols], stats.y_sum[None, :]], 0)
    L, info = torch.linalg.cholesky_ex(Aa)
    if int(info) == 0:
        return torch.cholesky_solve(Ba, L)
    # Singular (fewer rows than unknowns, or channels dead after a ReLU): a tiny ridge on the
    # weights, escalating from 1e-12 of the mean diagonal, until the factorisation succeeds.
    mean_diag = float(Aa.diagonal()[:m].mean()) if m else 1.0
    for rel in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        Aj = Aa.clone()
        Aj.diagonal()[:m] += rel * max(mean_diag, 1e-300)
        L, info = torch.linalg.cholesky_ex(Aj)
        if int(info) == 0:
            return torch.cholesky_solve(Ba, L)
    return torch.linalg.lstsq(Aa.cpu(), Ba.cpu(), driver="gelsd").solution.to(Aa.device)


def reconstruction_error(stats: LayerStats, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """||Y - Xf_S W^T - b||^2 / ||Y||^2 over the accumulated rows, from the statistics alone."""
    cols = _kept_columns(stats, _check_keep(keep, stats.in_channels))
    w = weight.to(stats.A).reshape(stats.out_channels, -1).t()  # (m, n)
    b = bias.to(stats.A)
    A_ss = stats.A[cols][:, cols]
    quad = (w * (A_ss @ w)).sum() + 2 * (b * (stats.x_sum[cols] @ w)).sum() + stats.count * (b * b).sum()
    lin = (w * stats.B[cols]).sum() + (b * stats.y_sum).sum()
    res = stats.y_sq - 2 * lin + quad
    return float(res.clamp_min(0) / stats.y_sq.clamp_min(1e-300))

