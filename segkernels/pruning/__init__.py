"""Channel pruning (He, Zhang, Sun, ICCV 2017) on Gram statistics, never building the design matrix.

For a conv layer with input patches Xf (rows, c*K) (K = kh*kw, columns ordered (channel, tap) as
``F.unfold``), flattened weights Wf (n, c*K) and targets Y (rows, n), the LASSO of the paper runs
on the per-channel contributions Z_i = X_i W_i^T. With A = Xf^T Xf and B = Xf^T Y,

    G[i, j] = <Z_i, Z_j> = sum_{k,l} A[(i,k),(j,l)] * (Wf^T Wf)[(i,k),(j,l)]
    q[i]    = <Z_i, Y>   = sum_{k,o} B[(i,k),o] * W[o,i,k]

so the LASSO is a c x c problem (``lasso_gram``: coordinate descent on the Gram, every alpha of a
batch at once), and the least-squares refit of the kept channels is a Cholesky solve on A and B.
A and B are sums over rows: ``LayerStats`` accumulates them batch by batch (every sampled row,
not 400 of them) and all-reduces them across ranks.

Kernels: ``channel_gram`` and ``lasso_gram`` are torch ops (``torch.ops.segkernels.*``): C++ on
the CPU (csrc/pruning), Triton on CUDA. They are not differentiable (no autograd is registered;
they are used on statistics, under ``torch.no_grad``).

Precision: the statistics are accumulated in float64 on every device (A's entries are sums of
tens of thousands of products, and the Gram identity and the normal equations square the
condition number, so float32 loses the small channels' contributions).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import _library
from .._testing import new_output

__all__ = [
    "LayerStats",
    "channel_gram",
    "lasso_gram",
    "select_channels",
    "reconstruct",
    "prune_sequential",
    "PruneReport",
    "LayerReport",
    "reference_channel_gram",
    "reference_lasso_gram",
]


# ----------------------------------------------------------------------------------------------
# References (plain PyTorch; the tests and benchmarks compare the kernels with these)


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


# ----------------------------------------------------------------------------------------------
# Triton GPU kernels (also run on CPU tensors under TRITON_INTERPRET=1, for the tests)

if _library.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _channel_gram_kernel(
        a_ptr, b_ptr, wt_ptr, g_ptr, q_ptr, c, n, K, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        # One program per channel pair (i, j >= i): G[i, j] = sum_{k,o} Wt[i,k,o] (A_ij Wt_j)[k,o],
        # with A_ij the K x K block of A and Wt[i] = W[:, i, :]^T (K, n). M is never formed.
        i = tl.program_id(0)
        j = tl.program_id(1)
        if j >= i:
            cK = c * K
            kk = tl.arange(0, BLOCK_K)
            kmask = kk < K
            a = tl.load(
                a_ptr + (i * K + kk)[:, None].to(tl.int64) * cK + j * K + kk[None, :],
                mask=kmask[:, None] & kmask[None, :],
                other=0.0,
            )
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=a.dtype)
            qacc = tl.zeros([BLOCK_K, BLOCK_N], dtype=a.dtype)
            for o0 in range(0, n, BLOCK_N):
                oo = o0 + tl.arange(0, BLOCK_N)
                m2 = kmask[:, None] & (oo < n)[None, :]
                wj = tl.load(wt_ptr + (j * K + kk)[:, None].to(tl.int64) * n + oo[None, :], mask=m2, other=0.0)
                wi = tl.load(wt_ptr + (i * K + kk)[:, None].to(tl.int64) * n + oo[None, :], mask=m2, other=0.0)
                t = tl.sum(a[:, :, None] * wj[None, :, :], axis=1)
                acc += wi * t
                if i == j:
                    bi = tl.load(b_ptr + (i * K + kk)[:, None].to(tl.int64) * n + oo[None, :], mask=m2, other=0.0)
                    qacc += bi * wi
            g = tl.sum(tl.sum(acc, axis=1), axis=0)
            tl.store(g_ptr + i * c + j, g)
            tl.store(g_ptr + j * c + i, g)
            if i == j:
                tl.store(q_ptr + i, tl.sum(tl.sum(qacc, axis=1), axis=0))

    @triton.jit(do_not_specialize=["c", "max_iter"])
    def _lasso_gram_kernel(
        g_ptr,
        q_ptr,
        thr_ptr,
        tol_ptr,
        init_ptr,
        out_ptr,
        c,
        max_iter,
        HAS_INIT: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program per alpha; the coefficients w and H = G w live in registers. Each
        # coordinate step reads q_j and G_jj as scalars and, only when w_j changes, one row of G
        # (cached in L2, shared by all programs). thr = alpha * n_samples, computed on the host.
        # Everything is float64 whatever G's dtype, as in the C++ kernel: the gap test compares
        # with tol (1e-8 by default), below float32's resolution.
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < c
        thr = tl.load(thr_ptr + pid)
        tol = tl.load(tol_ptr)
        if HAS_INIT:
            w = tl.load(init_ptr + pid.to(tl.int64) * c + offs, mask=mask, other=0.0).to(tl.float64)
        else:
            w = tl.zeros([BLOCK_C], dtype=tl.float64)
        h = tl.zeros([BLOCK_C], dtype=tl.float64)
        qv = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        active = mask & (tl.load(g_ptr + offs * c + offs, mask=mask, other=0.0) != 0.0)
        if HAS_INIT:
            for j in range(0, c):
                wj = tl.sum(tl.where(offs == j, w, 0.0), axis=0)
                row = tl.load(g_ptr + j * c + offs, mask=mask, other=0.0).to(tl.float64)
                h += row * wj
        it = max_iter * 0
        done = max_iter <= 0
        while (it < max_iter) & (done == 0):
            w_max = thr * 0.0
            d_max = thr * 0.0
            for j in range(0, c):
                sel = offs == j
                wj = tl.sum(tl.where(sel, w, 0.0), axis=0)
                hj = tl.sum(tl.where(sel, h, 0.0), axis=0)
                qj = tl.load(q_ptr + j).to(tl.float64)
                gjj = tl.load(g_ptr + j * c + j).to(tl.float64)
                rho = qj - hj + gjj * wj
                mag = tl.abs(rho) - thr
                safe = tl.where(gjj != 0.0, gjj, 1.0)
                nw = tl.where(mag > 0.0, tl.where(rho < 0.0, -mag, mag) / safe, 0.0)
                nw = tl.where(gjj != 0.0, nw, wj)
                d = nw - wj
                if d != 0.0:
                    row = tl.load(g_ptr + j * c + offs, mask=mask, other=0.0).to(tl.float64)
                    h += row * d
                    w = tl.where(sel, nw, w)
                d_max = tl.maximum(d_max, tl.abs(d))
                w_max = tl.maximum(w_max, tl.where(gjj != 0.0, tl.abs(nw), 0.0))
            it += 1
            # sklearn's two tests (lasso_gap_bound in pruning.h and in this module, vectorised).
            r = tl.where(active, qv - h, 0.0)
            wa = tl.where(active, w, 0.0)
            dual = tl.max(tl.abs(r), axis=0)
            qw = tl.sum(qv * wa, axis=0)
            whw = tl.sum(wa * h, axis=0)
            l1 = tl.sum(tl.abs(wa), axis=0)
            s = tl.where(dual > thr, thr / tl.where(dual > thr, dual, 1.0), 1.0)
            lead = tl.where(thr > 0.0, 0.5 * (1.0 - s) * (1.0 - s), 0.0)
            rest = tl.where(thr > 0.0, 0.5 * (1.0 + s * s) * (whw - 2.0 * qw) + thr * l1 + s * qw,
                            tl.sum(r * r, axis=0))
            y2_lower = tl.where(whw > 0.0, qw * qw / tl.where(whw > 0.0, whw, 1.0), 0.0)
            bound = tl.where(rest > 0.0,
                             tl.where(y2_lower > 0.0, lead + rest / tl.where(y2_lower > 0.0, y2_lower, 1.0),
                                      float("inf")),
                             lead)
            done = (d_max == 0.0) | (((w_max == 0.0) | (d_max <= tol * w_max)) & (bound <= tol))
        tl.store(out_ptr + pid.to(tl.int64) * c + offs, w.to(out_ptr.dtype.element_ty), mask=mask)

    def _channel_gram_triton(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor):
        n, c = weight.shape[0], weight.shape[1]
        K = math.prod(weight.shape[2:])
        G = new_output((c, c), dtype=A.dtype, device=A.device)
        q = new_output((c,), dtype=A.dtype, device=A.device)
        if c == 0:
            return G, q
        if n == 0:
            return G.zero_(), q.zero_()
        wt = weight.reshape(n, c * K).t().contiguous()
        block_k = max(2, triton.next_power_of_2(K))
        # (BLOCK_K, BLOCK_K, BLOCK_N) products live in registers: 8192 fp32 or 4096 fp64 per program.
        budget = 8192 if A.dtype == torch.float32 else 4096
        block_n = max(2, min(triton.next_power_of_2(n), max(2, budget // (block_k * block_k))))
        _channel_gram_kernel[(c, c)](A.contiguous(), B.contiguous(), wt, G, q, c, n, K, BLOCK_K=block_k, BLOCK_N=block_n)
        return G, q

    def _lasso_gram_triton(G, q, alphas, n_samples, tol, max_iter, init):
        c, L = G.shape[0], alphas.shape[0]
        out = new_output((L, c), dtype=G.dtype, device=G.device)
        if L == 0 or c == 0:
            return out
        block_c = max(2, triton.next_power_of_2(c))
        init_t = init.contiguous() if init is not None else out
        thresholds = (alphas.double() * float(n_samples)).contiguous()
        tol_t = torch.tensor([float(tol)], dtype=torch.float64, device=G.device)  # a float argument would be fp32
        _lasso_gram_kernel[(L,)](
            G.contiguous(),
            q.contiguous(),
            thresholds,
            tol_t,
            init_t,
            out,
            c,
            int(max_iter),
            HAS_INIT=init is not None,
            BLOCK_C=block_c,
            # A latency-bound loop of tiny reductions: few warps keep them in shuffles.
            num_warps=2 if block_c <= 1024 else 4,
        )
        return out


# ----------------------------------------------------------------------------------------------
# Op registration

if _library.kernels_available():

    @torch.library.register_fake("segkernels::channel_gram")
    def _(A, B, weight):
        c = weight.shape[1]
        return A.new_empty((c, c)), A.new_empty((c,))

    @torch.library.register_fake("segkernels::lasso_gram")
    def _(G, q, alphas, n_samples, tol, max_iter, init):
        return G.new_empty((alphas.shape[0], G.shape[0]))

    if _library.triton_available():
        torch.library.register_kernel("segkernels::channel_gram", "cuda", _channel_gram_triton)
        torch.library.register_kernel("segkernels::lasso_gram", "cuda", _lasso_gram_triton)


def _check_float(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")


def channel_gram(A: torch.Tensor, B: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gram of the per-channel contributions, from the statistics, in one fused kernel.

    Args:
        A: (c*K, c*K) = Xf^T Xf, columns ordered (channel, tap) as F.unfold.
        B: (c*K, n) = Xf^T Y.
        weight: (n, c, kh, kw) (or (n, c, *kernel)), K = kh * kw.
    Returns:
        G (c, c): G[i, j] = sum_{k,l} A[(i,k),(j,l)] (Wf^T Wf)[(i,k),(j,l)] = <Z_i, Z_j>;
        q (c,): q[i] = sum_{k,o} B[(i,k),o] W[o,i,k] = <Z_i, Y>. Wf^T Wf is never formed.
    All three float32 or float64 (one dtype), on one device. Not differentiable.
    """
    _check_float(A, "A")
    _check_float(B, "B")
    _check_float(weight, "weight")
    if not (A.dtype == B.dtype == weight.dtype):
        raise TypeError(f"A, B and weight must share a dtype, got {A.dtype}, {B.dtype} and {weight.dtype}")
    if not (A.device == B.device == weight.device):
        raise ValueError(f"A, B and weight must be on one device, got {A.device}, {B.device} and {weight.device}")
    if weight.dim() < 2:
        raise ValueError(f"weight must be (n, c, *kernel), got shape {tuple(weight.shape)}")
    n, c = weight.shape[0], weight.shape[1]
    K = math.prod(weight.shape[2:])
    if tuple(A.shape) != (c * K, c * K):
        raise ValueError(f"A must be ({c * K}, {c * K}) for weight {tuple(weight.shape)}, got {tuple(A.shape)}")
    if tuple(B.shape) != (c * K, n):
        raise ValueError(f"B must be ({c * K}, {n}) for weight {tuple(weight.shape)}, got {tuple(B.shape)}")
    if not _library.use_compiled(A) or (A.is_cuda and not _library.triton_available()):
        return reference_channel_gram(A, B, weight)
    return torch.ops.segkernels.channel_gram(A, B, weight)


