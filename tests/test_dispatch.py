"""The one dispatch rule (segkernels._library.use_kernel): which back end an op runs, and the
one warning when its compiled kernel cannot."""

from __future__ import annotations

import importlib
import os
import warnings

import pytest
import torch

from segkernels import _library

OPS = os.path.join(os.path.dirname(__file__), "..", "segkernels", "ops")
CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")


def _decide(op, device, kind):
    _library._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = _library.use_kernel(op, torch.device(device), kind)
    return runs, [str(w.message) for w in caught]


@pytest.fixture
def loaded_without_cuda_part(monkeypatch):
    # An extension built without its CUDA kernels, on a machine with a GPU: the Triton ops must
    # still run their GPU kernels (the bug: they ran their references with a warning blaming
    # the build), the CUDA-kernel ops must fall back, and both say so in one text.
    monkeypatch.setattr(_library, "_loaded", True)
    monkeypatch.setattr(_library, "_cuda_built", False)


def test_triton_ops_run_on_a_gpu_without_the_extensions_cuda_part(loaded_without_cuda_part, monkeypatch):
    monkeypatch.setattr(_library, "triton_available", lambda: True)
    assert _decide("confusion_matrix", "cuda", "triton") == (True, [])


def test_cuda_kernel_ops_fall_back_without_the_extensions_cuda_part(loaded_without_cuda_part):
    runs, texts = _decide("max_unpool2d", "cuda", "cuda")
    assert not runs
    assert texts == [
        "segkernels.max_unpool2d: no compiled kernel for cuda tensors (the extension was built without its CUDA "
        "kernels); running the plain-PyTorch reference, which is correct but slower."
    ]


def test_triton_ops_fall_back_without_triton(loaded_without_cuda_part, monkeypatch):
    monkeypatch.setattr(_library, "triton_available", lambda: False)
    runs, texts = _decide("kd_loss", "cuda", "triton")
    assert not runs and len(texts) == 1 and "Triton is not installed" in texts[0]


def test_cpu_runs_the_compiled_kernel_of_either_kind(loaded_without_cuda_part):
    assert _decide("kd_loss", "cpu", "triton") == (True, [])
    assert _decide("max_unpool2d", "cpu", "cuda") == (True, [])


def test_unloaded_extension_and_other_devices_fall_back(monkeypatch):
    monkeypatch.setattr(_library, "_loaded", False)
    monkeypatch.setattr(_library, "_load_error", ImportError("no _C"))
    runs, texts = _decide("ps_assemble", "cpu", "cuda")
    assert not runs and "(no _C)" in texts[0]
    monkeypatch.setattr(_library, "_loaded", True)
    runs, texts = _decide("ps_assemble", "mps", "cuda")
    assert not runs and "CPU and CUDA kernels only" in texts[0]


def test_the_warning_comes_once_per_op_and_reason(loaded_without_cuda_part):
    _library._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _library.use_kernel("max_unpool2d", torch.device("cuda"), "cuda")
            _library.use_kernel("ps_assemble", torch.device("cuda"), "cuda")
    assert len(caught) == 2


def test_unknown_kernel_kind_is_a_bug(loaded_without_cuda_part):
    with pytest.raises(ValueError, match="gpu_kernel"):
        _library.use_kernel("kd_loss", torch.device("cuda"), "opencl")


@pytest.mark.parametrize("op", sorted(d for d in os.listdir(OPS) if os.path.isdir(os.path.join(OPS, d))
                                      and not d.startswith("_")))
def test_each_op_declares_the_kind_of_its_gpu_kernel(op):
    # An op whose GPU kernel is Triton has segkernels/ops/<op>/triton.py; one whose GPU kernel is
    # CUDA C++ has csrc/<op>/<op>_cuda.cu. GPU_KERNEL must say which, or use_kernel decides wrong.
    module = importlib.import_module(f"segkernels.ops.{op}")
    has_triton = os.path.exists(os.path.join(OPS, op, "triton.py"))
    has_cuda = os.path.exists(os.path.join(CSRC, op, f"{op}_cuda.cu"))
    assert has_triton != has_cuda, op
    assert module.GPU_KERNEL == ("triton" if has_triton else "cuda")


def _grads_through_the_ops():
    import segkernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g).requires_grad_()
    s = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=g)
    v, i = segkernels.max_pool2d_with_indices(x, 2, compact=True)
    up = segkernels.max_unpool2d(v * v, i, 2)
    masks = segkernels.ps_assemble(x, torch.tensor([[0, 1, 1], [1, -1, 2]]), k=2, m=3)
    loss = up.sum() + masks.square().sum() + segkernels.kd_loss(s, t, temperature=2.0)
    return torch.autograd.grad(loss, (x, s))


def test_ops_run_with_and_without_torchs_private_autograd_guard(monkeypatch):
    # call_below_autograd skips an op's registered Python autograd kernel through a private torch
    # guard (torch._C._AutoDispatchBelowAutograd); on a torch without it, the op goes through
    # that kernel instead. Both paths give the same bits.
    if not _library.kernels_available():
        pytest.skip("compiled kernels not loaded")
    assert _library._below_autograd is not None  # this torch has it: the fast path ran above
    with_guard = _grads_through_the_ops()
    monkeypatch.setattr(_library, "_below_autograd", None)
    without = _grads_through_the_ops()
    for a, b in zip(with_guard, without):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
