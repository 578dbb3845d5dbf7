"""prune_sequential: channel pruning of a VGG-style nn.Sequential, layer by layer, with the
accumulated-error correction of He et al. 2017."""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import ArgumentIndexError, ArgumentTypeError, ArgumentValueError, check_int
from .._progress import progress_bar
from ..nn.pooling import MaxPool2d as SegkernelsMaxPool2d
from .calibration import CalibrationSource
from .lasso import select_channels
from .reconstruct import _check_ridge, _kept_columns, reconstruct, reconstruction_error
from .ranks import Ranks
from .stats import LayerStats

__all__ = ["prune_sequential", "PruneReport", "LayerReport"]


@dataclasses.dataclass
class LayerReport:
    layer: int  # index among the Conv2d modules
    module: int  # position in the Sequential
    channels_before: int
    channels_after: int
    # Relative reconstruction error ||Y - Y_hat||^2 / ||Y||^2 of the layer's output at held-out
    # calibration positions (never fitted); NaN when none were held out (every position fitted).
    rel_error: float
    seconds: float
    rows: int = 0  # sampled rows the refit was fitted on
    unknowns: int = 0  # unknowns of each output's refit: kept channels x taps + bias
    fit_error: float = float("nan")  # the same error on the fitted rows (optimistic)
    heldout_rows: int = 0


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
        lines = [
            "| conv | module | channels before | after | rows | unknowns | rel. error (held-out) | rel. error (fitted) "
            "| seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            held = f"{r.rel_error:.4g} ({r.heldout_rows} rows)" if r.heldout_rows else "n/a"
            lines.append(
                f"| {r.layer} | {r.module} | {r.channels_before} | {r.channels_after} | {r.rows} | {r.unknowns} | "
                f"{held} | {r.fit_error:.4g} | {r.seconds:.3f} |"
            )
        return "\n".join(lines)


_PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity)


def _run_to(model: nn.Sequential, upto: int, x: torch.Tensor) -> torch.Tensor:
    for m in list(model)[:upto]:
        x = m(x)
    return x


@torch.no_grad()
def prune_sequential(
    model: nn.Sequential,
    calibration_batches: Iterable,
    *,
    ratio: Optional[float] = 0.5,
    n_keep: Union[int, Dict[int, int], None] = None,
    layers: Optional[Sequence[int]] = None,
    positions_per_image: Optional[int] = 10,
    generator: Optional[torch.Generator] = None,
    ridge: float = 1e-6,
    progress: bool = True,
    group=None,
) -> Tuple[nn.Sequential, PruneReport]:
    """Prunes the input channels of the convs of a VGG-style nn.Sequential, layer by layer.

    The sequence holds Conv2d (groups=1), optional BatchNorm2d and pass-through modules (ReLU,
    MaxPool2d, AvgPool2d, Dropout, Identity), as a flattened SegNet encoder. For each chosen conv L
    (in order): statistics with inputs from the pruned network so far and targets from the original
    (its output without bias: the accumulated-error correction), select_channels, reconstruct (the
    new bias adds the original one back), and the removed input channels of L become removed output
    channels of the previous conv and of the BatchNorm between them.

    Across processes: when torch.distributed is initialised, every rank passes its own shard of
    the calibration data and each layer's statistics are summed over ``group`` before the
    selection, so every rank returns the same, bitwise-equal pruned model: the one a single process
    would prune from the union of the shards, up to rounding. Every rank must call it with the same
    model and arguments (checked). Progress and warnings show on the group's rank 0.

    Args:
        model: the nn.Sequential (left untouched; a pruned deep copy is returned).
        calibration_batches: a re-iterable source of batches, read once per pruned layer: a list
            of (N, C, H, W) tensors, or a DataLoader yielding such tensors or (input, ...) tuples
            (e.g. (image, label)). Each batch is moved to the model's device and dtype on its
            own, so memory does not grow with the number of images.
        ratio: share of input channels kept, n_keep = max(1, round(ratio * c)); ignored when
            n_keep is given.
        n_keep: an int for every layer, or {conv_index: n_keep}.
        layers: 0-based indices among the Conv2d modules whose inputs are pruned; default every
            conv except the first.
        positions_per_image: output positions sampled per image for the statistics (None: all).
        generator: for the position sampling; under torch.distributed, seed it differently on
            each rank (e.g. from the rank) so the ranks' samples are independent.
        ridge: ridge of the least-squares refit, relative to the mean of the kept patch
            variances (diagonal of A_SS): keeps the refit stable when ReLU leaves channels dead
            or the sampled rows barely outnumber the unknowns. 0 for plain least squares.
        progress: a tqdm progress bar per layer (when tqdm is installed).
        group: the torch.distributed process group to prune over (None: the default group when
            torch.distributed is initialised, else this process alone).
    Returns:
        (pruned nn.Sequential with the same module positions, PruneReport). The report's rows and
        errors count every rank's calibration data.
    """
    ranks = Ranks(group)
    error, plan = None, None
    try:  # on every rank before any collective: a rank that raised alone would leave the others waiting
        plan = _plan(model, calibration_batches, ratio, n_keep, layers, positions_per_image, ridge)
    except Exception as e:
        error = e
    ranks.agree(error)
    mods, conv_pos, layers, target_keep, batches = plan
    ranks.check_same_model(model, dict(
        layers=layers, keep=[target_keep(L, mods[conv_pos[L]].in_channels) for L in layers],
        positions_per_image=positions_per_image, ridge=ridge))

    original = model
    pruned = copy.deepcopy(model)
    was_training = original.training
    original.eval()  # BatchNorm must use (and not update) its running statistics
    pruned.eval()
    try:
        report = _prune_layers(original, pruned, mods, conv_pos, layers, batches, target_keep,
                               positions_per_image, generator, progress, ridge, ranks)
    finally:
        original.train(was_training)
    pruned.train(was_training)
    return pruned, PruneReport(report)


