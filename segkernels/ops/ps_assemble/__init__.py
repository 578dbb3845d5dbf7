"""InstanceFCN position-sensitive instance assembly (Dai et al., "Instance-sensitive Fully
Convolutional Networks", ECCV 2016).

k * k position-sensitive score maps per group become instance masks: an m x m window is split
into a k x k grid of cells (cell of offset u is ``floor(u * k / m)``; m = 21, k = 5 gives cells
of 5, 4, 4, 4, 4), and each cell copies its own sub-window from the score map of its relative
position::

    out[r, g, u, v] = scores[b, g * k * k + (u * k // m) * k + (v * k // m), y0 + u, x0 + v]

for window r = (b, y0, x0), and ``pad_value`` where (y0 + u, x0 + v) lies outside the map.

* :func:`ps_assemble` takes explicit windows (R, 3) int64 rows (batch_index, y0, x0), the
  top-left corners of the windows in score-map coordinates.
* :func:`ps_assemble_dense` assembles the window centred at every position of a stride grid.

Gradients (with respect to ``scores``) are gathers, not scatters: every score element sums the
gradients of the output elements that copied it in a fixed order (windows in ascending
(y0, window index) order), with no float atomics, so they are bitwise repeatable on every
device, also with thousands of overlapping windows, and the CPU and CUDA kernels give the same
bits. The sparse backward sorts the windows on their device (``torch.sort``, stable); nothing
in forward or backward synchronises with the host.

Batch indices: with ``check_windows=True`` (default) a batch index outside [0, N) raises
IndexError; on CUDA that check is one host read. With ``check_windows=False`` nothing is read
back: rows with an invalid batch index are assembled as all ``pad_value`` and receive no
gradient (never an out-of-bounds read). Under ``torch.compile(fullgraph=True)`` pass
``check_windows=False`` (the check is data-dependent).
"""

from __future__ import annotations

import torch

from ... import _library
from ..._checks import (
    ArgumentIndexError,
    ArgumentTypeError,
    ArgumentValueError,
    check_float_tensor,
    check_int,
    check_real,
    check_tensor,
)
from .reference import dense_windows, reference_ps_assemble, reference_ps_assemble_dense

if _library.kernels_available():
    from .registration import AssembleDenseFunction, AssembleFunction

__all__ = [
    "ps_assemble",
    "ps_assemble_dense",
    "reference_ps_assemble",
    "reference_ps_assemble_dense",
    "dense_windows",
]

GPU_KERNEL = "cuda"  # what runs CUDA tensors (see _library.use_kernel)


# ----------------------------------------------------------------------------------------------
# Public API


def _check_scores(scores, k, m) -> tuple:
    check_float_tensor(scores, "scores")
    k = check_int(k, "k", 1)
    m = check_int(m, "m", 1)
    if k > m:
        raise ArgumentValueError(f"k must be <= m (each of the k x k cells needs at least one offset), got k={k}, m={m}")
    if scores.dim() != 4:
        raise ArgumentValueError(f"scores must have shape (N, G * k * k, H, W), got {tuple(scores.shape)}")
    c = scores.shape[1]
    if c == 0 or c % (k * k) != 0:
        raise ArgumentValueError(f"scores must have a positive multiple of k * k = {k * k} channels, got {c}")
    return k, m


