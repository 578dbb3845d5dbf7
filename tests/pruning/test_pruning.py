"""Channel pruning on Gram statistics: LayerStats (sampling, layouts, all_reduce over two gloo
ranks), select_channels, reconstruct and prune_sequential, against explicit rows, sklearn and
torch.linalg, and their argument errors."""

import math
import os
import sys
import tempfile
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import peers
import segkernels
from helpers import DEVICES, requires_kernels
from pruning_cases import _conv, _explicit_rows, _free_port, _vgg
from segkernels import pruning
from segkernels.pruning import LayerStats, reference_channel_gram

pytestmark = requires_kernels


# ---------------------------------------------------------------------------------------------
# LayerStats


def test_update_sampling_and_layouts():
    conv = _conv(4, 6, 3, stride=2, padding=1).double()
    x = torch.randn(3, 4, 10, 9, dtype=torch.float64)
    y = F.conv2d(x, conv.weight, None, 2, 1)
    ho, wo = y.shape[2:]
    s1 = LayerStats(conv).update(x, y, positions_per_image=5, generator=torch.Generator().manual_seed(1))
    assert s1.rows == 15
    # The same positions, recovered from the generator, give the explicit rows' statistics.
    scores = torch.rand(3, ho * wo, generator=torch.Generator().manual_seed(1))
    flat = scores.topk(5, dim=1).indices
    xf_all, yf_all, _ = _explicit_rows(conv, x)
    sel = (torch.arange(3)[:, None] * ho * wo + flat).reshape(-1)
    xf, yf = xf_all[sel], yf_all[sel]
    torch.testing.assert_close(s1.A, xf.t() @ xf)
    torch.testing.assert_close(s1.B, xf.t() @ yf)
    torch.testing.assert_close(s1.x_sum, xf.sum(0))
    torch.testing.assert_close(s1.y_sum, yf.sum(0))
    torch.testing.assert_close(s1.y_sq, (yf * yf).sum())
    # channels_last and strided inputs, and more positions than there are: every position.
    s_all = LayerStats(conv).update(x, y, positions_per_image=None)
    s_cl = LayerStats(conv).update(x.contiguous(memory_format=torch.channels_last), y[..., :, :].transpose(2, 3)
                                   .contiguous().transpose(2, 3), positions_per_image=10_000)
    torch.testing.assert_close(s_cl.A, s_all.A)
    torch.testing.assert_close(s_cl.B, s_all.B)
    # An empty batch adds nothing.
    LayerStats(conv).update(x[:0], y[:0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_update_low_precision_inputs(dtype):
    conv = _conv(3, 4, 3)
    x = torch.randn(2, 3, 7, 7).to(dtype)
    y = F.conv2d(x.float(), conv.weight, None, 1, 1).to(dtype)
    s = LayerStats(conv).update(x, y, positions_per_image=None)
    ref = LayerStats(conv).update(x.double(), y.double(), positions_per_image=None)
    assert s.A.dtype == torch.float64
    torch.testing.assert_close(s.A, ref.A, rtol=0, atol=0)
    torch.testing.assert_close(s.B, ref.B, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# select_channels and reconstruct


def _stats_for(c, n, images=6, seed=0, device="cpu", hw=8):
    g = torch.Generator().manual_seed(seed)
    conv = _conv(c, n, 3, device=device).double()
    scale = torch.exp(torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)).to(device)
    x = torch.randn(images, c, hw, hw, generator=g, dtype=torch.float64).to(device) * scale
    y = F.conv2d(x, conv.weight, None, 1, 1)
    stats = LayerStats(conv).update(x, y, positions_per_image=None)
    return conv, stats, x, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_keep", [1, 3, 6, 11, 12])
def test_select_channels_hits_n_keep(device, n_keep):
    conv, stats, _, _ = _stats_for(12, 8, device=device)
    keep, beta = pruning.select_channels(stats, conv.weight.detach(), n_keep)
    assert keep.dtype == torch.int64 and keep.shape == (n_keep,)
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == n_keep
    assert beta.shape == (12,)
    if n_keep < 12:
        nz = torch.nonzero(beta.cpu()).flatten()
        assert set(keep.tolist()) <= set(nz.tolist()) or nz.numel() > n_keep
    # Many alphas per step (the CUDA default) keeps the same channels.
    keep64, _ = pruning.select_channels(stats, conv.weight.detach(), n_keep, points=64)
    assert torch.equal(keep64, keep)


def test_select_channels_matches_the_official_search_with_sklearn():
    """The official search (one warm-started sklearn Lasso along a bisection) on the explicit Z of
    every row keeps the same channels as select_channels. Asked for exactly n_keep channels
    (rank_tol=0), on the paper's problem (no intercept), converged tightly."""
    conv, stats, x, _ = _stats_for(10, 6, images=2, hw=6, seed=3)
    keep, _ = pruning.select_channels(stats, conv.weight.detach(), 4)
    xf, yf, _ = _explicit_rows(conv, x)
    Z = peers.design_matrix(xf, conv.weight)
    mask = peers.official_lasso_search(Z, yf.reshape(-1).numpy(), 4, alpha=1e-3, rank_tol=0.0, fit_intercept=False,
                                       tol=1e-10, max_iter=100000)
    assert np.nonzero(mask)[0].tolist() == keep.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruct_matches_lstsq(device):
    conv, stats, x, _ = _stats_for(7, 5, images=3, device=device)
    keep = torch.tensor([0, 2, 3, 6])
    weight, bias = pruning.reconstruct(stats, keep)
    assert weight.shape == (5, 4, 3, 3) and bias.shape == (5,)
    xf, yf, _ = _explicit_rows(conv, x)
    cols = (keep[:, None] * 9 + torch.arange(9)).reshape(-1).to(device)
    design = torch.cat([xf[:, cols], torch.ones(xf.shape[0], 1, dtype=torch.float64, device=device)], 1)
    sol = torch.linalg.lstsq(design.cpu(), yf.cpu()).solution.to(device)
    torch.testing.assert_close(weight, sol[:-1].t().reshape(5, 4, 3, 3), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(bias, sol[-1], rtol=1e-8, atol=1e-9)
    # The error from the statistics equals the explicit one.
    pred = design @ sol
    err = float(((yf - pred) ** 2).sum() / (yf**2).sum())
    assert abs(pruning.reconstruction_error(stats, keep, weight, bias) - err) < 1e-9
    # Ridge: the regularised normal equations (bias not penalised).
    w_r, b_r = pruning.reconstruct(stats, keep, ridge=10.0)
    lhs = design.t() @ design
    lhs.diagonal()[:-1] += 10.0
    sol_r = torch.linalg.solve(lhs, design.t() @ yf)
    torch.testing.assert_close(w_r, sol_r[:-1].t().reshape(5, 4, 3, 3), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(b_r, sol_r[-1], rtol=1e-8, atol=1e-9)


def test_reconstruct_underdetermined_is_finite():
    conv = _conv(4, 3, 3).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    y = F.conv2d(x, conv.weight, None, 1, 1)
    stats = LayerStats(conv).update(x, y, positions_per_image=2)  # 2 rows, 37 unknowns
    w, b = pruning.reconstruct(stats, torch.arange(4))
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


# ---------------------------------------------------------------------------------------------
# prune_sequential


def _first_k_baseline(net, batches, ratio):
    """Keeps the first n_keep channels of each layer, refitted the same way."""
    # prune_sequential calls the select_channels its module imported, so that is the one to replace.
    prune_module = sys.modules["segkernels.pruning.prune"]
    first_k = lambda stats, w, k, **kw: (torch.arange(k), None)  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prune_module, "select_channels", first_k)
        return pruning.prune_sequential(net, batches, ratio=ratio, positions_per_image=40, progress=False)[0]


@pytest.mark.parametrize("device", DEVICES)
def test_prune_sequential_small_vgg(device):
    net = _vgg(device)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [torch.randn(4, 3, 13, 15, device=device) for _ in range(3)]
    pruned, report = pruning.prune_sequential(net, batches, ratio=0.5, positions_per_image=40)
    # The original is untouched.
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(pruned) == len(net)
    convs = [m for m in pruned if isinstance(m, nn.Conv2d)]
    assert [m.in_channels for m in convs] == [3, 6, 8, 8]
    assert [m.out_channels for m in convs] == [6, 8, 8, 10]
    assert pruned[1].num_features == 6 and pruned[4].num_features == 8 and pruned[10].num_features == 10
    assert [r.channels_before for r in report] == [12, 16, 16] and [r.channels_after for r in report] == [6, 8, 8]
    assert all(0 <= r.rel_error < 1 and r.seconds >= 0 for r in report)
    assert "channels before" in str(report)
    test = torch.randn(4, 3, 13, 15, device=device)
    with torch.no_grad():
        ref = net(test)
        out = pruned(test)
        assert out.shape == ref.shape
        err = float((out - ref).pow(2).sum() / ref.pow(2).sum())
        base = _first_k_baseline(net, batches, 0.5)
        assert torch.equal(base[0].weight, net[0].weight[:6])  # the baseline did keep the first channels
        err_base = float((base(test) - ref).pow(2).sum() / ref.pow(2).sum())
    assert err < err_base, (err, err_base)


def test_prune_a_segnet_encoder():
    torch.manual_seed(0)
    model = segkernels.nn.SegNet(num_classes=4, width=8).eval()
    encoder = model.encoder_sequential()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():  # the Sequential is the encoder: stages, each followed by its pooling
        expected = x
        for stage in model.encoder:
            expected = F.max_pool2d(stage(expected), 2, 2, ceil_mode=True)
        torch.testing.assert_close(encoder(x), expected)
    assert model.prunable_convs() == [1, 3, 5, 6, 8, 9, 11, 12]
    with pytest.warns(RuntimeWarning, match="unknowns"):  # the deep stages see few positions
        pruned, _ = pruning.prune_sequential(encoder, [x], ratio=0.5, layers=model.prunable_convs(),
                                             positions_per_image=None, progress=False)
    model.load_encoder(pruned)
    convs = [block[0] for stage in model.encoder for block in stage]
    assert [c.in_channels for c in convs] == [3, 4, 8, 8, 16, 16, 16, 32, 32, 32, 64, 32, 32]
    with torch.no_grad():
        assert model(x).shape == (2, 4, 37, 45)
    with pytest.raises(ValueError, match="13 convs and BatchNorms"):
        model.load_encoder(pruned[:6])


def test_prune_sequential_options_and_errors():
    net = _vgg()
    batches = [torch.randn(2, 3, 8, 8)]
    pruned, report = pruning.prune_sequential(net, batches, n_keep={2: 5}, layers=[2], progress=False)
    assert [m.in_channels for m in pruned if isinstance(m, nn.Conv2d)] == [3, 12, 5, 16]
    pruned, _ = pruning.prune_sequential(net, batches, n_keep=4, layers=[1, 3], progress=False)
    assert [m.in_channels for m in pruned if isinstance(m, nn.Conv2d)] == [3, 4, 16, 4]
    with pytest.raises(IndexError, match="layers"):
        pruning.prune_sequential(net, batches, layers=[0])
    for pool in (nn.MaxPool2d(2, return_indices=True), segkernels.nn.MaxPool2d(2, return_indices=True)):
        with pytest.raises(ValueError, match="returns indices"):
            pruning.prune_sequential(nn.Sequential(*net, pool, nn.Conv2d(16, 4, 1)), batches, progress=False)
    with pytest.raises(IndexError, match="layers"):
        pruning.prune_sequential(net, batches, layers=[4])
    with pytest.raises(ValueError, match="n_keep"):
        pruning.prune_sequential(net, batches, n_keep=17)
    with pytest.raises(ValueError, match="ratio"):
        pruning.prune_sequential(net, batches, ratio=1.5)
    with pytest.raises(TypeError, match="nn.Sequential"):
        pruning.prune_sequential(net[0], batches)
    with pytest.raises(ValueError, match="calibration_batches"):
        pruning.prune_sequential(net, [])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="grouped"):
        pruning.prune_sequential(grouped, [torch.randn(1, 4, 8, 8)])
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="between conv 0 and conv 1"):
        pruning.prune_sequential(odd, [torch.randn(1, 3, 8, 8)])


def test_prune_report_measures_the_error_on_held_out_positions():
    # With fewer sampled rows than unknowns the refit interpolates its rows: the error on them is
    # about 0 (1e-10 in the old report) however bad the layer. The report's error comes from
    # positions that were not fitted, and prune_sequential warns.
    net = _vgg()
    batches = [torch.randn(2, 3, 13, 15)]
    with pytest.warns(RuntimeWarning, match="no more than the .* unknowns"):
        _, report = pruning.prune_sequential(net, batches, ratio=0.5, positions_per_image=5, progress=False)
    for r in report:
        assert r.rows == 10 and r.unknowns == r.channels_after * 9 + 1 and r.heldout_rows == 10
        assert r.fit_error < 1e-6 < 1e-2 < r.rel_error
    assert "rel. error (held-out)" in str(report)
    # Plenty of rows: held-out and fitted errors agree to within sampling noise, no warning.
    batches = [torch.randn(8, 3, 13, 15) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = pruning.prune_sequential(net, batches, ratio=0.5, positions_per_image=20, progress=False)
    for r in report:
        assert r.rows > r.unknowns and r.heldout_rows > 0
        assert r.fit_error <= r.rel_error < 3 * r.fit_error + 1e-3
    # Every position fitted: nothing held out, reported as such.
    _, report = pruning.prune_sequential(net, batches, ratio=0.5, positions_per_image=None, progress=False)
    assert all(r.heldout_rows == 0 and math.isnan(r.rel_error) for r in report)
    assert "n/a" in str(report)


# ---------------------------------------------------------------------------------------------
# Calibration sources


class _LiveBatches:
    """A re-iterable source that makes each batch when asked and counts how many are alive at once."""

    def __init__(self, n, shape):
        self.n, self.shape, self.live, self.most_live = n, shape, 0, 0

    def _gone(self):
        self.live -= 1

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            x = torch.randn(self.shape, generator=g)
            self.live += 1
            self.most_live = max(self.most_live, self.live)
            weakref.finalize(x, self._gone)
            yield x
            del x


def test_calibration_from_a_dataloader_of_tuples():
    net = _vgg()
    torch.manual_seed(3)
    images, labels = torch.randn(10, 3, 9, 11), torch.randint(0, 4, (10, 9, 11))
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # (image, label) tuples, a short last batch
    run = lambda source: pruning.prune_sequential(  # noqa: E731
        net, source, ratio=0.5, positions_per_image=8, generator=torch.Generator().manual_seed(0), progress=False)
    from_loader, report = run(loader)
    from_list, _ = run([images[i:i + 4] for i in range(0, 10, 4)])
    assert [r.rows for r in report] == [80, 80, 80]
    for k, v in from_list.state_dict().items():
        assert torch.equal(from_loader.state_dict()[k], v), k
    # A DataLoader of bare tensors, in float64 for a float32 model: moved to the model's dtype.
    from_doubles, _ = run(DataLoader(images.double(), batch_size=4))
    for k, v in from_list.state_dict().items():
        torch.testing.assert_close(from_doubles.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_calibration_batches_are_read_one_at_a_time():
    source = _LiveBatches(6, (2, 3, 9, 11))
    _, report = pruning.prune_sequential(_vgg(), source, ratio=0.5, positions_per_image=None, progress=False)
    assert report[0].rows == 6 * 2 * 9 * 11
    assert source.most_live <= 2, source.most_live  # never the whole source


def test_calibration_source_errors():
    net = _vgg()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TypeError, match="re-iterable"):
        pruning.prune_sequential(net, (b for b in [x]), progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        pruning.prune_sequential(net, iter([x]), progress=False)
    with pytest.raises(TypeError, match=r"single tensor .* pass \[tensor\]"):
        pruning.prune_sequential(net, x, progress=False)
    with pytest.raises(TypeError, match="calibration_batches must be"):
        pruning.prune_sequential(net, 3, progress=False)
    with pytest.raises(TypeError, match="item 1 .* got str"):
        pruning.prune_sequential(net, [x, "images"], progress=False)
    with pytest.raises(TypeError, match=r"item 0 .* tuple .* starting with dict"):
        pruning.prune_sequential(net, [({"image": x},)], progress=False)
    with pytest.raises(ValueError, match=r"item 0 must be a floating-point \(N, C, H, W\)"):
        pruning.prune_sequential(net, [x[0]], progress=False)
    with pytest.raises(ValueError, match=r"item 0 must be a floating-point"):
        pruning.prune_sequential(net, [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)], progress=False)
    with pytest.raises(ValueError, match="item 1 has 4 channels, the model's first conv takes 3"):
        pruning.prune_sequential(net, [x, torch.randn(2, 4, 8, 8)], progress=False)
    with pytest.raises(ValueError, match="no rows"):
        pruning.prune_sequential(net, [x[:0]], progress=False)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        pruning.prune_sequential(net, [x], group=object(), progress=False)


# ---------------------------------------------------------------------------------------------
# Distributed statistics


def _dist_worker(rank, world, port, path, x, y, state):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        conv = nn.Conv2d(4, 5, 3, padding=1).double()
        conv.load_state_dict(state)
        half = x.shape[0] // world
        stats = LayerStats(conv).update(x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half],
                                        positions_per_image=None)
        stats.all_reduce()
        if rank == 0:
            torch.save({k: getattr(stats, k) for k in ("A", "B", "x_sum", "y_sum", "y_sq", "count")}, path)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_ranks():
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    x = torch.randn(4, 4, 6, 7, dtype=torch.float64)
    y = F.conv2d(x, conv.weight, None, 1, 1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "stats.pt")
        torch.multiprocessing.spawn(_dist_worker, args=(2, _free_port(), path, x, y.detach(), conv.state_dict()),
                                    nprocs=2, join=True)
        got = torch.load(path)
    ref = LayerStats(conv).update(x, y, positions_per_image=None)
    for k, v in got.items():
        torch.testing.assert_close(v, getattr(ref, k), rtol=1e-12, atol=1e-10)


def test_all_reduce_needs_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        LayerStats(nn.Conv2d(2, 2, 1)).all_reduce()


# ---------------------------------------------------------------------------------------------
# Errors


def test_degenerate_statistics_end_or_are_refused():
    from segkernels.pruning import LayerStats, reconstruct, select_channels

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1).double()
    stats = LayerStats(conv)
    stats.update(torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 3, 6, 6, dtype=torch.float64),
                 positions_per_image=None)
    # Weights so small that G underflows to 0 and alpha_max is denormal: the alpha path used to
    # underflow to 0 with its floor and never end. No alpha keeps 2 channels; the search ends.
    keep, beta = select_channels(stats, torch.full((3, 4, 3, 3), 1e-320, dtype=torch.float64), 2)
    assert keep.shape == (2,) and torch.isfinite(beta).all()
    G = torch.eye(3, dtype=torch.float64)
    q = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    alphas = torch.tensor([0.1], dtype=torch.float64)
    with pytest.raises(ValueError, match="init must be finite"):
        segkernels.lasso_gram(G, q, alphas, n_samples=1.0, init=torch.tensor([[float("nan"), 0.0, 0.0]],
                                                                            dtype=torch.float64))
    with pytest.raises(ValueError, match="positive semi-definite"):
        segkernels.lasso_gram(torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)), q, alphas,
                              n_samples=1.0)
    # A matrix that is not a Gram: the descent would solve another problem without a word.
    lopsided = G.clone()
    lopsided[0, 2] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        segkernels.lasso_gram(lopsided, q, alphas, n_samples=1.0)
    # Grams rounded differently on each side of the diagonal still pass: the plain-PyTorch
    # channel_gram of float32 statistics with a mean of 255 and zero-sum filters (2e-3 of max |G|
    # apart across the diagonal, a false refusal at the first tolerance, 1e-3), and its float64
    # counterpart at a mean of 1e4.
    g = torch.Generator().manual_seed(5)
    for dtype, mean in ((torch.float32, 255.0), (torch.float64, 1e4)):
        X = (torch.randn(4000, 144, generator=g, dtype=torch.float64) + mean).to(dtype)
        W = torch.randn(8, 16, 3, 3, generator=g, dtype=dtype)
        W -= W.mean((2, 3), keepdim=True)
        Gz, qz = reference_channel_gram(X.T @ X, X.T @ (X @ W.reshape(8, -1).T), W)
        assert not torch.equal(Gz, Gz.T)
        assert segkernels.lasso_gram(Gz, qz, alphas.to(dtype), n_samples=32000.0).shape == (1, 16)
    bad = LayerStats(conv)
    y = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y[0, 0, 0, 0] = float("nan")
    bad.update(torch.randn(2, 4, 6, 6, dtype=torch.float64), y, positions_per_image=None)
    with pytest.raises(ValueError, match="NaN or inf"):
        reconstruct(bad, torch.tensor([0, 2]))


