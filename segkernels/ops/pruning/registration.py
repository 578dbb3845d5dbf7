"""Registration of channel_gram and lasso_gram: their fake kernels (they are not
differentiable: no autograd). The C++ side declares the schemas and the CPU kernels; the Triton
module registers the CUDA kernels."""

from __future__ import annotations

import torch

from ... import _library
from ..._checks import ArgumentValueError

if _library.kernels_available():

    @torch.library.register_fake("segkernels::channel_gram")
    def _(A, B, weight):
        c = weight.shape[1]
        return A.new_empty((c, c)), A.new_empty((c,))

    @torch.library.register_fake("segkernels::lasso_gram")
    def _(G, q, alphas, n_samples, tol, max_iter, init):
        return G.new_empty((alphas.shape[0], G.shape[0]))

    def _no_vmap(op):
        def rule(info, in_dims, *args):
            raise ArgumentValueError(f"segkernels.{op} does not support torch.vmap: it reduces statistics "
                                     "already summed over every sampled row; call it once per layer")

        return rule

    for _op in ("channel_gram", "lasso_gram"):
        torch.library.register_vmap(f"segkernels::{_op}", _no_vmap(_op))
