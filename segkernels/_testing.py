"""Test helpers exposed by the package, so that every op's tests share them."""

from __future__ import annotations

import contextlib

import torch

from . import _library

_python_poison = False


def poison_outputs_enabled() -> bool:
    """Whether Python-side op outputs (Triton paths) must be poisoned before the kernel runs."""
    return _python_poison


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill freshly allocated op outputs with NaN / all-ones bits while active."""
    global _python_poison
    previous_python = _python_poison
    _python_poison = enabled
    previous = None
    if _library.kernels_available():
        previous = torch.ops.segkernels._set_poison_outputs(enabled)
    try:
        yield
    finally:
        _python_poison = previous_python
        if previous is not None:
            torch.ops.segkernels._set_poison_outputs(previous)


def new_output(sizes, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty that honours poison_outputs(); Python-launched kernels allocate with it."""
    t = torch.empty(sizes, dtype=dtype, device=device, memory_format=memory_format)
    if _python_poison and t.numel() > 0:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t
