"""segkernels: fused kernels for training and compressing semantic-segmentation networks.

Every op has a compiled kernel (C++ on CPU, CUDA C++ or Triton on GPU) and a plain-PyTorch
reference beside it; when the compiled kernels are unavailable the references run instead.
"""

from ._library import (
    cuda_kernels_available,
    kernel_load_error,
    kernels_available,
    triton_available,
)
from .ops.max_unpool import (
    max_pool2d_with_indices,
    max_pool3d_with_indices,
    max_unpool2d,
    max_unpool3d,
)
from .ops.confusion_matrix import confusion_matrix
from .ops.cross_entropy import cross_entropy
from .dense import offset_max_pool2d, shift_and_stitch
from .metrics import median_frequency_weights, segmentation_scores
from .ops.kd_loss import kd_loss, seg_kd_loss
from .ops.ps_assemble import ps_assemble, ps_assemble_dense
from .ops.one_hot_conv2d import label_fractions, one_hot_conv2d
from .ops.upsample_argmax import upsample_argmax
from .pruning import channel_gram, lasso_gram
from . import adapt, pruning
from . import nn  # noqa: E402  (modules over the ops above)

__version__ = "0.1.0"

__all__ = [
    "cuda_kernels_available",
    "kernel_load_error",
    "kernels_available",
    "triton_available",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "max_unpool2d",
    "max_unpool3d",
    "confusion_matrix",
    "cross_entropy",
    "segmentation_scores",
    "median_frequency_weights",
    "nn",
    "kd_loss",
    "seg_kd_loss",
    "ps_assemble",
    "ps_assemble_dense",
    "one_hot_conv2d",
    "label_fractions",
    "upsample_argmax",
    "shift_and_stitch",
    "offset_max_pool2d",
    "channel_gram",
    "lasso_gram",
    "pruning",
    "adapt",
]