def _plan(model, calibration_batches, ratio, n_keep, layers, positions_per_image, ridge):
    """Checks the arguments; returns (modules, conv positions, sorted layers, target_keep, source)."""
    if not isinstance(model, nn.Sequential):
        raise ArgumentTypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    _check_ridge(ridge)
    if positions_per_image is not None:
        check_int(positions_per_image, "positions_per_image", 1)
    mods = list(model)
    for i, mod in enumerate(mods):
        # The model is run layer by layer: a pooling that returns (values, indices) would hand a
        # tuple to the next layer.
        if getattr(mod, "return_indices", False):
            raise ArgumentValueError(f"module {i} ({type(mod).__name__}) returns indices; prune_sequential needs each "
                                     "module to map a tensor to a tensor")
    conv_pos = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    if not conv_pos:
        raise ArgumentValueError("model holds no nn.Conv2d")
    for i in conv_pos:
        if mods[i].groups != 1:
            raise ArgumentValueError(f"module {i} is a grouped conv (groups={mods[i].groups}); only groups=1 can be pruned")
    if layers is None:
        layers = list(range(1, len(conv_pos)))
    layers = list(layers)
    for L in layers:
        if not 1 <= check_int(L, "layers") < len(conv_pos):
            raise ArgumentIndexError(f"layers must hold conv indices in [1, {len(conv_pos)}) (conv 0 sees the image), got {L!r}")
    if len(set(layers)) != len(layers):
        raise ArgumentValueError(f"layers must not repeat a conv, got {layers}")
    layers = sorted(layers)
    passthrough = (nn.BatchNorm2d, SegkernelsMaxPool2d) + _PASSTHROUGH
    for L in layers:
        between = mods[conv_pos[L - 1] + 1 : conv_pos[L]]
        bns = [m for m in between if isinstance(m, nn.BatchNorm2d)]
        others = [m for m in between if not isinstance(m, passthrough)]
        if others or len(bns) > 1:
            raise ArgumentValueError(
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
                raise ArgumentValueError(f"ratio must be in (0, 1], got {ratio!r}")
            k = max(1, int(round(ratio * c)))
        return check_int(k, f"n_keep for conv {L}", 1, c)

    for L in layers:  # validate before any work
        target_keep(L, mods[conv_pos[L]].in_channels)
    first = mods[conv_pos[0]]
    source = CalibrationSource(calibration_batches, first.weight.device, first.weight.dtype,
                               first.in_channels if conv_pos[0] == 0 else None)
    return mods, conv_pos, layers, target_keep, source


def _prune_layers(original, pruned, mods, conv_pos, layers, batches, target_keep, positions_per_image, generator,
                  progress, ridge, ranks) -> List[LayerReport]:
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
        held_x, held_y = [], []
        error = None
        try:
            _accumulate(stats, held_x, held_y, pruned, original, pos, batches, positions_per_image, generator,
                        progress and ranks.lead, f"conv {L} statistics")
        except Exception as e:
            error = e
        ranks.agree(error)
        if ranks.collective:
            stats.all_reduce(ranks.group)
        if stats.rows == 0:  # the same on every rank: the count is summed
            raise ArgumentValueError("calibration_batches yielded no rows on any rank (no batch, or only empty ones)")
        keep, _ = select_channels(stats, conv_p.weight.detach(), k)
        ridge_abs = 0.0
        if ridge:
            cols = _kept_columns(stats, keep)
            ridge_abs = ridge * float(stats.A.diagonal()[cols].mean())
        unknowns = k * stats.K + 1
        if stats.rows <= unknowns and ranks.lead:
            warnings.warn(
                f"prune_sequential: conv {L} is refitted from {stats.rows} sampled rows, no more than the {unknowns} "
                "unknowns of each output (kept channels x taps + bias): the refit interpolates them and generalises "
                "poorly; sample more images or positions_per_image",
                RuntimeWarning,
                stacklevel=4,  # the caller of prune_sequential (past its no_grad wrapper)
            )
        weight, bias = reconstruct(stats, keep, ridge=ridge_abs)
        if ranks.collective:  # keep is on the CPU, which NCCL cannot broadcast
            shared = [keep.to(stats.A.device), weight.contiguous(), bias.contiguous()]
            ranks.share_(shared)
            keep, weight, bias = shared[0].cpu(), shared[1], shared[2]
        fit_err = reconstruction_error(stats, keep, weight, bias)
        residual = _heldout_residual(held_x, held_y, _kept_columns(stats, keep), weight, bias, stats.A.device)
        ranks.sum_([residual])  # squared error, squared target, rows: over every rank's held-out rows
        held_rows = int(residual[2])
        err = float(residual[0] / residual[1].clamp_min(1e-300)) if held_rows else float("nan")
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
                seconds=time.perf_counter() - start, rows=stats.rows, unknowns=unknowns, fit_error=fit_err,
                heldout_rows=held_rows,
            )
        )
    return report


