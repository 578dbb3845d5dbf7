"""Calibration batches for prune_sequential: any re-iterable source, read batch by batch."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .._checks import ArgumentTypeError, ArgumentValueError

__all__ = ["CalibrationSource"]


class CalibrationSource:
    """Wraps a list of tensors or a DataLoader (yielding tensors or (input, ...) tuples) and yields
    each batch's input on the model's device and in its dtype, one batch at a time, so memory
    does not grow with the number of calibration images.

    The source is read once per pruned layer, so it must be re-iterable: a one-shot iterator or
    generator would be exhausted after the first layer, and is refused.
    """

    def __init__(self, source, device: torch.device, dtype: torch.dtype, in_channels: Optional[int]):
        if isinstance(source, torch.Tensor):
            raise ArgumentTypeError(
                "calibration_batches must be an iterable of batches (a list of (N, C, H, W) tensors or a "
                f"DataLoader), got a single tensor of shape {tuple(source.shape)}: pass [tensor]")
        try:
            first_iterator = iter(source)
        except TypeError:
            raise ArgumentTypeError(
                "calibration_batches must be a list of (N, C, H, W) tensors or a DataLoader, got "
                f"{type(source).__name__}") from None
        if first_iterator is source:
            raise ArgumentTypeError(
                "calibration_batches must be re-iterable (a list, a tuple, a DataLoader): it is read once per "
                f"pruned layer, and this {type(source).__name__} would be exhausted after the first")
        self.source = source
        self.device = device
        self.dtype = dtype
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.source)

    def total(self) -> Optional[int]:
        """The number of batches where the source knows it (for the progress bar)."""
        try:
            return len(self.source)
        except TypeError:
            return None

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.source):
            x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) > 0 else batch
            if not isinstance(x, torch.Tensor):
                raise ArgumentTypeError(
                    f"calibration_batches item {i} must be an (N, C, H, W) tensor or a tuple (input, ...) starting "
                    f"with one, got {type(batch).__name__}" + ("" if x is batch else f" starting with {type(x).__name__}"))
            if x.dim() != 4 or not x.is_floating_point():
                raise ArgumentValueError(
                    f"calibration_batches item {i} must be a floating-point (N, C, H, W) tensor, got {x.dtype} of "
                    f"shape {tuple(x.shape)}")
            if self.in_channels is not None and x.shape[1] != self.in_channels:
                raise ArgumentValueError(
                    f"calibration_batches item {i} has {x.shape[1]} channels, the model's first conv takes "
                    f"{self.in_channels}")
            # non_blocking: a pinned DataLoader batch overlaps its copy with the previous batch's work.
            yield x.to(device=self.device, dtype=self.dtype, non_blocking=True)
