"""Channel selection by the LASSO of He et al. 2017: a warm-started alpha path down from
alpha_max, then bracketing until exactly n_keep channels survive."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import torch

from .._checks import ArgumentTypeError, check_int
from ..ops.pruning import lasso_gram
from .stats import LayerStats

__all__ = ["alpha_search", "select_channels"]


SolveFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def alpha_search(
    solve: SolveFn, alpha_max: float, n_keep: int, c: int, *, points: int = 4, max_rounds: int = 60
) -> Tuple[float, torch.Tensor, bool]:
    """Finds an alpha whose LASSO solution has exactly n_keep non-zeros.

    solve(alphas (L,) float64 CPU, init (L, c) or None) -> (L, c) coefficients. A geometric path
    from alpha_max down (``points`` alphas per batch spanning a factor of 16, each batch
    warm-started from the smallest alpha of the previous one) until some solution has >= n_keep
    non-zeros; then rounds of ``points`` geometric interior points of the bracket (warm-started from the denser end) until a
    solution has exactly n_keep non-zeros or the bracket closes. Returns (alpha, beta, exact); when
    not exact, alpha is the smallest-gap alpha with more than n_keep non-zeros (or the densest seen).
    """
    seen: List[Tuple[float, torch.Tensor, int]] = []

    def run(alphas: List[float], init_beta: Optional[torch.Tensor]):
        a = torch.tensor(alphas, dtype=torch.float64)
        init = None if init_beta is None else init_beta.expand(len(alphas), c).clone()
        betas = solve(a, init)
        res = []
        for k, al in enumerate(alphas):
            b = betas[k]
            nnz = int((b != 0).sum())
            seen.append((al, b, nnz))
            res.append((al, b, nnz))
        return res

    # Path: alpha_max * r^t, t = 1, 2, ..., each batch of ``points`` alphas spanning a factor of
    # 16 (r = 1/2 with 4 points, as the official doubling; finer with more points at once).
    r = 16.0 ** (-1.0 / points)
    hi: Optional[Tuple[float, torch.Tensor, int]] = None  # sparser side: nnz < n_keep
    lo: Optional[Tuple[float, torch.Tensor, int]] = None  # denser side: nnz > n_keep
    warm: Optional[torch.Tensor] = None
    t = 0
    # Not below the smallest normal float: a denormal alpha_max would underflow the floor to 0,
    # and the path (whose alphas underflow to 0 too) would never pass it.
    floor = max(alpha_max * 1e-9, sys.float_info.min)
    while lo is None:
        alphas = [alpha_max * r ** (t + s + 1) for s in range(points)]
        t += points
        for al, b, nnz in run(alphas, warm):
            if nnz == n_keep:
                return al, b, True
            if nnz < n_keep:
                if lo is None:
                    hi = (al, b, nnz)
            elif lo is None:
                lo = (al, b, nnz)
        warm = seen[-1][1]
        if alphas[-1] < floor:
            break
    if lo is None:  # even tiny alphas keep fewer than n_keep channels (zero contributions)
        best = max(seen, key=lambda s: (s[2], -s[0]))
        return best[0], best[1], False
    if hi is None:
        hi = (alpha_max, torch.zeros(c, dtype=torch.float64), 0)
    for _ in range(max_rounds):
        if hi[0] / lo[0] - 1.0 < 1e-12:
            break
        ratio = (hi[0] / lo[0]) ** (1.0 / (points + 1))
        alphas = [lo[0] * ratio ** (s + 1) for s in range(points)]
        new_hi, new_lo = hi, lo
        for al, b, nnz in run(alphas, lo[1]):
            if nnz == n_keep:
                return al, b, True
            if nnz > n_keep and al > new_lo[0] and al < new_hi[0]:
                new_lo = (al, b, nnz)
        for al, b, nnz in seen[-points:]:
            if nnz < n_keep and new_lo[0] < al < new_hi[0]:
                new_hi = (al, b, nnz)
        if new_hi is hi and new_lo is lo:
            break
        hi, lo = new_hi, new_lo
    return lo[0], lo[1], False


def _keep_from_beta(beta: torch.Tensor, n_keep: int, tiebreak: torch.Tensor) -> torch.Tensor:
    # Largest |beta| first; ties (zeros) broken by the channel's own contribution ||Z_i||^2.
    c = beta.shape[0]
    order = sorted(range(c), key=lambda i: (-abs(float(beta[i])), -float(tiebreak[i]), i))
    return torch.tensor(sorted(order[:n_keep]), dtype=torch.int64)


@torch.no_grad()
def select_channels(
    stats: LayerStats,
    weight: torch.Tensor,
    n_keep: int,
    *,
    tol: float = 1e-8,
    max_iter: int = 10000,
    points: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chooses n_keep input channels by the LASSO of He et al. 2017.

    Solves the LASSO over the per-channel contributions (through channel_gram and lasso_gram)
    along a warm-started geometric alpha path down from alpha_max = max|q| / n_samples (halved per
    step with 4 alphas at once; a batch of alphas is solved in parallel), then narrows the
    bracket around n_keep non-zeros with batches of interior alphas. When no
    alpha gives exactly n_keep non-zeros (ties in the path, or channels whose contribution is
    zero), the n_keep largest |beta| at the nearest alpha with more non-zeros are kept (ties by
    ||Z_i||^2, then index). With n_keep == c, every channel is kept and beta is all ones.

    Args:
        stats: accumulated LayerStats of the conv.
        weight: the conv's current weight (n, c, kh, kw).
        n_keep: 1 <= n_keep <= c.
        points: alphas solved at once per step (default 64 on CUDA, 4 on the CPU).
    Returns:
        keep: sorted int64 (n_keep,) channel indices (on the CPU); beta: (c,) float64 LASSO
        coefficients at the chosen alpha (on the statistics' device).
    """
    if not isinstance(stats, LayerStats):
        raise ArgumentTypeError(f"stats must be a LayerStats, got {type(stats).__name__}")
    stats._check_weight(weight)
    c = stats.in_channels
    n_keep = check_int(n_keep, "n_keep", 1, c)
    stats._check_usable()
    device = stats.A.device
    if n_keep == c:
        return torch.arange(c, dtype=torch.int64), torch.ones(c, dtype=torch.float64, device=device)
    G, q = stats.gram(weight)
    n_samples = float(stats.rows * stats.out_channels)
    alpha_max = float(q.abs().max()) / n_samples
    if points is None:
        points = 64 if device.type == "cuda" else 4
    points = check_int(points, "points", 1)
    if alpha_max == 0.0:  # no channel correlates with the targets
        beta = torch.zeros(c, dtype=torch.float64, device=device)
        return _keep_from_beta(beta.cpu(), n_keep, torch.diagonal(G).cpu()), beta

    def solve(alphas, init):
        a = alphas.to(device)
        i = None if init is None else init.to(device)
        return lasso_gram(G, q, a, n_samples=n_samples, tol=tol, max_iter=max_iter, init=i).cpu()

    _, beta, exact = alpha_search(solve, alpha_max, n_keep, c, points=points)
    if exact:
        keep = torch.nonzero(beta).flatten().sort().values
    else:
        keep = _keep_from_beta(beta, n_keep, torch.diagonal(G).cpu())
    return keep, beta.to(device)

