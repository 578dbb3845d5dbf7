"""The compiled extension and the rule that decides which back end an op runs.

``import segkernels`` must never fail because ``segkernels._C`` is missing or broken: the ops
then run their plain-PyTorch references, and a warning says so once.
Set ``SEGKERNELS_DISABLE_KERNELS=1`` to force that fallback (used by the tests).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import warnings

import torch
from torch.autograd import forward_ad as _forward_ad

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


def autocast_on(device: torch.device) -> bool:
    """Whether torch.autocast is on for the device's type (False for a type it does not know,
    such as meta): the ops' dtype rules follow PyTorch's own ops under autocast."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
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
# Autograd, forward-mode AD and torch.func transforms: one path per op


def op_function(op_name: str, *, setup_context, backward, jvp):
    """The one autograd path of an op.

    Registers backward and setup_context as the op's autograd (torch.library.register_autograd:
    what torch.compile, opcheck and direct op calls use) and returns an autograd.Function over
    the same op, setup_context and backward, plus jvp for forward-mode AD. The public functions
    call it through call_op. It is a setup_context-style Function, which torch.func.grad, vjp,
    jvp and jacrev accept; under torch.vmap it is batched through the ops' own vmap rules
    (generate_vmap_rule), which each op registers with torch.library.register_vmap.
    """
    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    namespace, name = op_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default

    def forward(*args):
        return call_below_autograd(op, *args)

    # Function.apply binds the arguments through inspect.signature(forward) on every call; a
    # precomputed signature (which inspect returns as it is) saves about 20 us of the 50.
    forward.__signature__ = inspect.signature(forward)

    # Built with type() so that the graph nodes carry the op's name (<name>_functionBackward).
    return with_eager_twin(type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    ))


def with_eager_twin(function):
    """Attaches to a setup_context-style Function its eager twin (function.eager): the same
    forward, setup_context and backward as a ctx-style Function, which call_op takes when no
    transform or forward-mode AD is active.

    Why: Function.apply binds a setup_context Function's arguments through inspect and goes
    through functorch's dispatch on every call, about 25 us more than a ctx-style Function (30
    against 55 us for a tiny pooling that records a graph), a few percent of a deep layer's
    pooling. The twin runs the same code, so there is still one autograd path per op.
    """

    def forward(ctx, *args):
        output = function.forward(*args)
        function.setup_context(ctx, args, output)
        return output

    function.eager = type(
        f"{function.__name__}_eager",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(function.backward)},
    )
    return function


# Private probes of torch's transform state, looked up once; a torch without them makes every
# call take the autograd.Function (correct, 10-20 us slower) instead of failing.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)


def _forward_ad_level() -> int:
    return getattr(_forward_ad, "_current_level", 0)


def _transformed() -> bool:
    """A torch.func transform or forward-mode AD is active (or this torch cannot tell)."""
    return _functorch_active is None or _functorch_active() or _forward_ad_level() >= 0


def may_need_gradient(t: torch.Tensor) -> bool:
    """Whether an input's gradient (or tangent) may be asked for: it requires grad, or a
    transform or forward-mode AD is active (whose tangents a plain call cannot see)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return True
    return not torch.compiler.is_compiling() and _transformed()


def call_op(op, function, *args):
    """An eager public call of op: the op itself when nothing is recorded (the fast path), its
    autograd.Function under a transform or forward-mode AD, the Function's eager twin when only
    a graph is recorded, and the op with its registered autograd under torch.compile (which
    traces ops, not Functions with a jvp)."""
    if torch.compiler.is_compiling():
        return op(*args)
    return apply_function(function, args, lambda: call_below_autograd(op, *args))


def apply_function(function, args, plain):
    """function.apply(*args) under a transform or forward-mode AD, function.eager.apply(*args)
    when a graph is recorded, plain() when nothing is."""
    if _transformed():
        return function.apply(*args)
    if torch.is_grad_enabled() and _any_requires_grad(args):
        return function.eager.apply(*args)
    return plain()


def fold_batch(info, in_dims, tensors):
    """For vmap rules: each tensor with its vmapped dim moved to the front (unbatched ones
    expanded), that dim folded into the op's own batch dim 0. Returns the folded tensors and
    the vmap batch size."""
    size = info.batch_size
    out = []
    for t, d in zip(tensors, in_dims):
        if t is None:
            out.append(None)
            continue
        t = t.expand(size, *t.shape) if d is None else t.movedim(d, 0)
        out.append(t.reshape(size * t.shape[1], *t.shape[2:]))
    return out, size


def unfold_batch(t: torch.Tensor, size: int) -> torch.Tensor:
    """The inverse of fold_batch for an op output whose dim 0 holds size * N entries."""
    return t.reshape(size, t.shape[0] // size if size else 0, *t.shape[1:])


# ----------------------------------------------------------------------------------------------
# Calling an op below its autograd kernel


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
        or _transformed()  # torch.func's layers dispatch the op themselves
    ):
        return op(*args)
    with _below_autograd():
        return op(*args)
