"""The peers' own formulations, as their users run them (their defaults): the baselines of the
benchmarks, and the official pruning pipeline the pruning tests compare with.

- Pixel-wise KD: mmrazor's KLDivergence / CIRKD's CriterionKD,
  F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1)) summed over classes, mean over pixels,
  times T^2. Neither masks ignored pixels.
- Channel-wise KD: mmrazor's ChannelWiseDivergence (softmax over each (n, c) row of H * W,
  sum of p_t (log p_t - log p_s), times T^2, over N * C).
- Hinton's total: F.cross_entropy with ignore_index plus the pixel-wise KD above (CIRKD).
- Channel pruning: the official code of He et al. 2017 (ethanhe42/channel-pruning,
  lib/decompose.py `dictionary`, defaults from lib/cfgs.py): the design matrix Z from
  min(400, N // 20) sampled rows; one sklearn Lasso(warm_start=True, selection='random') with
  sklearn's defaults (tol=1e-4, max_iter=1000, fit_intercept=True) refitted along the search:
  alpha doubled from 1e-3 until fewer than c' channels survive, then bisected until
  c' <= nnz <= 1.1 c'; then LinearRegression on every row's patches of the kept channels.
- Chained residual pooling: light-weight RefineNet's CRPBlock (nn.MaxPool2d(5, 1, 2) and 1 x 1
  convolutions without bias), as the official code writes it.
- Offset max-pooling: OverFeat's definition, one F.max_pool2d(k, k) per offset slice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mmrazor_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pixel-wise KD as mmrazor's KLDivergence and CIRKD compute it (no ignore mask)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher.detach() / t, 1), reduction="none")
    return kl.sum(1).mean() * (t * t)


def mmrazor_cwd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """mmrazor's ChannelWiseDivergence: a softmax over each (n, c) row of positions."""
    n, c = student.shape[:2]
    t = temperature
    s_rows, t_rows = student.reshape(n * c, -1) / t, teacher.detach().reshape(n * c, -1) / t
    p_t = F.softmax(t_rows, dim=1)
    loss = torch.sum(p_t * F.log_softmax(t_rows, dim=1) - p_t * F.log_softmax(s_rows, dim=1)) * (t * t)
    return loss / (n * c)


def cirkd_seg_kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      ignore_index: int = 255) -> torch.Tensor:
    """Hinton's total as segmentation KD code computes it: cross-entropy plus the pixel-wise KD."""
    return F.cross_entropy(student, labels, ignore_index=ignore_index) + mmrazor_kd_loss(student, teacher, temperature)


def design_matrix(patches: torch.Tensor, weight: torch.Tensor) -> np.ndarray:
    """The official Z ((rows * n) x c): column i is vec(X_i W_i^T) over the given rows, in float64."""
    n, c = weight.shape[:2]
    K = weight[0, 0].numel()
    x = patches.double().reshape(patches.shape[0], c, K)
    w = weight.detach().double().reshape(n, c, K)
    return torch.einsum("rck,nck->rnc", x, w).reshape(-1, c).numpy()


def official_lasso_search(Z: np.ndarray, y: np.ndarray, n_keep: int, *, alpha: float = 1e-3,
                          rank_tol: float = 0.1, seed: int = 0, **lasso_options) -> np.ndarray:
    """The official channel selection: the kept-channel mask (c,) of the search's last Lasso.

    lasso_options override sklearn's defaults (the official code keeps them)."""
    from sklearn.linear_model import Lasso

    solver = Lasso(alpha=alpha, warm_start=True, selection="random", random_state=seed, **lasso_options)

    def solve(a):
        solver.alpha = a
        solver.fit(Z, y)
        keep = solver.coef_ != 0
        return keep, int(keep.sum())

    low, high = n_keep, n_keep + rank_tol * n_keep
    left, right = 0.0, alpha
    while solve(right)[1] >= n_keep:
        right *= 2
    for _ in range(200):  # the official loop has no bound; ties in the path could cycle it
        a = (left + right) / 2
        keep, nnz = solve(a)
        if nnz > high:
            left = a
        elif nnz < low:
            right = a
        else:
            return keep
    raise RuntimeError(f"the bisection found no alpha keeping {low} to {high} channels")


def official_channel_pruning(patches: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, n_keep: int,
                             *, seed: int = 0):
    """The official pipeline on one layer's sampled rows: (kept channel indices, weight (n, c'K),
    bias (n,)) of LinearRegression on the kept channels' patches."""
    from sklearn.linear_model import LinearRegression

    rows = patches.shape[0]
    rng = np.random.RandomState(seed)
    sample = rng.randint(0, rows, min(400, rows // 20))
    Z = design_matrix(patches[sample], weight)
    y = targets[sample].double().reshape(-1).numpy()
    keep = np.nonzero(official_lasso_search(Z, y, n_keep, seed=seed))[0]
    K = weight[0, 0].numel()
    cols = (keep[:, None] * K + np.arange(K)).reshape(-1)
    fit = LinearRegression().fit(patches[:, cols].double().numpy(), targets.double().numpy())
    return torch.from_numpy(keep), fit.coef_, fit.intercept_


class PlainCRP(nn.Module):
    """Light-weight RefineNet's CRPBlock over the given 1 x 1 convolutions (official code)."""

    def __init__(self, convs, kernel_size: int = 5):
        super().__init__()
        self.convs = convs
        self.pool = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)

    def forward(self, x):
        top = x
        for conv in self.convs:
            top = conv(self.pool(top))
            x = top + x
        return x


def offsets_by_definition(x: torch.Tensor, k: int) -> torch.Tensor:
    """OverFeat's offset max-pooling: (N, k * k, C, ho, wo), one F.max_pool2d per offset."""
    H, W = x.shape[2:]
    ho, wo = (H - k + 1) // k, (W - k + 1) // k
    return torch.stack([F.max_pool2d(x[..., dy:dy + ho * k, dx:dx + wo * k], k, k)
                        for dy in range(k) for dx in range(k)], 1)
