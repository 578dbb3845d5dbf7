"""Argument checks shared by every op, and the error policy they follow (README, "Error policy").

- TypeError: an argument of the wrong Python type, or a tensor of the wrong dtype.
- ValueError: a value or shape outside the op's contract: sizes, ranges, mismatched shapes,
  devices, unknown option strings.
- IndexError: data that indexes out of range: a label outside [0, C) that is not ignore_index,
  an unpooling index outside the output, a window's batch index outside the batch.

Each is raised as the subclass below, which is also a RuntimeError: PyTorch's own ops raise
RuntimeError for most bad inputs, and a drop-in user's ``except RuntimeError`` must still catch
ours. Messages name the argument, what it must be and what it was.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

__all__ = [
    "ArgumentTypeError",
    "ArgumentValueError",
    "ArgumentIndexError",
    "FLOAT_DTYPES",
]


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype (a TypeError, and a RuntimeError as PyTorch's)."""


class ArgumentValueError(ValueError, RuntimeError):
    """An argument value or shape outside the op's contract (a ValueError and a RuntimeError)."""


class ArgumentIndexError(IndexError, RuntimeError):
    """Data indexing out of range: labels, indices, batch indices (an IndexError and a RuntimeError)."""


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_tensor(value, name: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    check_tensor(value, name)
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ArgumentTypeError(f"{name} must be a floating tensor ({allowed}), got {value.dtype}")
    return value


def is_integer_tensor(value: torch.Tensor) -> bool:
    return not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)


def check_int(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An int (numpy integers too, never bool) within [minimum, maximum]."""
    # type(...) is int first: the numbers.Integral check goes through ABC machinery (microseconds).
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ArgumentValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool) and type(value).__name__ != "bool_":  # numpy.bool_ too
        raise ArgumentTypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_real(value, name: str, *, finite: bool = True, minimum: Optional[float] = None,
               positive: bool = False) -> float:
    """A real number (never bool); finite, >= minimum and > 0 as asked."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if finite and not math.isfinite(value):
        raise ArgumentValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ArgumentValueError(f"{name} must be >= {minimum}, got {value!r}")
    if positive and not value > 0:
        raise ArgumentValueError(f"{name} must be positive, got {value!r}")
    return value


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ArgumentValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_ignore_index(value, name: str = "ignore_index") -> int:
    """An int that fits the int64 the ops take."""
    value = check_int(value, name)
    if not -(2**63) <= value < 2**63:
        raise ArgumentValueError(f"{name} must fit in int64, got {value}")
    return value


def check_temperature(value, name: str = "temperature") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ArgumentValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def check_labels(labels, expected_shape: Sequence[int], device: torch.device, name: str = "labels",
                 what: str = "(N, *spatial)") -> torch.Tensor:
    """An integer label tensor (any integer dtype) of the given shape, on the given device."""
    check_tensor(labels, name)
    if not is_integer_tensor(labels):
        raise ArgumentTypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ArgumentValueError(f"{name} must be {what} = {tuple(expected_shape)}, got {tuple(labels.shape)}")
    check_device(labels, device, name)
    return labels


def check_device(value: torch.Tensor, device: torch.device, name: str) -> None:
    if value.device != device:
        raise ArgumentValueError(f"{name} must be on {device}, got {value.device}")


def labels_out_of_range(num_classes: int, ignore_index: int, count: Optional[int] = None,
                        name: str = "labels") -> ArgumentIndexError:
    """The error for a label outside [0, num_classes) that is not ignore_index."""
    where = f"{count} positions hold" if count is not None else "holds"
    return ArgumentIndexError(
        f"{name} {where} a value outside [0, {num_classes}) that is not ignore_index={ignore_index}"
    )


def _channels_last_strides(sizes, strides) -> bool:
    # c10's is_channels_last_strides_2d/3d: the strides order the dims as (N, *spatial, C), C
    # innermost; an all-size-1 ambiguity falls back to NCHW, as in PyTorch.
    order = [1, *range(len(sizes) - 1, 1, -1), 0]
    if strides[1] == 0:
        return False
    smallest = 0
    for d in order:
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return True


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The layout PyTorch's ops keep for t, decided by its stride order as PyTorch does: a
    channels-last tensor keeps channels_last (channels_last_3d) when sliced or permuted in a way
    that keeps C innermost, even if it is no longer contiguous in that format."""
    if t.dim() in (4, 5) and not t.is_contiguous() and _channels_last_strides(t.shape, t.stride()):
        return torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def in_suggested_layout(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is contiguous in its suggested layout, else a copy that is; the kernels
    read NCHW or channels-last tensors in place."""
    fmt = suggest_memory_format(t)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def channels_last_format(t: torch.Tensor) -> Optional[torch.memory_format]:
    """channels_last (4-D) or channels_last_3d (5-D) when t is laid out so and not plainly
    contiguous, else None."""
    if t.dim() not in (4, 5) or t.is_contiguous():
        return None
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return fmt if t.is_contiguous(memory_format=fmt) else None


def is_channels_last(t: torch.Tensor) -> bool:
    return channels_last_format(t) is not None
