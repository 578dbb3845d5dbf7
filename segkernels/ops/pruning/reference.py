"""Plain-PyTorch references of the channel-pruning kernels: the Gram identity written out with
the materialised Wf^T Wf, and sklearn's coordinate descent on the Gram, one coordinate at a
time."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["reference_channel_gram", "reference_lasso_gram", "lasso_gap_bound"]


def reference_channel_gram(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """G and q through the materialised M = Wf^T Wf (the identity written out)."""
    n, c = weight.shape[0], weight.shape[1]
    K = math.prod(weight.shape[2:])
    wf = weight.reshape(n, c * K)
    M = wf.t() @ wf
    G = (A * M).reshape(c, K, c, K).sum(dim=(1, 3))
    q = (B * wf.t()).reshape(c, K, n).sum(dim=(1, 2))
    return G, q


def lasso_gap_bound(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor, g_diag: torch.Tensor, thr: float) -> float:
    """An upper bound on sklearn's duality gap / ||y||^2 for coefficients w with h = G w (float64).

    With s = min(1, thr / max|q - h|) the gap is 0.5 (1 - s)^2 ||y||^2 + rest, where rest does not
    involve ||y||^2, and ||y||^2 >= (q.w)^2 / (w.G.w) (the fit of y along Z w): so testing the
    bound against tol stops no earlier than sklearn's test on the true gap. For thr = 0 (least
    squares) sklearn tests ||q - h||^2 instead. Channels with G_jj = 0 are left out."""
    act = g_diag != 0
    wa, r, qa = w[act], (q - h)[act], q[act]
    qw, whw, l1 = float(qa @ wa), float(wa @ h[act]), float(wa.abs().sum())
    if thr > 0:
        dual = float(r.abs().max()) if r.numel() else 0.0
        s = thr / dual if dual > thr else 1.0
        lead, rest = 0.5 * (1.0 - s) ** 2, 0.5 * (1.0 + s * s) * (whw - 2.0 * qw) + thr * l1 + s * qw
    else:
        lead, rest = 0.0, float(r @ r)
    if not rest > 0:
        return lead
    y2_lower = qw * qw / whw if whw > 0 else 0.0
    return lead + rest / y2_lower if y2_lower > 0 else math.inf


def reference_lasso_gram(
    G: torch.Tensor,
    q: torch.Tensor,
    alphas: torch.Tensor,
    *,
    n_samples: float,
    tol: float = 1e-8,
    max_iter: int = 10000,
    init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cyclic coordinate descent on the Gram for each alpha (sklearn's enet_coordinate_descent_gram
    with l2 = 0), stopping as sklearn does: when the largest update of a sweep is <= tol * the
    largest coefficient and the duality gap is <= tol * ||y||^2 (through a bound that does not
    need ||y||^2: see lasso_gap_bound), or when a sweep changes nothing."""
    c, L = G.shape[0], alphas.shape[0]
    Gd, qd = G.double(), q.double()
    out = torch.zeros(L, c, dtype=torch.float64)
    for a in range(L):
        thr = float(alphas[a]) * n_samples
        w = torch.zeros(c, dtype=torch.float64) if init is None else init[a].double().cpu().clone()
        h = Gd.cpu() @ w
        gc, qc = Gd.cpu(), qd.cpu()
        for _ in range(max_iter):
            w_max = d_max = 0.0
            for j in range(c):
                gjj = float(gc[j, j])
                if gjj == 0.0:
                    continue
                old = float(w[j])
                rho = float(qc[j]) - float(h[j]) + gjj * old
                new = math.copysign(max(abs(rho) - thr, 0.0), rho) / gjj
                if new != old:
                    h += gc[j] * (new - old)
                    w[j] = new
                    d_max = max(d_max, abs(new - old))
                w_max = max(w_max, abs(new))
            if d_max == 0.0:
                break
            if (w_max == 0.0 or d_max <= tol * w_max) and lasso_gap_bound(w, h, qc, gc.diagonal(), thr) <= tol:
                break
        out[a] = w
    return out.to(device=G.device, dtype=G.dtype)

