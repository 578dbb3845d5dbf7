"""Package-wide properties: what `import segkernels` loads and which ops it registers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import segkernels
from helpers import requires_kernels, has_testing_ops

# Every op of the production namespace, by op package (segkernels/ops/<op>/).
PRODUCTION_OPS = {
    "built_with_cuda",
    "max_pool_with_indices", "max_unpool", "max_unpool_backward", "max_pool_backward",
    "confusion_matrix",
    "kd_loss", "seg_kd_loss",
    "ps_assemble", "ps_assemble_backward", "ps_assemble_dense", "ps_assemble_dense_backward",
    "channel_gram", "lasso_gram",
    "one_hot_conv2d", "one_hot_conv2d_weight_backward", "label_fractions",
    "upsample_argmax",
    "cross_entropy", "cross_entropy_backward",
}


def _registered(namespace: str) -> set:
    # The dispatcher's list of every registered op name ("namespace::name").
    names = torch._C._dispatch_get_all_op_names()
    return {n.split("::", 1)[1].split(".")[0] for n in names if n.startswith(namespace + "::")}


def test_import_loads_no_testing_module():
    code = (
        "import sys, segkernels, segkernels.nn, segkernels.pruning\n"
        "bad = [m for m in sys.modules if m.startswith('segkernels') and 'test' in m.split('.')[-1]]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@requires_kernels
def test_production_namespace_holds_exactly_the_production_ops():
    assert _registered("segkernels") == PRODUCTION_OPS


@requires_kernels
def test_test_only_ops_live_in_their_own_namespace():
    testing = _registered("segkernels_testing")
    if not has_testing_ops():
        assert not testing
        pytest.skip("not a testing build")
    assert {"set_poison_outputs", "max_unpool_tiled_logic", "max_pool_logic", "fast_divide",
            "ps_assemble_elementwise", "ps_assemble_backward_gather",
            "ps_assemble_dense_backward_gather"} <= testing
    assert not testing & PRODUCTION_OPS


def test_public_names():
    for name in segkernels.__all__:
        assert getattr(segkernels, name) is not None, name
