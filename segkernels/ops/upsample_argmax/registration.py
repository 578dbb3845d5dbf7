"""Registration of upsample_argmax: its fake kernel and vmap rule. The C++ side declares the
schema and the CPU kernel; the Triton module registers the CUDA kernel. The output is an index
map: nothing to differentiate."""

from __future__ import annotations

import torch

from ... import _library

if _library.kernels_available():

    @torch.library.register_fake("segkernels::upsample_argmax")
    def _(logits, size, align_corners):
        return logits.new_empty((logits.shape[0], size[0], size[1]), dtype=torch.int64)

    @torch.library.register_vmap("segkernels::upsample_argmax")
    def _(info, in_dims, logits, size, align_corners):
        # Images are independent: the vmapped dimension folds into the batch.
        dim = in_dims[0]
        if dim is None:
            return torch.ops.segkernels.upsample_argmax(logits, size, align_corners), None
        x = logits.movedim(dim, 0)
        b, n = x.shape[0], x.shape[1]
        out = torch.ops.segkernels.upsample_argmax(x.reshape(b * n, *x.shape[2:]), size, align_corners)
        return out.reshape(b, n, *out.shape[1:]), 0
