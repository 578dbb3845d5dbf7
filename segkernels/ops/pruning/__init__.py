"""The kernels of channel pruning on Gram statistics (see segkernels.pruning for the method):
``channel_gram`` (G = Z^T Z and q = Z^T y of the per-channel contributions, from A = Xf^T Xf and
B = Xf^T Y, never forming Wf^T Wf) and ``lasso_gram`` (coordinate descent on the Gram, every
alpha of a batch at once). CPU: C++ (csrc/pruning). CUDA: Triton (triton.py). Not
differentiable: they are used on statistics, under torch.no_grad."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ... import _library
from ..._checks import ArgumentTypeError, ArgumentValueError, check_float_tensor, check_int, check_real
from . import registration as _registration  # noqa: F401  (fake kernels)
from .reference import reference_channel_gram, reference_lasso_gram

if _library.triton_available():
    from . import triton as _triton  # noqa: F401  (registers the CUDA kernels)

__all__ = ["channel_gram", "lasso_gram", "reference_channel_gram", "reference_lasso_gram"]

GPU_KERNEL = "triton"  # what runs CUDA tensors (see _library.use_kernel)


def _check_float(t, name: str) -> None:
    check_float_tensor(t, name, (torch.float32, torch.float64))


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
        raise ArgumentTypeError(f"A, B and weight must share a dtype, got {A.dtype}, {B.dtype} and {weight.dtype}")
    if not (A.device == B.device == weight.device):
        raise ArgumentValueError(f"A, B and weight must be on one device, got {A.device}, {B.device} and {weight.device}")
    if weight.dim() < 2:
        raise ArgumentValueError(f"weight must be (n, c, *kernel), got shape {tuple(weight.shape)}")
    n, c = weight.shape[0], weight.shape[1]
    K = math.prod(weight.shape[2:])
    if tuple(A.shape) != (c * K, c * K):
        raise ArgumentValueError(f"A must be ({c * K}, {c * K}) for weight {tuple(weight.shape)}, got {tuple(A.shape)}")
    if tuple(B.shape) != (c * K, n):
        raise ArgumentValueError(f"B must be ({c * K}, {n}) for weight {tuple(weight.shape)}, got {tuple(B.shape)}")
    if not _library.use_kernel("channel_gram", A.device, GPU_KERNEL):
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
        raise ArgumentTypeError(f"G, q and alphas must share a dtype, got {G.dtype}, {q.dtype} and {alphas.dtype}")
    if not (G.device == q.device == alphas.device):
        raise ArgumentValueError("G, q and alphas must be on one device")
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        raise ArgumentValueError(f"G must be square (c, c), got {tuple(G.shape)}")
    c = G.shape[0]
    if tuple(q.shape) != (c,):
        raise ArgumentValueError(f"q must be ({c},), got {tuple(q.shape)}")
    if alphas.dim() != 1:
        raise ArgumentValueError(f"alphas must be 1-D (L,), got {tuple(alphas.shape)}")
    if bool((alphas < 0).any()) or not bool(torch.isfinite(alphas).all()):
        raise ArgumentValueError("alphas must be finite and >= 0")
    # The solver's soft threshold compares magnitudes: a NaN would pass for zero without a word.
    if not bool(torch.isfinite(G).all()) or not bool(torch.isfinite(q).all()):
        raise ArgumentValueError("G and q must be finite (a NaN or inf in the statistics: check the calibration data)")
    if bool((G.diagonal() < 0).any()):
        raise ArgumentValueError("G must be positive semi-definite, but its diagonal has a negative entry")
    # The descent reads one triangle's worth of G per coordinate: a G that is not a Gram (a
    # transposed or mis-assembled matrix) would solve some other problem without a word. A Gram
    # summed in a different order on each side of the diagonal is asymmetric by its rounding
    # error, which cancellation inflates: float32 statistics of inputs with a mean of 255 and
    # zero-sum filters gave 2e-3 of max |G| (G itself 5e-3 off), a mean of 1000 gave 3e-2 (G 9%
    # off), a mean of 1e4 gave 0.33 (G wrong by 12x); float64 stayed below 1e-8 at a mean of 1e4.
    asym = float((G - G.T).abs().max()) if c else 0.0
    scale = float(G.abs().max()) if c else 0.0
    if asym > (0.1 if G.dtype == torch.float32 else 1e-6) * scale:
        raise ArgumentValueError(
            f"G must be symmetric (a Gram Z^T Z), but max |G - G^T| = {asym:.3g} against max |G| = {scale:.3g}"
            + (" (a float32 Gram this far from symmetric has lost its precision to cancellation: accumulate "
               "the statistics in float64)" if G.dtype == torch.float32 else "")
        )
    n_samples = check_real(n_samples, "n_samples", positive=True)
    tol = check_real(tol, "tol", minimum=0.0)
    max_iter = check_int(max_iter, "max_iter", 0)
    if init is not None:
        _check_float(init, "init")
        if tuple(init.shape) != (alphas.shape[0], c) or init.dtype != G.dtype or init.device != G.device:
            raise ArgumentValueError(
                f"init must be ({alphas.shape[0]}, {c}) {G.dtype} on {G.device}, got {tuple(init.shape)} "
                f"{init.dtype} on {init.device}"
            )
        if not bool(torch.isfinite(init).all()):
            raise ArgumentValueError("init must be finite")
    if not _library.use_kernel("lasso_gram", G.device, GPU_KERNEL):
        return reference_lasso_gram(G, q, alphas, n_samples=n_samples, tol=tol, max_iter=max_iter, init=init)
    return torch.ops.segkernels.lasso_gram(G, q, alphas, float(n_samples), float(tol), int(max_iter), init)