def lasso_gram(
    G: torch.Tensor,
    q: torch.Tensor,
    alphas: torch.Tensor,
    *,
    n_samples: float,
    tol: float = 1e-8,
    max_iter: int = 10000,
    init: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LASSO for every alpha at once, from the Gram: (L, c) coefficients.

    Solves min_beta (1 / (2 n_samples)) ||y - Z beta||^2 + alpha ||beta||_1 (sklearn's Lasso with
    fit_intercept=False, here through G = Z^T Z and q = Z^T y) by cyclic coordinate descent on the
    Gram, one independent problem per alpha (parallel over alphas). The descent stops after a
    sweep whose largest coefficient change is <= tol * the largest coefficient and whose duality
    gap is <= tol * ||y||^2 (sklearn's two tests; the gap is bounded through ||y||^2 >= (q.w)^2 /
    (w.G.w), since the Gram does not carry ||y||^2, so it stops no earlier than sklearn), after a
    sweep that changes nothing, or after max_iter sweeps. float32 inputs are solved in float64.

    Args:
        G: (c, c) symmetric positive semi-definite; q: (c,); alphas: (L,) >= 0, same dtype
            (float32 or float64; float64 recommended).
        n_samples: the number of rows of Z (rows x outputs for channel pruning).
        init: optional (L, c) starting coefficients (warm start along an alpha path).
    """
    _check_float(G, "G")
    _check_float(q, "q")
    if not isinstance(alphas, torch.Tensor):
        alphas = torch.as_tensor(alphas, dtype=G.dtype, device=G.device)
    _check_float(alphas, "alphas")
    if not (G.dtype == q.dtype == alphas.dtype):
        raise TypeError(f"G, q and alphas must share a dtype, got {G.dtype}, {q.dtype} and {alphas.dtype}")
    if not (G.device == q.device == alphas.device):
        raise ValueError("G, q and alphas must be on one device")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"G must be square (c, c), got {tuple(G.shape)}")
    c = G.shape[0]
    if tuple(q.shape) != (c,):
        raise ValueError(f"q must be ({c},), got {tuple(q.shape)}")
    if alphas.dim() != 1:
        raise ValueError(f"alphas must be 1-D (L,), got {tuple(alphas.shape)}")
    if bool((alphas < 0).any()) or not bool(torch.isfinite(alphas).all()):
        raise ValueError("alphas must be finite and >= 0")
    # The solver's soft threshold compares magnitudes: a NaN would pass for zero without a word.
    if not bool(torch.isfinite(G).all()) or not bool(torch.isfinite(q).all()):
        raise ValueError("G and q must be finite (a NaN or inf in the statistics: check the calibration data)")
    if bool((G.diagonal() < 0).any()):
        raise ValueError("G must be positive semi-definite, but its diagonal has a negative entry")
    # The descent reads one triangle's worth of G per coordinate: a G that is not a Gram (a
    # transposed or mis-assembled matrix) would solve some other problem without a word. A Gram
    # summed in a different order on each side of the diagonal is asymmetric by its rounding
    # error, which cancellation inflates: float32 statistics of inputs with a mean of 255 and
    # zero-sum filters gave 2e-3 of max |G| (G itself 5e-3 off), a mean of 1000 gave 3e-2 (G 9%
    # off), a mean of 1e4 gave 0.33 (G wrong by 12x); float64 stayed below 1e-8 at a mean of 1e4.
    asym = float((G - G.T).abs().max()) if c else 0.0
    scale = float(G.abs().max()) if c else 0.0
    if asym > (0.1 if G.dtype == torch.float32 else 1e-6) * scale:
        raise ValueError(
            f"G must be symmetric (a Gram Z^T Z), but max |G - G^T| = {asym:.3g} against max |G| = {scale:.3g}"
            + (" (a float32 Gram this far from symmetric has lost its precision to cancellation: accumulate "
               "the statistics in float64)" if G.dtype == torch.float32 else "")
        )
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, float)) or not 0 < n_samples < math.inf:
        raise ValueError(f"n_samples must be a finite positive number, got {n_samples!r}")
    if not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if init is not None:
        _check_float(init, "init")
        if tuple(init.shape) != (alphas.shape[0], c) or init.dtype != G.dtype or init.device != G.device:
            raise ValueError(
                f"init must be ({alphas.shape[0]}, {c}) {G.dtype} on {G.device}, got {tuple(init.shape)} "
                f"{init.dtype} on {init.device}"
            )
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init must be finite")
    if not _library.use_compiled(G) or (G.is_cuda and not _library.triton_available()):
        return reference_lasso_gram(G, q, alphas, n_samples=n_samples, tol=tol, max_iter=max_iter, init=init)
    return torch.ops.segkernels.lasso_gram(G, q, alphas, float(n_samples), float(tol), int(max_iter), init)


# ----------------------------------------------------------------------------------------------
# Statistics


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
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv must have groups=1 (channel pruning of grouped convs is not supported), got {conv.groups}")
        if isinstance(conv.padding, str):
            raise ValueError(f"conv.padding must be explicit integers, got {conv.padding!r}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
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
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError("x and y must be torch.Tensor")
        if not x.is_floating_point() or not y.is_floating_point():
            raise TypeError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        ho, wo = self.output_size(x.shape[2], x.shape[3])
        expected = (x.shape[0], self.out_channels, ho, wo)
        if tuple(y.shape) != expected:
            raise ValueError(f"y must be {expected} (the conv's output for x), got {tuple(y.shape)}")
        if x.device != self.A.device or y.device != self.A.device:
            raise ValueError(f"x and y must be on {self.A.device}, got {x.device} and {y.device}")
        if positions_per_image is not None and (
            isinstance(positions_per_image, bool) or not isinstance(positions_per_image, int) or positions_per_image <= 0
        ):
            raise ValueError(f"positions_per_image must be a positive int or None, got {positions_per_image!r}")
        N = x.shape[0]
        if N == 0 or ho * wo == 0:
            return self
        if positions_per_image is None or positions_per_image >= ho * wo:
            xf = self.patches(x, None, None)
            yf = y.permute(0, 2, 3, 1).reshape(-1, self.out_channels)
        else:
            P = positions_per_image
            scores = torch.rand(N, ho * wo, device=y.device, generator=generator)
            flat = scores.topk(P, dim=1).indices  # P distinct positions per image
            rows, cols = flat // wo, flat % wo
            xf = self.patches(x, rows, cols)
            yf = y[torch.arange(N, device=y.device)[:, None], :, rows, cols].reshape(-1, self.out_channels)
        return self.update_rows(xf, yf)

    @torch.no_grad()
    def update_rows(self, patches: torch.Tensor, targets: torch.Tensor) -> "LayerStats":
        """Adds explicit rows: patches (rows, c*K) ordered (channel, tap) as F.unfold, and
        targets (rows, n) without bias (for rows sampled elsewhere)."""
        if not isinstance(patches, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("patches and targets must be torch.Tensor")
        cK, n = self.A.shape[0], self.out_channels
        if patches.dim() != 2 or patches.shape[1] != cK:
            raise ValueError(f"patches must be (rows, {cK}), got {tuple(patches.shape)}")
        if tuple(targets.shape) != (patches.shape[0], n):
            raise ValueError(f"targets must be ({patches.shape[0]}, {n}), got {tuple(targets.shape)}")
        if not patches.is_floating_point() or not targets.is_floating_point():
            raise TypeError(f"patches and targets must be floating point, got {patches.dtype} and {targets.dtype}")
        if patches.device != self.A.device or targets.device != self.A.device:
            raise ValueError(f"patches and targets must be on {self.A.device}")
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
            raise ValueError("stats holds no rows: call update() with calibration data first")
        if not all(bool(torch.isfinite(t).all()) for t in (self.A, self.B, self.x_sum, self.y_sum, self.y_sq)):
            raise ValueError("stats hold a NaN or inf: the calibration inputs or outputs were not finite")

    def _check_weight(self, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        expected = (self.out_channels, self.in_channels, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must be {expected} for these statistics, got {tuple(weight.shape)}")


# ----------------------------------------------------------------------------------------------
# Channel selection: warm-started alpha path plus bracketing


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
        raise TypeError(f"stats must be a LayerStats, got {type(stats).__name__}")
    stats._check_weight(weight)
    c = stats.in_channels
    if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= c:
        raise ValueError(f"n_keep must be an int in [1, {c}], got {n_keep!r}")
    stats._check_usable()
    device = stats.A.device
    if n_keep == c:
        return torch.arange(c, dtype=torch.int64), torch.ones(c, dtype=torch.float64, device=device)
    G, q = stats.gram(weight)
    n_samples = float(stats.rows * stats.out_channels)
    alpha_max = float(q.abs().max()) / n_samples
    if points is None:
        points = 64 if device.type == "cuda" else 4
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive int, got {points!r}")
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


# ----------------------------------------------------------------------------------------------
# Reconstruction


def _kept_columns(stats: LayerStats, keep: torch.Tensor) -> torch.Tensor:
    K = stats.K
    return (keep[:, None] * K + torch.arange(K)[None, :]).reshape(-1).to(stats.A.device)


def _check_ridge(ridge) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")


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
        raise TypeError(f"stats must be a LayerStats, got {type(stats).__name__}")
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
        raise TypeError(f"keep must be a 1-D int64 tensor of channel indices, got {keep.dtype} {tuple(keep.shape)}")
    keep = keep.long().cpu()
    if keep.numel() == 0 or bool((keep < 0).any()) or bool((keep >= c).any()):
        raise IndexError(f"keep must hold 1 to {c} channel indices in [0, {c}), got {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ValueError("keep must not repeat a channel")
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


# ----------------------------------------------------------------------------------------------
# Pruning a VGG-style sequence


@dataclasses.dataclass
class LayerReport:
    layer: int  # index among the Conv2d modules
    module: int  # position in the Sequential
    channels_before: int
    channels_after: int
    rel_error: float  # relative reconstruction error of the layer's output on the calibration rows
    seconds: float


@dataclasses.dataclass
class PruneReport:
    layers: List[LayerReport]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __str__(self) -> str:
        lines = ["| conv | module | channels before | after | rel. error | seconds |", "|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(
                f"| {r.layer} | {r.module} | {r.channels_before} | {r.channels_after} | {r.rel_error:.4g} | {r.seconds:.3f} |"
            )
        return "\n".join(lines)


_PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


def _progress(iterable, desc: str, total: int):
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False)
    except Exception:  # tqdm is optional
        return iterable


def _run_to(model: nn.Sequential, upto: int, x: torch.Tensor) -> torch.Tensor:
    for m in list(model)[:upto]:
        x = m(x)
    return x


@torch.no_grad()
def prune_sequential(
    model: nn.Sequential,
    calibration_batches: Iterable[torch.Tensor],
    *,
    ratio: Optional[float] = 0.5,
    n_keep: Union[int, Dict[int, int], None] = None,
    layers: Optional[Sequence[int]] = None,
    positions_per_image: Optional[int] = 10,
    generator: Optional[torch.Generator] = None,
    ridge: float = 1e-6,
    progress: bool = True,
) -> Tuple[nn.Sequential, PruneReport]:
    """Prunes the input channels of the convs of a VGG-style nn.Sequential, layer by layer.

    The sequence holds Conv2d (groups=1), optional BatchNorm2d and pass-through modules (ReLU,
    MaxPool2d, AvgPool2d, Dropout, Identity), as a flattened SegNet encoder. For each chosen conv L
    (in order): statistics with inputs from the pruned network so far and targets from the original
    (its output without bias: the accumulated-error correction), select_channels, reconstruct (the
    new bias adds the original one back), and the removed input channels of L become removed output
    channels of the previous conv and of the BatchNorm between them.

    Args:
        model: the nn.Sequential (left untouched; a pruned deep copy is returned).
        calibration_batches: input tensors (N, C, H, W) on the model's device (iterated once per
            pruned layer, so a list).
        ratio: share of input channels kept, n_keep = max(1, round(ratio * c)); ignored when
            n_keep is given.
        n_keep: an int for every layer, or {conv_index: n_keep}.
        layers: 0-based indices among the Conv2d modules whose inputs are pruned; default every
            conv except the first.
        positions_per_image: output positions sampled per image for the statistics (None: all).
        ridge: ridge of the least-squares refit, relative to the mean of the kept patch
            variances (diagonal of A_SS): keeps the refit stable when ReLU leaves channels dead
            or the sampled rows barely outnumber the unknowns. 0 for plain least squares.
        progress: a tqdm progress bar per layer (when tqdm is installed).
    Returns:
        (pruned nn.Sequential with the same module positions, PruneReport).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    _check_ridge(ridge)
    batches = list(calibration_batches)
    if not batches or not all(isinstance(b, torch.Tensor) and b.dim() == 4 for b in batches):
        raise ValueError("calibration_batches must be a non-empty list of (N, C, H, W) tensors")
    mods = list(model)
    for i, mod in enumerate(mods):
        # The model is run layer by layer: a pooling that returns (values, indices) would hand a
        # tuple to the next layer.
        if getattr(mod, "return_indices", False):
            raise ValueError(f"module {i} ({type(mod).__name__}) returns indices; prune_sequential needs each "
                             "module to map a tensor to a tensor")
    conv_pos = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    if not conv_pos:
        raise ValueError("model holds no nn.Conv2d")
    for i in conv_pos:
        if mods[i].groups != 1:
            raise ValueError(f"module {i} is a grouped conv (groups={mods[i].groups}); only groups=1 can be pruned")
    if layers is None:
        layers = list(range(1, len(conv_pos)))
    layers = list(layers)
    for L in layers:
        if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L < len(conv_pos):
            raise IndexError(f"layers must hold conv indices in [1, {len(conv_pos)}) (conv 0 sees the image), got {L!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat a conv, got {layers}")
    layers = sorted(layers)
    from ..nn.pooling import MaxPool2d as _SegkernelsMaxPool2d

    passthrough = (nn.BatchNorm2d, _SegkernelsMaxPool2d) + _PASSTHROUGH
    for L in layers:
        between = mods[conv_pos[L - 1] + 1 : conv_pos[L]]
        bns = [m for m in between if isinstance(m, nn.BatchNorm2d)]
        others = [m for m in between if not isinstance(m, passthrough)]
        if others or len(bns) > 1:
            raise ValueError(
                f"between conv {L - 1} and conv {L} only one BatchNorm2d and pass-through modules "
                f"(ReLU, MaxPool2d, ...) may appear, got {[type(m).__name__ for m in between]}"
            )

    def target_keep(L: int, c: int) -> int:
        if n_keep is not None:
            k = n_keep.get(L) if isinstance(n_keep, dict) else n_keep
            if k is None:
                k = max(1, round(ratio * c)) if ratio is not None else c
        else:
            if ratio is None or not 0 < ratio <= 1:
                raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
            k = max(1, int(round(ratio * c)))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c:
            raise ValueError(f"n_keep for conv {L} must be an int in [1, {c}], got {k!r}")
        return k

    for L in layers:  # validate before any work
        target_keep(L, mods[conv_pos[L]].in_channels)

    original = model
    pruned = copy.deepcopy(model)
    was_training = original.training
    original.eval()  # BatchNorm must use (and not update) its running statistics
    pruned.eval()
    try:
        report = _prune_layers(original, pruned, mods, conv_pos, layers, batches, target_keep,
                               positions_per_image, generator, progress, ridge)
    finally:
        original.train(was_training)
    pruned.train(was_training)
    return pruned, PruneReport(report)


