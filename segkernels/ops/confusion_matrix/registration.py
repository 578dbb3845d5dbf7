"""Registration of the confusion-matrix op: its fake kernel. The C++ side declares the schema
and the CPU kernel; the Triton module registers the CUDA kernel."""

from __future__ import annotations

import torch

from ... import _library
from ..._checks import ArgumentValueError

# The matrix has num_classes**2 bins: at most 46340**2 < 2**31 of them (a 17 GB matrix), so bin
# indices stay far from int64 overflow and fit int32.
MAX_CLASSES = 46340

if _library.kernels_available():

    @torch.library.register_fake("segkernels::confusion_matrix")
    def _(input, labels, num_classes, ignore_index):
        return (
            labels.new_empty((num_classes, num_classes), dtype=torch.int64),
            labels.new_empty((1,), dtype=torch.int64),
        )

    @torch.library.register_vmap("segkernels::confusion_matrix")
    def _(info, in_dims, *args):
        raise ArgumentValueError(
            "segkernels.confusion_matrix does not support torch.vmap: the matrix counts over every position of "
            "its input, and its range check reads a count on the host; call it on the whole batch, or per sample "
            "in a loop"
        )