def test_bad_inputs():
    A, B, w = torch.eye(18, dtype=torch.float64), torch.zeros(18, 4, dtype=torch.float64), torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="A must be"):
        segkernels.channel_gram(A[:17, :17], B, w)
    with pytest.raises(ValueError, match="B must be"):
        segkernels.channel_gram(A, B[:, :3], w)
    with pytest.raises(TypeError, match="share a dtype"):
        segkernels.channel_gram(A, B.float(), w)
    with pytest.raises(TypeError, match=r"floating tensor \(float32, float64\)"):
        segkernels.channel_gram(A.half(), B.half(), w.half())
    G, q, al = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="G must be square"):
        segkernels.lasso_gram(G[:2], q, al, n_samples=10)
    # A NaN once passed the solver's soft threshold as a zero and gave finite, wrong coefficients.
    for bad_G, bad_q in ((G, torch.tensor([1.0, float("nan"), 0.5], dtype=torch.float64)),
                         (G.clone().fill_diagonal_(float("inf")), q)):
        with pytest.raises(ValueError, match="must be finite"):
            segkernels.lasso_gram(bad_G, bad_q, al, n_samples=10)
    with pytest.raises(ValueError, match="n_samples"):
        segkernels.lasso_gram(G, q, al, n_samples=float("inf"))
    with pytest.raises(ValueError, match="q must be"):
        segkernels.lasso_gram(G, q[:2], al, n_samples=10)
    with pytest.raises(ValueError, match="n_samples"):
        segkernels.lasso_gram(G, q, al, n_samples=0)
    with pytest.raises(ValueError, match="alphas"):
        segkernels.lasso_gram(G, q, -al, n_samples=10)
    with pytest.raises(ValueError, match="init"):
        segkernels.lasso_gram(G, q, al, n_samples=10, init=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_iter"):
        segkernels.lasso_gram(G, q, al, n_samples=10, max_iter=-1)
    # The raw ops check too (no crash on bad shapes).
    with pytest.raises(ValueError):
        torch.ops.segkernels.channel_gram(A[:17], B, w)
    with pytest.raises(ValueError):
        torch.ops.segkernels.lasso_gram(G, q[:2], al, 10.0, 1e-8, 10, None)
    with pytest.raises(ValueError, match="groups=1"):
        LayerStats(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        LayerStats(nn.Linear(3, 3))
    conv = nn.Conv2d(3, 4, 3, padding=1)
    stats = LayerStats(conv)
    with pytest.raises(ValueError, match="x must be"):
        stats.update(torch.randn(1, 2, 5, 5), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="y must be"):
        stats.update(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 4, 5))
    with pytest.raises(ValueError, match="positions_per_image"):
        stats.update(torch.randn(1, 3, 5, 5), torch.randn(1, 4, 5, 5), positions_per_image=0)
    with pytest.raises(TypeError, match="floating"):
        stats.update(torch.ones(1, 3, 5, 5, dtype=torch.long), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="no rows"):
        pruning.select_channels(stats, conv.weight, 2)
    stats.update(torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="n_keep"):
            pruning.select_channels(stats, conv.weight, bad)
    with pytest.raises(TypeError, match="n_keep must be an int"):
        pruning.select_channels(stats, conv.weight, 2.5)
    with pytest.raises(ValueError, match="weight must be"):
        pruning.select_channels(stats, conv.weight[:, :2], 2)
    with pytest.raises(IndexError, match="keep"):
        pruning.reconstruct(stats, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="keep"):
        pruning.reconstruct(stats, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="repeat"):
        pruning.reconstruct(stats, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="ridge"):
        pruning.reconstruct(stats, torch.tensor([1]), ridge=-1.0)


def test_non_finite_statistics_and_ridge_are_refused():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    stats = LayerStats(conv)
    x = torch.randn(2, 3, 6, 6)
    stats.update(x, conv(x).detach())
    with pytest.raises(ValueError, match="ridge"):
        pruning.reconstruct(stats, torch.tensor([0, 1]), ridge=float("nan"))
    with pytest.raises(TypeError, match="ridge"):
        pruning.reconstruct(stats, torch.tensor([0, 1]), ridge=True)
    x[:, 0] = float("nan")  # the whole channel: whichever positions update() samples
    stats.update(x, conv(x).detach())
    with pytest.raises(ValueError, match="NaN or inf"):
        pruning.select_channels(stats, conv.weight, n_keep=2)
