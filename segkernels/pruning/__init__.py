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

from ..ops.pruning import channel_gram, lasso_gram, reference_channel_gram, reference_lasso_gram
from .lasso import alpha_search, select_channels
from .prune import LayerReport, PruneReport, prune_sequential
from .reconstruct import reconstruct, reconstruction_error
from .stats import LayerStats

__all__ = [
    "LayerStats",
    "channel_gram",
    "lasso_gram",
    "select_channels",
    "alpha_search",
    "reconstruct",
    "reconstruction_error",
    "prune_sequential",
    "PruneReport",
    "LayerReport",
    "reference_channel_gram",
    "reference_lasso_gram",
]