def _prune_layers(original, pruned, mods, conv_pos, layers, batches, target_keep, positions_per_image, generator,
                  progress, ridge) -> List[LayerReport]:
    pmods = list(pruned)
    report: List[LayerReport] = []
    for L in layers:
        start = time.perf_counter()
        pos = conv_pos[L]
        conv_o = mods[pos]
        conv_p = pmods[pos]
        c = conv_p.in_channels
        k = target_keep(L, c)
        stats = LayerStats(conv_p)
        w_o = conv_o.weight.detach()
        it = _progress(batches, f"conv {L} statistics", len(batches)) if progress else batches
        for xb in it:
            x_p = _run_to(pruned, pos, xb)
            x_o = _run_to(original, pos, xb)
            y = F.conv2d(x_o, w_o, None, conv_o.stride, conv_o.padding, conv_o.dilation)
            stats.update(x_p, y, positions_per_image=positions_per_image, generator=generator)
        keep, _ = select_channels(stats, conv_p.weight.detach(), k)
        ridge_abs = 0.0
        if ridge:
            cols = _kept_columns(stats, keep)
            ridge_abs = ridge * float(stats.A.diagonal()[cols].mean())
        weight, bias = reconstruct(stats, keep, ridge=ridge_abs)
        err = reconstruction_error(stats, keep, weight, bias)
        if conv_o.bias is not None:
            bias = bias + conv_o.bias.detach().double()
        # This conv: only the kept inputs, refitted weights and bias.
        new_conv = nn.Conv2d(
            k, conv_p.out_channels, conv_p.kernel_size, conv_p.stride, conv_p.padding, conv_p.dilation, bias=True
        ).to(device=conv_p.weight.device, dtype=conv_p.weight.dtype)
        new_conv.train(conv_p.training)
        new_conv.weight.copy_(weight)
        new_conv.bias.copy_(bias)
        pruned[pos] = new_conv
        # Previous conv's outputs and the BatchNorm between.
        prev_pos = conv_pos[L - 1]
        prev = pmods[prev_pos]
        kd = keep.to(prev.weight.device)
        new_prev = nn.Conv2d(
            prev.in_channels, k, prev.kernel_size, prev.stride, prev.padding, prev.dilation, bias=prev.bias is not None
        ).to(device=prev.weight.device, dtype=prev.weight.dtype)
        new_prev.weight.copy_(prev.weight[kd])
        if prev.bias is not None:
            new_prev.bias.copy_(prev.bias[kd])
        pruned[prev_pos] = new_prev
        for i in range(prev_pos + 1, pos):
            m = pmods[i]
            if isinstance(m, nn.BatchNorm2d):
                bn = nn.BatchNorm2d(k, m.eps, m.momentum, m.affine, m.track_running_stats).to(
                    device=kd.device, dtype=m.weight.dtype if m.weight is not None else torch.float32
                )
                if m.affine:
                    bn.weight.copy_(m.weight[kd])
                    bn.bias.copy_(m.bias[kd])
                if m.track_running_stats:
                    bn.running_mean.copy_(m.running_mean[kd])
                    bn.running_var.copy_(m.running_var[kd])
                    bn.num_batches_tracked.copy_(m.num_batches_tracked)
                bn.train(m.training)
                pruned[i] = bn
        pmods = list(pruned)
        report.append(
            LayerReport(
                layer=L, module=pos, channels_before=c, channels_after=k, rel_error=err,
                seconds=time.perf_counter() - start,
            )
        )
    return report
