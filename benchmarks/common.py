"""Shared benchmark plumbing: device choice, timing with synchronisation, bytes, GB/s, peak memory.

Each benchmark records in extra_info: op (what is measured), impl ("torch" baseline or
"segkernels"), case (shape and dtype), bytes (the fewest bytes the op must move),
peak_bytes (measured extra memory at the op's peak, outputs included) and, where the bench
passes its baseline, paired_speedup (see run_benchmark). report.py turns the
pytest-benchmark JSON into the markdown table and the plot.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from typing import Callable, Optional

import torch


def bench_device() -> torch.device:
    name = os.environ.get("SEGKERNELS_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_scale() -> float:
    """SEGKERNELS_BENCH_SCALE < 1 shrinks the batch of every case (quick smoke runs)."""
    return float(os.environ.get("SEGKERNELS_BENCH_SCALE", "1"))


def scaled_batch(n: int) -> int:
    return max(1, int(round(n * bench_scale())))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Extra memory at the op's peak (its outputs included), measured, not estimated.

    CUDA: the caching allocator's peak. CPU: the process's peak resident set (VmHWM), reset just
    before the call through /proc/self/clear_refs.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        # Make glibc hand large freed buffers back to the OS for the duration, so the op's own
        # allocations show in the resident set instead of landing on recycled pages.
        libc = _libc()
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _proc_status("VmRSS:")
            out = fn()
            peak = _proc_status("VmHWM:") - base
        except OSError:
            return -1
        finally:
            if libc is not None:  # back to glibc's ceilings, so timings see its usual recycling
                libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    del out
    return peak


def synchronised(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn, then a device synchronisation (on CUDA), so that a timer around it sees the work."""

    def call():
        out = fn()
        synchronize(device)
        return out

    return call


def run_benchmark(
    benchmark,
    fn: Callable[[], object],
    *,
    op: str,
    impl: str,
    case: str,
    bytes_moved: int,
    device: torch.device,
    rounds: int = 5,
    baseline: Optional[Callable[[], object]] = None,
    formulation: Optional[str] = None,
) -> None:
    """Times fn (synchronised on CUDA) and records what report.py needs.

    formulation names what a baseline row ("torch") computes: the peer's own formulation and
    settings, printed under the report's table.

    With a baseline (the PyTorch function of the same case), also times the two interleaved
    and records the ratio of their medians as `paired_speedup`: the shared build VM drifts by
    tens of percent over seconds, so two medians taken a minute apart in separate tests can
    disagree on an op at parity, and calls timed side by side share the drift.
    """

    timed = synchronised(fn, device)
    timed()  # warm-up: lazy initialisation, allocator, autotuning
    if device.type == "cpu":
        # Large fresh CPU outputs ask for transparent huge pages (segkernels' new_output). On the
        # 2-core build machine (a VM) the first 5-15 such allocations of a size ran 2-5x slower
        # than the steady state a training loop lives in, seemingly while the host backs huge
        # pages the guest has not touched before. Warm up until that has passed.
        start = time.perf_counter()
        calls = 0
        for _ in range(20):
            if time.perf_counter() - start > 3.0:
                break
            fn()
            calls += 1
        # Short ops get more rounds (up to 50, about 1 s of timing): this shared VM swings by
        # tens of percent from call to call, and a median of 5 short calls swung with it.
        per_call = (time.perf_counter() - start) / max(calls, 1)
        rounds = max(rounds, min(50, int(1.0 / max(per_call, 1e-6))))
    benchmark.extra_info.update(
        op=op,
        impl=impl,
        case=case,
        device=str(device),
        bytes=int(bytes_moved),
        peak_bytes=int(peak_memory_bytes(fn, device)),
    )
    if formulation:
        benchmark.extra_info.update(formulation=formulation)
    benchmark.group = f"{op} | {case}"
    if device.type == "cuda":
        rounds = max(rounds, 25)  # GPU runs are short: more rounds for a stable median, same wall time
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    if baseline is not None:
        benchmark.extra_info.update(paired_speedup=paired_speedup(timed, baseline, device, rounds))


def run_once_benchmark(benchmark, fn: Callable[[], object], *, op: str, impl: str, case: str,
                       device: torch.device, bytes_moved: int = 0) -> None:
    """One timed call of an end-to-end run (tens of seconds to minutes), whose peak memory is
    measured during that same call: run_benchmark's warm-ups and rounds would repeat it five times.
    The time includes first-call costs (allocator growth, autotuning), as a user's one run does."""
    benchmark.extra_info.update(op=op, impl=impl, case=case, device=str(device), bytes=int(bytes_moved))
    benchmark.group = f"{op} | {case}"
    timed = synchronised(fn, device)
    peak = peak_memory_bytes(lambda: benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0), device)
    benchmark.extra_info.update(peak_bytes=int(peak))


def paired_speedup(timed: Callable[[], object], baseline: Callable[[], object], device: torch.device,
                   rounds: int) -> float:
    """median(baseline time) / median(timed time) over `rounds` interleaved pairs, alternating
    which of the two goes first."""
    timed_baseline = synchronised(baseline, device)
    timed_baseline()
    times = {timed: [], timed_baseline: []}
    for r in range(rounds):
        for f in (timed, timed_baseline) if r % 2 else (timed_baseline, timed):
            start = time.perf_counter()
            f()
            times[f].append(time.perf_counter() - start)
    return statistics.median(times[timed_baseline]) / statistics.median(times[timed])
