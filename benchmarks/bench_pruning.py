"""Channel pruning (He et al. 2017): segkernels' Gram pipeline against the official pipeline.

1. ``pipeline`` (CPU, c = n = 128, K = 9, 4,000 sampled rows, keep 64): the official pipeline
   as its code runs it (peers.official_channel_pruning: the design matrix Z from
   min(400, rows // 20) = 200 of the rows, one warm-started sklearn Lasso with sklearn's default
   tolerance along the doubling-then-bisection search until 64 to 70 channels survive, then
   LinearRegression on every row for the kept channels) against segkernels (Gram statistics of
   every row, channel_gram + lasso_gram along its alpha search, Cholesky refit), and segkernels
   on the official's 200 rows. Both start from the same sampled patches and targets. At equal
   rows segkernels' time is mostly the float64 Gram GEMM; its gain is that it uses every
   sampled row in memory independent of their number. Bytes: the rows read once.
2. ``vgg16`` layer shapes conv2_1 (64 -> 128), conv3_2 (256 -> 256), conv4_2 (512 -> 512), K = 9:
   statistics (LayerStats.update over calibration batches, 10 positions per image), selection
   of half the channels and reconstruction. 50,000 samples on CUDA; on the CPU 5,000 (a 2-core
   machine would take minutes per round), both times SEGKERNELS_BENCH_SCALE.
3. ``channel_gram`` kernel against the reference that materialises Wf^T Wf (``torch``).
4. ``vgg16_encoder``: prune_sequential on a VGG-16-BN encoder (nn.SegNet's, width 64, random
   weights), every conv but the first pruned 2x, end to end (one timed run, its peak memory, the
   PruneReport in extra_info). On the CPU 32 images of 160 x 160 at 10 positions per image and at
   every position; on CUDA the paper's 5,000 images (224 x 224) x 10 positions, and every position
   of the CPU's 32 images. Images times SEGKERNELS_BENCH_SCALE (at least 2).
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import bench_device, bench_scale, run_benchmark, run_once_benchmark
from peers import official_channel_pruning
import segkernels
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


def segkernels_pipeline(conv, xf, yf, n_keep):
    stats = LayerStats(conv).update_rows(xf, yf)
    keep, _ = pruning.select_channels(stats, conv.weight.detach(), n_keep)
    weight, bias = pruning.reconstruct(stats, keep)
    return keep, weight, bias


_KEPT = {}
OFFICIAL = ("the official code's defaults: Z from min(400, rows // 20) rows, one Lasso(warm_start=True, "
            "selection='random') with sklearn's tol=1e-4, alpha doubled from 1e-3 then bisected to 64-70 "
            "channels, LinearRegression on every row")


@pytest.mark.parametrize("impl", ["official-sklearn", "segkernels", "segkernels (official's rows)"])
def test_pipeline_vs_official(benchmark, impl):
    if DEVICE.type != "cpu":
        pytest.skip("the official pipeline runs on the CPU (sklearn)")
    c = n = 128
    rows = 4000
    conv, xf, yf = _rows(c, n, rows)
    n_keep = 64
    # The rows the official code samples for its Z (peers.official_channel_pruning, seed 0).
    official_rows = torch.from_numpy(np.random.RandomState(0).randint(0, rows, min(400, rows // 20)))
    if impl == "official-sklearn":
        fn = lambda: official_channel_pruning(xf, yf, conv.weight, n_keep)[0]  # noqa: E731
    elif impl == "segkernels":
        fn = lambda: segkernels_pipeline(conv, xf, yf, n_keep)[0]  # noqa: E731
    else:
        fn = lambda: segkernels_pipeline(conv, xf[official_rows], yf[official_rows], n_keep)[0]  # noqa: E731
    moved = xf.numel() * xf.element_size() + yf.numel() * yf.element_size()
    run_benchmark(benchmark, fn, op="channel selection + reconstruction", impl=impl,
                  case=f"c=n=128 K=9 rows={rows} keep={n_keep}", bytes_moved=moved, device=DEVICE, rounds=1,
                  formulation=OFFICIAL if impl == "official-sklearn" else None)
    _KEPT[impl] = fn()
    if "official-sklearn" not in _KEPT:  # the official case was filtered out: one run for the check
        _KEPT["official-sklearn"] = official_channel_pruning(xf, yf, conv.weight, n_keep)[0]
    kept, official = set(_KEPT[impl].tolist()), set(_KEPT["official-sklearn"].tolist())
    benchmark.extra_info["kept_channels"] = len(kept)
    benchmark.extra_info["shared_with_official"] = len(kept & official)
    print(f"\n{impl}: keeps {len(kept)} channels, {len(kept & official)} of them among the official's {len(official)}")


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


class SyntheticImages:
    """A re-iterable source of random images made batch by batch on the device (the same images on
    every pass, as a DataLoader without shuffling), so the run holds one batch at a time."""

    def __init__(self, images: int, size: int, batch: int, device: torch.device):
        self.images, self.size, self.batch, self.device = images, size, batch, device

    def __len__(self):
        return -(-self.images // self.batch)

    def __iter__(self):
        for i in range(len(self)):
            n = min(self.batch, self.images - i * self.batch)
            g = torch.Generator(device=self.device).manual_seed(i)
            yield torch.randn(n, 3, self.size, self.size, generator=g, device=self.device)


ENCODER_CASES = {  # name: (images, size, batch, positions_per_image) per device type
    "cpu": {"10 positions": (32, 160, 8, 10), "every position": (32, 160, 8, None)},
    "cuda": {"10 positions": (5000, 224, 50, 10), "every position": (32, 160, 8, None)},
}


@pytest.mark.parametrize("positions", ["10 positions", "every position"])
def test_vgg16_encoder(benchmark, positions):
    images, size, batch, per_image = ENCODER_CASES[DEVICE.type][positions]
    images = max(2, int(round(images * bench_scale())))
    torch.manual_seed(0)
    encoder = segkernels.nn.SegNet(num_classes=2, width=64).encoder_sequential().to(DEVICE).eval()
    source = SyntheticImages(images, size, min(batch, images), DEVICE)
    result = {}

    def fn():
        result["pruned"], result["report"] = pruning.prune_sequential(
            encoder, source, ratio=0.5, positions_per_image=per_image,
            generator=torch.Generator(device=DEVICE).manual_seed(0), progress=False)

    with warnings.catch_warnings():  # a small scale leaves the deep layers with few rows: expected
        warnings.simplefilter("ignore", RuntimeWarning)
        run_once_benchmark(benchmark, fn, op="prune_sequential VGG-16-BN encoder 2x", impl="segkernels",
                           case=f"{images} images {size}x{size}, {positions}", device=DEVICE)
    report = result["report"]
    benchmark.extra_info["prune_report"] = str(report)
    benchmark.extra_info["parameters"] = [sum(p.numel() for p in m.parameters()) for m in (encoder, result["pruned"])]
    print(f"\nVGG-16-BN encoder, {images} images {size}x{size}, {positions}:\n{report}")
