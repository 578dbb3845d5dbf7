"""Helpers every op's tests share: comparison with references, opcheck, gradcheck, devices,
output poisoning and the test-only ops."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import segkernels
from segkernels import _library

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

requires_kernels = pytest.mark.skipif(
    not segkernels.kernels_available(), reason=f"compiled kernels not loaded: {segkernels.kernel_load_error()}"
)


@functools.lru_cache(maxsize=None)
def has_testing_ops() -> bool:
    """Whether the extension was built with its test-only ops (SEGKERNELS_BUILD_TESTING=1)."""
    return segkernels.kernels_available() and hasattr(torch.ops.segkernels_testing, "set_poison_outputs")


def get_testing_ops():
    """torch.ops.segkernels_testing: the CUDA kernels' element functions run on the CPU. Skips the
    test when the extension was built without them (CI checks that it was not)."""
    if not has_testing_ops():
        pytest.skip("the extension was built without its test-only ops (SEGKERNELS_BUILD_TESTING=1)")
    return torch.ops.segkernels_testing


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every output the ops allocate with NaN / all-ones bits while active (C++ kernels in
    a testing build, and the Triton launchers), so that an unwritten element shows."""
    previous_python = _library._poison_outputs
    _library._poison_outputs = enabled
    previous = torch.ops.segkernels_testing.set_poison_outputs(enabled) if has_testing_ops() else None
    try:
        yield
    finally:
        _library._poison_outputs = previous_python
        if previous is not None:
            torch.ops.segkernels_testing.set_poison_outputs(previous)

# (rtol, atol) for results that are computed, not copied.
_TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerances(dtype: torch.dtype):
    return _TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, exact: bool = False, **kw) -> None:
    """Compares values (and dtype and shape); exact=True demands bitwise equality (NaN == NaN)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    if exact:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, **kw)
    else:
        rtol, atol = tolerances(actual.dtype) if actual.is_floating_point() else (0, 0)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, **kw)


def assert_no_nan(t: torch.Tensor) -> None:
    """Outputs are poisoned with NaN before kernels run; a NaN left means an unwritten element."""
    assert not torch.isnan(t).any(), "output holds NaN: an element was never written"


def run_opcheck(op, args, kwargs=None) -> None:
    """torch.library.opcheck with every test utility (schema, autograd registration, fake
    tensor, AOT dispatch static and dynamic)."""
    torch.library.opcheck(op, args, kwargs or {})


def gradcheck(fn, inputs, **kw) -> None:
    assert all(t.dtype == torch.float64 for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert torch.autograd.gradcheck(fn, inputs, **kw)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """'contiguous', 'channels_last' or 'strided' (a non-contiguous view with the same values)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)
