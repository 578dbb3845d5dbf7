"""Channel pruning (He et al. 2017): segkernels' Gram pipeline against the official pipeline.

1. ``pipeline`` (CPU, c = n = 128, K = 9, 4,000 sampled rows, keep 64): the official pipeline
   on the rows (explicit Z (rows * n, c) in float64, sklearn Lasso with the alpha search, then
   sklearn LinearRegression on the kept channels' patches) against segkernels (Gram statistics
   from the same rows, channel_gram + lasso_gram with the same alpha search, Cholesky refit).
   Both start from the same sampled patches and targets; the case records whether the kept
   channels agree. Bytes: the rows read once.
2. ``vgg16`` layer shapes conv2_1 (64 -> 128), conv3_2 (256 -> 256), conv4_2 (512 -> 512), K = 9:
   statistics (LayerStats.update over calibration batches, 10 positions per image), selection
   of half the channels and reconstruction. 50,000 samples on CUDA; on the CPU 5,000 (a 2-core
   machine would take minutes per round), both times SEGKERNELS_BENCH_SCALE.
3. ``channel_gram`` kernel against the reference that materialises Wf^T Wf (``torch``).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import bench_device, bench_scale, run_benchmark
from segkernels import pruning
from segkernels.pruning import LayerStats, reference_channel_gram

DEVICE = bench_device()


def _rows(c, n, rows, seed=0):
    """Sampled rows of a conv layer with a realistic input: post-ReLU maps whose channels have
    very different scales. Returns conv, patches (rows, 9c) float32 and targets (rows, n)."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, n, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(n, c, 3, 3, generator=g) / (3 * c**0.5))
    images = max(1, rows // 10)
    scale = torch.exp(torch.randn(1, c, 1, 1, generator=g))
    mix = torch.randn(c, c, generator=g) / c**0.5 + torch.eye(c)  # correlated channels
    x = torch.einsum("nchw,cd->ndhw", torch.randn(images, c, 8, 8, generator=g), mix).relu() * scale
    u = F.unfold(x, 3, padding=1)  # (images, 9c, 64)
    idx = torch.rand(images, 64, generator=g).topk(10, dim=1).indices
    xf = u.gather(2, idx[:, None, :].expand(-1, u.shape[1], -1)).transpose(1, 2).reshape(-1, u.shape[1])[:rows]
    with torch.no_grad():
        yf = xf @ conv.weight.reshape(n, -1).t()
    return conv, xf.contiguous(), yf.contiguous()


def official_pipeline(conv, xf, yf, n_keep):
    """Explicit Z, sklearn Lasso along the alpha search, sklearn LinearRegression."""
    from sklearn.linear_model import Lasso, LinearRegression

    n, c = conv.out_channels, conv.in_channels
    w = conv.weight.detach().double().reshape(n, c, 9)
    x64 = xf.double()
    Z = torch.empty(xf.shape[0] * n, c, dtype=torch.float64)
    for i in range(c):
        Z[:, i] = (x64[:, i * 9 : (i + 1) * 9] @ w[:, i, :].t()).reshape(-1)
    Zn = Z.numpy()
    yv = yf.double().reshape(-1).numpy()
    del x64

    def solve(alphas, init):
        out = []
        for a, alpha in enumerate(alphas.tolist()):
            m = Lasso(alpha=alpha, fit_intercept=False, tol=1e-8, max_iter=10000, warm_start=init is not None)
            if init is not None:
                m.coef_ = init[a].numpy().copy()
            out.append(torch.from_numpy(m.fit(Zn, yv).coef_.copy()))
        return torch.stack(out)

    alpha_max = float(np.abs(Zn.T @ yv).max()) / Zn.shape[0]
    _, beta, exact = pruning.alpha_search(solve, alpha_max, n_keep, c, points=4)
    keep = torch.nonzero(beta).flatten() if exact else torch.argsort(beta.abs(), descending=True)[:n_keep].sort().values
    cols = (keep[:, None] * 9 + torch.arange(9)).reshape(-1)
    lr = LinearRegression().fit(xf[:, cols].double().numpy(), yf.double().numpy())
    return keep, lr.coef_, lr.intercept_


def segkernels_pipeline(conv, xf, yf, n_keep):
    stats = LayerStats(conv).update_rows(xf, yf)
    keep, _ = pruning.select_channels(stats, conv.weight.detach(), n_keep)
    weight, bias = pruning.reconstruct(stats, keep)
    return keep, weight, bias


_OFFICIAL = {}


@pytest.mark.parametrize("impl", ["official-sklearn", "segkernels"])
def test_pipeline_vs_official(benchmark, impl):
    if DEVICE.type != "cpu":
        pytest.skip("the official pipeline runs on the CPU (sklearn)")
    c = n = 128
    rows = 4000
    conv, xf, yf = _rows(c, n, rows)
    n_keep = 64
    pipeline = official_pipeline if impl == "official-sklearn" else segkernels_pipeline
    last = {}

    def fn():
        last["keep"] = pipeline(conv, xf, yf, n_keep)[0]
        return last["keep"]

    moved = xf.numel() * xf.element_size() + yf.numel() * yf.element_size()
    run_benchmark(benchmark, fn, op="channel selection + reconstruction", impl=impl,
                  case=f"c=n=128 K=9 rows={rows} keep={n_keep}", bytes_moved=moved, device=DEVICE, rounds=1)
    if impl == "official-sklearn":
        _OFFICIAL["keep"] = last["keep"]
    elif "keep" not in _OFFICIAL:  # the official case was filtered out: one run for the check
        _OFFICIAL["keep"] = official_pipeline(conv, xf, yf, n_keep)[0]
    agree = bool(torch.equal(last["keep"], _OFFICIAL["keep"]))
    benchmark.extra_info["same_kept_channels_as_official"] = agree
    print(f"\n{impl}: kept channels agree with the official pipeline: {agree} ({last['keep'].tolist()})")


VGG = {"conv2_1": (64, 128, 112), "conv3_2": (256, 256, 56), "conv4_2": (512, 512, 28)}


@pytest.mark.parametrize("layer", list(VGG))
def test_vgg16_layer(benchmark, layer):
    c, n, hw = VGG[layer]
    samples = int(round((50_000 if DEVICE.type == "cuda" else 5_000) * bench_scale()))
    per_image = 10
    images = samples // per_image
    batch = min(images, 500 if DEVICE.type == "cuda" else 50)
    batches = max(1, images // batch)
    torch.manual_seed(0)
    conv = nn.Conv2d(c, n, 3, padding=1, bias=False).to(DEVICE)
    x = torch.randn(batch, c, hw, hw, device=DEVICE).relu()
    with torch.no_grad():
        y = conv(x)
    w = conv.weight.detach()
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def fn():
        stats = LayerStats(conv)
        for _ in range(batches):
            stats.update(x, y, positions_per_image=per_image, generator=gen)
        keep, _ = pruning.select_channels(stats, w, c // 2)
        return pruning.reconstruct(stats, keep)

    # Bytes: the sampled patches and targets read once, plus A and B written (float64).
    K = 9
    moved = batches * batch * per_image * (c * K + n) * 4 + (c * K) * (c * K + n) * 8
    run_benchmark(benchmark, fn, op="prune one layer (stats + select + refit)", impl="segkernels",
                  case=f"VGG-16 {layer} {c}->{n} samples={batches * batch * per_image}", bytes_moved=moved,
                  device=DEVICE, rounds=3)


@pytest.mark.parametrize("impl", ["torch", "segkernels"])
@pytest.mark.parametrize("layer", list(VGG))
def test_channel_gram(benchmark, layer, impl):
    c, n, _ = VGG[layer]
    K = 9
    X = torch.randn(4 * c * K, c * K, device=DEVICE, dtype=torch.float64)
    A = X.t() @ X
    B = X.t() @ torch.randn(4 * c * K, n, device=DEVICE, dtype=torch.float64)
    del X
    w = torch.randn(n, c, 3, 3, device=DEVICE, dtype=torch.float64)
    if impl == "torch":
        fn = lambda: reference_channel_gram(A, B, w)  # noqa: E731
    else:
        fn = lambda: pruning.channel_gram(A, B, w)  # noqa: E731
    moved = (A.numel() + B.numel() + w.numel() + c * c + c) * 8
    run_benchmark(benchmark, fn, op="channel_gram", impl=impl, case=f"VGG-16 {layer} {c}->{n} float64",
                  bytes_moved=moved, device=DEVICE, rounds=3)
