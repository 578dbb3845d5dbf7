"""The process group prune_sequential prunes over: statistics summed across ranks, results
broadcast from the group's first rank, and failures agreed on so that no rank waits forever."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from .._checks import ArgumentValueError

__all__ = ["Ranks"]


class Ranks:
    """One process (torch.distributed not initialised) or the ranks of `group` (None: the world)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        if not self.active:
            if group is not None:
                raise ArgumentValueError("group was given but torch.distributed is not initialised: call "
                                         "torch.distributed.init_process_group first, or pass group=None")
            self.rank, self.size = 0, 1
            return
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ArgumentValueError(f"this process (global rank {dist.get_rank()}) is not a member of group")
        self.size = dist.get_world_size(group)

    @property
    def lead(self) -> bool:
        """The rank that shows progress and warnings."""
        return self.rank == 0

    @property
    def collective(self) -> bool:
        return self.active and self.size > 1

    def agree(self, error: Optional[BaseException]) -> None:
        """Raises on every rank when any rank failed: a rank that raised alone would leave the
        others blocked in the next collective. The failing rank raises its own error."""
        if not self.collective:
            if error is not None:
                raise error
            return
        messages: List[Optional[str]] = [None] * self.size
        mine = None if error is None else f"{type(error).__name__}: {error}"
        self.dist.all_gather_object(messages, mine, group=self.group)
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise RuntimeError(f"prune_sequential failed on rank {rank} of the group: {message}")

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.collective:
            for t in tensors:
                self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)

    def share_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrites the tensors with the group's first rank's: the selection and refit are computed
        on every rank from the same statistics, but BLAS thread counts or different GPUs may round
        them differently, and the replicas must be bitwise equal."""
        if self.collective:
            src = self.dist.get_global_rank(self.group, 0) if self.group is not None else 0
            for t in tensors:
                self.dist.broadcast(t, src=src, group=self.group)

    def check_same_model(self, model: nn.Module, settings: dict) -> None:
        """Refuses, on every rank, a model or settings that differ across the ranks: each rank would
        otherwise all-reduce statistics of different layers (or shapes) and diverge silently."""
        if not self.collective:
            return
        mine = _signature(model, settings)
        everyone: List[Optional[dict]] = [None] * self.size
        self.dist.all_gather_object(everyone, mine, group=self.group)
        for rank, theirs in enumerate(everyone[1:], start=1):
            difference = _first_difference(everyone[0], theirs)
            if difference is not None:
                what, on_first, on_other = difference
                raise ArgumentValueError(
                    f"the ranks disagree on the model or on prune_sequential's arguments: {what} is {on_first} on "
                    f"rank 0 but {on_other} on rank {rank}")


def _signature(model: nn.Module, settings: dict) -> dict:
    modules = []
    for i, m in enumerate(model):
        params = []
        for name, p in list(m.named_parameters(recurse=True)) + list(m.named_buffers(recurse=True)):
            # Values too, cheaply: replicas that were never synchronised prune to different models.
            sums = (float(p.detach().double().sum()), float(p.detach().double().abs().sum())) if p.numel() else (0.0, 0.0)
            params.append((name, tuple(p.shape), str(p.dtype), sums))
        modules.append((f"module {i}", f"{type(m).__name__}({m.extra_repr()})", params))
    return {"modules": modules, "settings": settings}


def _close(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _first_difference(a: dict, b: dict):
    """(what, its value in a, in b) for the first thing that differs between two signatures."""
    for key in a["settings"]:
        if a["settings"][key] != b["settings"].get(key):
            return key, repr(a["settings"][key]), repr(b["settings"].get(key))
    if len(a["modules"]) != len(b["modules"]):
        return "the number of modules", len(a["modules"]), len(b["modules"])
    for (where, kind_a, params_a), (_, kind_b, params_b) in zip(a["modules"], b["modules"]):
        if kind_a != kind_b:
            return where, kind_a, kind_b
        if [p[:3] for p in params_a] != [p[:3] for p in params_b]:
            return f"{where}'s parameters", [p[:3] for p in params_a], [p[:3] for p in params_b]
        for (name, _, _, sums_a), (_, _, _, sums_b) in zip(params_a, params_b):
            if not all(_close(x, y) for x, y in zip(sums_a, sums_b)):
                return f"{where}'s {name} (sum, sum of magnitudes)", sums_a, sums_b
    return None
