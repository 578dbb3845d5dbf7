"""The compiled extension and the rule that decides which back end an op runs.

``import segkernels`` must never fail because ``segkernels._C`` is missing or broken: the ops
then run their plain-PyTorch references, and a warning says so once.
Set ``SEGKERNELS_DISABLE_KERNELS=1`` to force that fallback (used by the tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

_load_error: Exception | None = None
_loaded = False

if os.environ.get("SEGKERNELS_DISABLE_KERNELS", "0") == "1":
    _load_error = RuntimeError("disabled by SEGKERNELS_DISABLE_KERNELS=1")
else:
    try:
        from . import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

        _loaded = True
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        _load_error = exc


def kernels_available() -> bool:
    """True when the compiled segkernels kernels are loaded (otherwise references run)."""
    return _loaded


# Read once at import: a plain constant is what torch.compile can trace through (an op call
# returning a bool inside a traced wrapper would break the graph).
_cuda_built = _loaded and bool(torch.ops.segkernels.built_with_cuda())


def cuda_kernels_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _cuda_built


def kernel_load_error() -> Exception | None:
    """Why the compiled kernels are not in use, or None when they are."""
    return _load_error


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton can be imported (GPU kernels, or CPU tensors under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take this tensor: CUDA tensors, or CPU ones when interpreting."""
    if not triton_available():
        return False
    return t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpreting())


# ----------------------------------------------------------------------------------------------
# The dispatch rule


@functools.lru_cache(maxsize=None)
def _warn_fallback(op: str, device_type: str, reason: str) -> None:
    warnings.warn(
        f"segkernels.{op}: no compiled kernel for {device_type} tensors ({reason}); running the "
        "plain-PyTorch reference, which is correct but slower.",
        RuntimeWarning,
        stacklevel=4,
    )


def use_kernel(op: str, device: torch.device, gpu_kernel: str) -> bool:
    """Whether op's compiled kernel runs for tensors on `device`, where gpu_kernel says what the
    op's GPU kernel is: "cuda" (built into the extension) or "triton" (registered from Python).

    Every op asks this one question, so a build without its CUDA part still runs the Triton ops
    on a GPU, and an op that cannot run warns once, with one text, and runs its reference.
    """
    if not _loaded:
        reason = str(_load_error)
    elif device.type in ("cpu", "meta"):
        return True
    elif device.type != "cuda":
        reason = "segkernels has CPU and CUDA kernels only"
    elif gpu_kernel == "cuda":
        if _cuda_built:
            return True
        reason = "the extension was built without its CUDA kernels"
    elif gpu_kernel == "triton":
        if triton_available():
            return True
        reason = "Triton is not installed"
    else:
        raise ValueError(f"gpu_kernel must be 'cuda' or 'triton', got {gpu_kernel!r}")
    _warn_fallback(op, device.type, reason)
    return False


# ----------------------------------------------------------------------------------------------
# Outputs allocated in Python (the Triton launchers)

# The test suite turns this on (with the C++ twin in testing builds) to fill every fresh output
# with NaN / all-ones bits, so that an element a kernel forgets to write cannot pass for 0.
_poison_outputs = False


def new_output(sizes, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """torch.empty for kernel outputs (poisoned while the test suite asks for it)."""
    t = torch.empty(sizes, dtype=dtype, device=device, memory_format=memory_format)
    if _poison_outputs and t.numel() > 0:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


# ----------------------------------------------------------------------------------------------
# Autograd plumbing


def register_autograd(op_name: str, backward, *, setup_context):
    """torch.library.register_autograd, plus a plain autograd.Function over the same op, setup
    and backward, returned for eager wrappers to call when a gradient is needed.

    Why: the Function that register_autograd generates calls torch._library.utils.fill_defaults
    on every forward that records a graph, and that re-reads the schema's argument list once per
    argument: 30-50 us a call here, more than max_unpool2d's kernel on a deep layer's map. The
    returned Function runs the same setup_context and backward without that cost. The op keeps
    its registered autograd for torch.compile, opcheck and direct op calls; eager wrappers should
    call the op itself under torch.compile (see records_grad).
    """
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    namespace, name = op_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    # ctx in forward, not a setup_context staticmethod: with one, Function.apply binds the
    # arguments through inspect.signature on every call (about 50 us).
    def forward(ctx, *args):
        output = call_below_autograd(op, *args)
        setup_context(ctx, args, output)
        return output

    # Built with type() so that the graph nodes carry the op's name (<name>_eager_autogradBackward).
    function = type(
        f"{name}_eager_autograd",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
    return function.apply


# torch's private guard that dispatches below the Autograd key; looked up once, so that a torch
# without it falls back to the public path (the op's registered autograd kernel) instead of failing.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _any_requires_grad(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor) and _any_requires_grad(a):
            return True
    return False


def call_below_autograd(op, *args):
    """op(*args), skipping the op's registered Python autograd kernel when no graph can be
    recorded: grad mode off (inside autograd.Function's forward and a first-order backward), or
    no argument that requires grad (an eager call that records nothing).

    Why: that kernel would only redispatch below autograd itself, and going through it costs
    25 us on a tiny map and about 100 us on max_unpool2d's backward for a (16, 512, 23, 30)
    map (the call is boxed and leaves and re-enters the dispatcher from Python): 5% of a
    memory-bound kernel that must keep up with PyTorch's own gather. With grad mode on (double
    backward), under torch.compile, or on a torch without the private guard, the op is called
    normally.
    """
    if (
        _below_autograd is None
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and _any_requires_grad(args))
    ):
        return op(*args)
    with _below_autograd():
        return op(*args)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether an eager call on these tensors must record a graph (and is not being compiled)."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch.compiler.is_compiling()
    )