def ps_assemble(
    scores: torch.Tensor,
    windows: torch.Tensor,
    *,
    k: int,
    m: int,
    pad_value: float = 0.0,
    check_windows: bool = True,
) -> torch.Tensor:
    """Assembles one m x m instance mask per window from k x k position-sensitive score maps.

    Args:
        scores: (N, G * k * k, H, W), float16/bfloat16/float32/float64, any layout (NCHW,
            channels_last, strided views: read in place). Channel ``g * k * k + i * k + j`` is
            the score map of cell (i, j) of group g.
        windows: (R, 3) int64 rows (batch_index, y0, x0): top-left corners in score-map
            coordinates; a window may reach past the border (or lie wholly outside).
        k: cells per side, 1 <= k <= m.
        m: window side.
        pad_value: value of the offsets outside the map.
        check_windows: raise IndexError for a batch index outside [0, N) (on CUDA: one host
            read); False skips the check: such rows are all pad_value, with zero gradient.

    Returns:
        (R, G, m, m) contiguous, dtype of scores;
        ``out[r, g, u, v] = scores[b, g*k*k + (u*k//m)*k + (v*k//m), y0 + u, x0 + v]``.
        Differentiable with respect to scores (deterministic gather backward).
    """
    k, m = _check_scores(scores, k, m)
    pad = check_real(pad_value, "pad_value", finite=False)
    check_tensor(windows, "windows")
    if windows.dtype != torch.int64:
        raise ArgumentTypeError(f"windows must be int64 rows (batch_index, y0, x0), got {windows.dtype}")
    if windows.dim() != 2 or windows.shape[1] != 3:
        raise ArgumentValueError(f"windows must have shape (R, 3) with rows (batch_index, y0, x0), got {tuple(windows.shape)}")
    if windows.device != scores.device:
        raise ArgumentValueError(f"windows must be on the device of scores ({scores.device}), got {windows.device}")
    if check_windows and windows.shape[0] > 0:
        b = windows[:, 0]
        bad = (b < 0) | (b >= scores.shape[0])
        try:
            any_bad = bool(bad.any())
        except RuntimeError as exc:  # data-dependent: torch.vmap cannot read it on the host
            raise ArgumentValueError(
                "ps_assemble: check_windows=True reads the windows' batch indices on the host, which this "
                "transform cannot; pass check_windows=False (invalid rows then assemble as pad_value)"
            ) from exc
        if any_bad:
            row = int(bad.nonzero()[0, 0])
            raise ArgumentIndexError(
                f"windows[{row}, 0] = {int(b[row])} is not a batch index of scores (batch size {scores.shape[0]})"
            )
    if _library.use_kernel("ps_assemble", scores.device, GPU_KERNEL):
        return _library.call_op(torch.ops.segkernels.ps_assemble.default, AssembleFunction, scores, windows, k, m,
                                pad)
    if not check_windows:  # the reference raises on invalid rows; give them the kernels' rule
        valid = (windows[:, 0] >= 0) & (windows[:, 0] < scores.shape[0])
        out = reference_ps_assemble(scores, torch.where(valid[:, None], windows, torch.zeros_like(windows)), k, m, pad)
        return torch.where(valid.view(-1, 1, 1, 1), out, torch.full((), pad, dtype=out.dtype, device=out.device))
    return reference_ps_assemble(scores, windows, k, m, pad)


def ps_assemble_dense(
    scores: torch.Tensor, *, k: int, m: int, stride: int = 1, pad_value: float = 0.0
) -> torch.Tensor:
    """Assembles the window centred at every position (y, x) of the stride grid
    (top-left (y - m // 2, x - m // 2)).

    Args:
        scores: (N, G * k * k, H, W), any float dtype and layout.
        k, m, pad_value: as :func:`ps_assemble`.
        stride: window grid step (>= 1); y, x run over 0, stride, 2 * stride, ...

    Returns:
        (N, G, ceil(H / stride), ceil(W / stride), m, m) contiguous; equal to
        ``ps_assemble`` on ``dense_windows(N, H, W, m, stride)`` reshaped. Deterministic backward.
    """
    k, m = _check_scores(scores, k, m)
    stride = check_int(stride, "stride", 1)
    pad = check_real(pad_value, "pad_value", finite=False)
    if _library.use_kernel("ps_assemble_dense", scores.device, GPU_KERNEL):
        return _library.call_op(torch.ops.segkernels.ps_assemble_dense.default, AssembleDenseFunction, scores, k,
                                m, stride, pad)
    return reference_ps_assemble_dense(scores, k, m, stride, pad)