# Held-out rows kept per layer for its error: bounded memory (float32, rows x (c*K + n)).
_HELDOUT_ROWS = 2048


def _accumulate(stats, held_x, held_y, pruned, original, pos, batches, positions_per_image, generator, progress,
                desc) -> None:
    """Adds every calibration batch's sampled rows to stats, and keeps up to _HELDOUT_ROWS held-out rows."""
    conv_o = original[pos]
    w_o = conv_o.weight.detach()
    held_rows = 0
    for xb in progress_bar(batches, desc, batches.total()) if progress else batches:
        x_p = _run_to(pruned, pos, xb)
        x_o = _run_to(original, pos, xb)
        y = F.conv2d(x_o, w_o, None, conv_o.stride, conv_o.padding, conv_o.dilation)
        stats._check_batch(x_p, y)
        # As many held-out positions as fitted ones, while the held-out rows stay few.
        holdout = (positions_per_image or 0) if held_rows < _HELDOUT_ROWS else 0
        xf, yf, xh, yh = stats.sample_rows(x_p, y, positions_per_image, generator, holdout=holdout)
        stats.update_rows(xf, yf)
        if xh.shape[0]:
            held_x.append(xh.float())
            held_y.append(yh.float())
            held_rows += xh.shape[0]


def _heldout_residual(held_x, held_y, cols, weight, bias, device) -> torch.Tensor:
    """[||Y - X_S W^T - b||^2, ||Y||^2, rows] over this rank's held-out rows (float64)."""
    if not held_x:
        return torch.zeros(3, dtype=torch.float64, device=device)
    x = torch.cat(held_x)[:, cols.to(held_x[0].device)].double()
    y = torch.cat(held_y).double()
    fit = x @ weight.reshape(weight.shape[0], -1).t().to(x) + bias.to(x)
    return torch.stack([(y - fit).square().sum(), y.square().sum(), y.new_tensor(float(y.shape[0]))]).to(device)
