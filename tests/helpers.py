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


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation of the Triton kernels for sm_90, without a GPU

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")


class _LaunchRecorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of launching."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))

        return launch


def record_triton_launches(module, run) -> list:
    """Runs run() with every @triton.jit function of module replaced by a recorder; returns the
    launches it made as (kernel, args, kwargs), none of them executed. The launchers run on CPU
    tensors: only the arguments they pass matter. The functions are put back before returning
    (compiling a kernel reads its helpers from the module)."""
    import triton

    launches = []
    kernels = {name: value for name, value in vars(module).items() if isinstance(value, triton.runtime.JITFunction)}
    if not kernels:
        pytest.skip("the kernels are interpreted (TRITON_INTERPRET=1)")
    try:
        for name, kernel in kernels.items():
            setattr(module, name, _LaunchRecorder(kernel, launches))
        run()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def _triton_type(name, value):
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def compile_for_sm90(kernel, args, kwargs) -> str:
    """Compiles one recorded launch ahead of time for sm_90 (Triton to cubin, no GPU needed),
    with the signature read from the kernel's parameters and the launch's own arguments and
    options. Returns the kernel's name; any compile error fails the test."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton has no NVIDIA back end")
    bound = dict(zip(kernel.arg_names, args))
    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    bound.update({k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS})
    missing = [p.name for p in kernel.params if p.name not in bound]
    assert not missing, f"{kernel.fn.__name__}: launch leaves {missing} unset"
    signature, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", bound[p.name]
        else:
            signature[p.name] = _triton_type(p.name, bound[p.name])
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert compiled.asm.get("cubin"), kernel.fn.__name__
    return kernel.fn.__name__


def compile_launches_for_sm90(launches) -> set:
    """compile_for_sm90 on each distinct (kernel, signature, constexprs) among the launches;
    returns the names of the kernels compiled."""
    seen, names = set(), set()
    for kernel, args, kwargs in launches:
        key = (kernel.fn.__name__,) + tuple(
            (type(a).__name__, str(a.dtype)) if isinstance(a, torch.Tensor) else (type(a).__name__, a if isinstance(a, bool) else None)
            for a in args
        ) + tuple(sorted((k, str(v)) for k, v in kwargs.items()))
        if key not in seen:
            seen.add(key)
            names.add(compile_for_sm90(kernel, args, kwargs))
    return names
