"""Triton kernels of channel_gram and lasso_gram (the CUDA back end; on CPU tensors under
TRITON_INTERPRET=1 for the tests), their launchers, and their registration as the ops' CUDA
kernels."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ... import _library
from ..._library import new_output

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


if _library.kernels_available():  # the ops' schemas come from the compiled extension
    torch.library.register_kernel("segkernels::channel_gram", "cuda", _channel_gram_triton)
    torch.library.register_kernel("segkernels::lasso_gram", "cuda", _lasso_gram_triton)
