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
from .max_unpool import (
    max_pool2d_with_indices,
    max_pool3d_with_indices,
    max_unpool2d,
    max_unpool3d,
)
from .confusion_matrix import confusion_matrix
from .metrics import median_frequency_weights, segmentation_scores
from . import nn  # noqa: E402  (modules over the ops above)
from .kd_loss import kd_loss, seg_kd_loss  # noqa: E402
from .pruning import channel_gram, lasso_gram  # noqa: E402
from . import pruning  # noqa: E402

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
    "segmentation_scores",
    "median_frequency_weights",
    "nn",
    "kd_loss",
    "seg_kd_loss",
    "channel_gram",
    "lasso_gram",
    "pruning",
]

from .ps_assemble import ps_assemble, ps_assemble_dense  # noqa: E402

__all__ += ["ps_assemble", "ps_assemble_dense"]
