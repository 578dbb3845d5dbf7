"""channel_gram and lasso_gram: the Gram identity against explicit design matrices, the solver
against sklearn's Lasso, opcheck, torch.compile, and the Triton kernels (interpreted, and compiled
for sm_90)."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peers
import segkernels
from helpers import (
    DEVICES,
    compile_launches_for_sm90,
    record_triton_launches,
    requires_kernels,
    run_opcheck,
)
from pruning_cases import _conv, _explicit_rows
from segkernels._library import triton_available
from segkernels.pruning import LayerStats, reference_channel_gram, reference_lasso_gram

pytestmark = requires_kernels


# ---------------------------------------------------------------------------------------------
# channel_gram


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "c,n,k,stride,padding,dilation",
    [(5, 4, 3, 1, 1, 1), (3, 7, (1, 3), 2, (0, 1), 1), (1, 1, 1, 1, 0, 1), (6, 5, 3, 2, 2, 2)],
)
def test_gram_identity_against_explicit_Z(device, c, n, k, stride, padding, dilation):
    conv = _conv(c, n, k, stride, padding, dilation, device).double()
    x = torch.randn(2, c, 9, 11, device=device, dtype=torch.float64)
    stats = LayerStats(conv)
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    stats.update(x, y, positions_per_image=None)
    xf, yf, _ = _explicit_rows(conv, x)
    torch.testing.assert_close(stats.A, xf.t() @ xf, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.B, xf.t() @ yf, rtol=1e-12, atol=1e-10)
    assert stats.rows == xf.shape[0]
    Z = torch.from_numpy(peers.design_matrix(xf.cpu(), conv.weight.cpu())).to(xf.device)
    G, q = segkernels.channel_gram(stats.A, stats.B, conv.weight.detach())
    torch.testing.assert_close(G, Z.t() @ Z, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(q, Z.t() @ yf.reshape(-1), rtol=1e-10, atol=1e-9)
    Gr, qr = reference_channel_gram(stats.A, stats.B, conv.weight.detach())
    torch.testing.assert_close(G, Gr, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(q, qr, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,n,K", [(7, 5, 9), (2, 33, 1), (13, 3, 4), (1, 1, 9)])
def test_channel_gram_matches_reference(device, dtype, c, n, K):
    X = torch.randn(50, c * K, dtype=torch.float64, device=device)
    A = (X.t() @ X).to(dtype)
    B = (X.t() @ torch.randn(50, n, dtype=torch.float64, device=device)).to(dtype)
    w = torch.randn(n, c, K, 1, dtype=dtype, device=device)
    G, q = segkernels.channel_gram(A, B, w)
    Gr, qr = reference_channel_gram(A.double(), B.double(), w.double())
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-9)
    assert G.dtype == dtype and q.dtype == dtype
    torch.testing.assert_close(G.double(), Gr, **tol)
    torch.testing.assert_close(q.double(), qr, **tol)
    # Non-contiguous inputs with the same values (A is symmetric, so A.t() is A).
    B2 = torch.empty(n, c * K, dtype=dtype, device=device).t()
    B2.copy_(B)
    w2 = torch.empty(c, n, K, 1, dtype=dtype, device=device).transpose(0, 1)
    w2.copy_(w)
    G2, q2 = segkernels.channel_gram(A.t(), B2, w2)
    torch.testing.assert_close(G2, G, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)
    torch.testing.assert_close(q2, q, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_channel_gram_empty():
    G, q = segkernels.channel_gram(torch.zeros(0, 0), torch.zeros(0, 4), torch.zeros(4, 0, 3, 3))
    assert G.shape == (0, 0) and q.shape == (0,)
    G, q = segkernels.channel_gram(torch.eye(18, dtype=torch.float64), torch.zeros(18, 0, dtype=torch.float64),
                                   torch.zeros(0, 2, 3, 3, dtype=torch.float64))
    assert torch.equal(G, torch.zeros(2, 2, dtype=torch.float64)) and torch.equal(q, torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# lasso_gram


def _lasso_problem(rows, c, seed, device="cpu", sparse=0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, c, generator=g, dtype=torch.float64)
    mix = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, generator=g, dtype=torch.float64)
    Z = base @ mix  # correlated columns, like channel contributions
    beta = torch.randn(c, generator=g, dtype=torch.float64) * (torch.rand(c, generator=g) < sparse)
    y = Z @ beta + 0.5 * torch.randn(rows, generator=g, dtype=torch.float64)
    return Z.to(device), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,c,seed", [(200, 8, 0), (500, 17, 1), (64, 32, 2), (300, 1, 3)])
def test_lasso_gram_matches_sklearn(device, rows, c, seed):
    from sklearn.linear_model import Lasso

    Z, y = _lasso_problem(rows, c, seed, device)
    G, q = Z.t() @ Z, Z.t() @ y
    alpha_max = float(q.abs().max()) / rows
    alphas = torch.tensor([alpha_max * f for f in (1.5, 0.5, 0.2, 0.05, 0.01, 1e-3)], dtype=torch.float64,
                          device=device)
    beta = segkernels.lasso_gram(G, q, alphas, n_samples=rows, tol=1e-8)
    assert beta.shape == (len(alphas), c) and beta.dtype == torch.float64
    Zn, yn = Z.cpu().numpy(), y.cpu().numpy()
    for a, alpha in enumerate(alphas.tolist()):
        ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-8, max_iter=100000).fit(Zn, yn).coef_
        got = beta[a].cpu().numpy()
        assert np.array_equal(got != 0, ref != 0), (alpha, got, ref)
        scale = max(np.abs(ref).max(), 1e-300)
        assert np.abs(got - ref).max() <= 1e-6 * scale, (alpha, np.abs(got - ref).max() / scale)
    assert not beta[0].any()  # alpha above alpha_max: all zero


def _near_collinear_problem(seed):
    # Pairs of almost equal columns: coordinate descent crawls, and sklearn's duality-gap test
    # keeps it going after the relative-update test has passed.
    g = torch.Generator().manual_seed(seed)
    rows, c = 400, 24
    base = torch.randn(rows, c, generator=g, dtype=torch.float64)
    Z = base @ (torch.eye(c, dtype=torch.float64) + 1.5 * torch.randn(c, c, generator=g, dtype=torch.float64))
    Z[:, 1::2] = Z[:, 0::2] + 0.05 * torch.randn(rows, c // 2, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64) * (torch.rand(c, generator=g) < 0.5)
    return Z, Z @ beta + 0.5 * torch.randn(rows, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,fraction", [(1, 0.05), (5, 0.001)])
def test_lasso_gram_stops_no_earlier_than_sklearns_gap_test(device, seed, fraction):
    from sklearn.linear_model import Lasso

    Z, y = _near_collinear_problem(seed)
    rows = Z.shape[0]
    G, q = Z.t() @ Z, Z.t() @ y
    alpha = float(q.abs().max()) / rows * fraction
    thr = alpha * rows
    got = segkernels.lasso_gram(G.to(device), q.to(device), torch.tensor([alpha], dtype=torch.float64, device=device),
                                n_samples=rows, tol=1e-8, max_iter=1000000)[0].cpu().numpy()
    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-8, max_iter=1000000).fit(Z.numpy(), y.numpy()).coef_
    assert np.array_equal(got != 0, ref != 0)
    # The exact minimiser on that support and signs (the KKT conditions hold off it).
    S = np.flatnonzero(ref)
    Gn, qn = G.numpy(), q.numpy()
    exact = np.zeros_like(ref)
    exact[S] = np.linalg.solve(Gn[np.ix_(S, S)], qn[S] - thr * np.sign(ref[S]))
    assert np.array_equal(np.sign(exact), np.sign(ref))
    assert np.abs(np.delete(qn - Gn @ exact, S)).max() <= thr
    # Both solvers are still ~1e-4 (of the largest coefficient) from it at tol=1e-8 on such
    # problems. Stopping on the relative update alone ended 5-15% fewer sweeps in: 2.5e-4
    # against sklearn's 1.9e-4 (seed 1), 3.0e-4 against 1.4e-4 (seed 5). With the gap bound it
    # stops no earlier than sklearn, so it is no farther.
    scale = np.abs(exact).max()
    err_got, err_ref = np.abs(got - exact).max() / scale, np.abs(ref - exact).max() / scale
    assert err_got <= err_ref * 1.01, (err_got, err_ref)
    assert np.abs(got - ref).max() <= 1e-5 * scale


def test_lasso_gap_bound_bounds_the_true_gap():
    from segkernels.ops.pruning.reference import lasso_gap_bound

    Z, y = _lasso_problem(80, 6, 4)
    G, q, y2 = Z.t() @ Z, Z.t() @ y, float(y @ y)
    g = torch.Generator().manual_seed(0)
    for thr in (0.0, 0.1 * float(q.abs().max()), 2.0 * float(q.abs().max())):
        for _ in range(20):
            w = torch.randn(6, generator=g, dtype=torch.float64) * (torch.rand(6, generator=g) < 0.7)
            r = y - Z @ w
            dual = float((Z.t() @ r).abs().max())
            if thr > 0:  # sklearn's gap (formulation A, l2 = 0)
                s = min(1.0, thr / dual)
                gap = 0.5 * float(r @ r) * (1 + s * s) + thr * float(w.abs().sum()) - s * float(r @ y)
            else:
                gap = float((Z.t() @ r) @ (Z.t() @ r))
            assert lasso_gap_bound(w, G @ w, q, G.diagonal(), thr) >= gap / y2 * (1 - 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_lasso_gram_warm_start_reference_and_float32(device):
    Z, y = _lasso_problem(120, 6, 5, device)
    G, q = Z.t() @ Z, Z.t() @ y
    alphas = torch.tensor([0.5, 0.1, 0.02], dtype=torch.float64, device=device) * float(q.abs().max()) / 120
    cold = segkernels.lasso_gram(G, q, alphas, n_samples=120, tol=1e-10)
    init = torch.randn(3, 6, dtype=torch.float64, device=device)
    warm = segkernels.lasso_gram(G, q, alphas, n_samples=120, tol=1e-10, init=init)
    torch.testing.assert_close(warm, cold, rtol=1e-7, atol=1e-9)
    ref = reference_lasso_gram(G, q, alphas, n_samples=120, tol=1e-10)
    torch.testing.assert_close(cold, ref, rtol=1e-9, atol=1e-12)
    f32 = segkernels.lasso_gram(G.float(), q.float(), alphas.float(), n_samples=120, tol=1e-6)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), cold, rtol=1e-3, atol=1e-4)
    # max_iter=0 returns the start; no alphas gives an empty result.
    torch.testing.assert_close(segkernels.lasso_gram(G, q, alphas, n_samples=120, max_iter=0, init=init), init)
    assert segkernels.lasso_gram(G, q, alphas[:0], n_samples=120).shape == (0, 6)


def test_lasso_gram_zero_column():
    Z, y = _lasso_problem(100, 5, 7)
    Z[:, 2] = 0  # a dead channel: G[2, 2] == 0, its coefficient stays 0
    G, q = Z.t() @ Z, Z.t() @ y
    beta = segkernels.lasso_gram(G, q, torch.tensor([1e-3], dtype=torch.float64), n_samples=100)
    assert beta[0, 2] == 0 and torch.isfinite(beta).all()


# ---------------------------------------------------------------------------------------------
# opcheck, compile


def test_opcheck():
    X = torch.randn(30, 12, dtype=torch.float64)
    A, B = X.t() @ X, X.t() @ torch.randn(30, 5, dtype=torch.float64)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    run_opcheck(torch.ops.segkernels.channel_gram.default, (A, B, w))
    G, q = segkernels.channel_gram(A, B, w)
    alphas = torch.tensor([0.1, 0.01], dtype=torch.float64)
    run_opcheck(torch.ops.segkernels.lasso_gram.default, (G, q, alphas, 30.0, 1e-8, 1000, None))
    run_opcheck(torch.ops.segkernels.lasso_gram.default, (G, q, alphas, 30.0, 1e-8, 1000, torch.zeros(2, 3, dtype=torch.float64)))


def test_torch_compile():
    X = torch.randn(30, 12, dtype=torch.float64)
    A, B = X.t() @ X, X.t() @ torch.randn(30, 5, dtype=torch.float64)
    w = torch.randn(5, 3, 2, 2, dtype=torch.float64)

    def f(A, B, w, alphas):
        G, q = torch.ops.segkernels.channel_gram(A, B, w)
        return torch.ops.segkernels.lasso_gram(G, q, alphas, 30.0, 1e-8, 1000, None)

    alphas = torch.tensor([0.1, 0.01], dtype=torch.float64)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(A, B, w, alphas)
    torch.testing.assert_close(got, f(A, B, w, alphas))


# ---------------------------------------------------------------------------------------------
# Triton kernels on CPU tensors (TRITON_INTERPRET=1), tiny grids


@pytest.mark.triton
@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    import segkernels.ops.pruning.triton as pruning_triton

    for dtype, (n, c, kh, kw) in [(torch.float64, (5, 3, 2, 2)), (torch.float32, (5, 3, 2, 2)),
                                  (torch.float64, (40, 2, 3, 3))]:  # several output chunks
        X = torch.randn(60, c * kh * kw, dtype=torch.float64)
        A = (X.t() @ X).to(dtype)
        B = (X.t() @ torch.randn(60, n, dtype=torch.float64)).to(dtype)
        w = torch.randn(n, c, kh, kw, dtype=dtype)
        G, q = pruning_triton._channel_gram_triton(A, B, w)
        Gr, qr = reference_channel_gram(A.double(), B.double(), w.double())
        tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-9)
        torch.testing.assert_close(G.double(), Gr, **tol)
        torch.testing.assert_close(q.double(), qr, **tol)
    Z, y = _lasso_problem(60, 5, 11)
    G, q = Z.t() @ Z, Z.t() @ y
    alphas = torch.tensor([2.0, 0.3, 0.01], dtype=torch.float64) * float(q.abs().max()) / 60
    got = pruning_triton._lasso_gram_triton(G, q, alphas, 60.0, 1e-8, 10000, None)
    ref = reference_lasso_gram(G, q, alphas, n_samples=60, tol=1e-8)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    # Warm-started: the same minimiser from another start.
    got = pruning_triton._lasso_gram_triton(G, q, alphas, 60.0, 1e-8, 10000, torch.randn(3, 5, dtype=torch.float64))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    init = torch.randn(3, 5, dtype=torch.float64)
    got = pruning_triton._lasso_gram_triton(G, q, alphas, 60.0, 1e-8, 0, init)
    torch.testing.assert_close(got, init)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_kernels_compile_for_sm90():
    """Ahead-of-time compilation (Triton to cubin) of every launch the launchers make, for an
    H100/H200 (no GPU needed): catches GPU-only typing errors that the interpreter accepts."""
    import segkernels.ops.pruning.triton as mod

    def run():
        for dtype in (torch.float32, torch.float64):
            A, B, w = torch.eye(18, dtype=dtype), torch.zeros(18, 4, dtype=dtype), torch.zeros(4, 2, 3, 3, dtype=dtype)
            mod._channel_gram_triton(A, B, w)
            G, q, al = torch.eye(600, dtype=dtype), torch.ones(600, dtype=dtype), torch.ones(2, dtype=dtype)
            for init in (None, torch.zeros(2, 600, dtype=dtype)):
                mod._lasso_gram_triton(G, q, al, 10.0, 1e-8, 100, init)

    launches = record_triton_launches(mod, run)
    assert compile_launches_for_sm90(launches) == {"_channel_gram_kernel", "_lasso_gram_kernel"}
