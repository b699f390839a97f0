"""Timing and peak memory of training or inference steps, measured side by side.

The benchmark tools (``tools/benchmark_layers.py``, ``tools/benchmark.py``) compare candidates
on a shared machine whose load drifts. They therefore run all candidates in alternation, round
after round (:func:`interleaved_times`, the order rotating so that no candidate always follows
the same one), and report a candidate's ratio as the median over rounds of its time divided by
the baseline's time *in the same round* (:func:`ratio_summary`). Process CPU time (all threads)
gives a second ratio, of work done, which waiting for a busy machine's cores does not inflate.

Peak memory of one step, beyond what was allocated before it:

- :func:`peak_allocated`: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the profiler's
  per-operator allocations minus frees replayed in time order (tensor memory only; an operator's
  transient buffers count as its net).
- :func:`peak_resident`: the growth of the process's resident-set high-water mark (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs``) during the step: everything the process
  touched, allocator behaviour included. Meaningful in a fresh process per candidate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "FIELD_SCHEMES",
    "interleaved_times",
    "peak_allocated",
    "peak_resident",
    "ratio_summary",
    "resident_memory",
    "synchronize",
    "timed",
]

Step = Callable[[], object]

# The normalizations beyond the seeds' (docs/field.md), as both benchmark tools time them: CBN
# and MABN past their burn-in / warm-up, where they do their own work (plain BN before).
FIELD_SCHEMES = (
    "FRN",
    "EvoNorm-B0",
    "EvoNorm-S0",
    "NF",
    "CBN(burnin=0)",
    "BCN+WS",
    "MABN(warmup_iters=0)",
)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call of ``step``."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def interleaved_times(
    steps: Mapping[Hashable, Step],
    repeats: int,
    warmup: int,
    device: torch.device,
    *,
    on_round: Callable[[int], None] | None = None,
) -> dict[Hashable, list[tuple[float, float]]]:
    """``(wall, cpu)`` seconds of every step in each of ``repeats`` alternating rounds.

    ``warmup`` untimed rounds run first. Round ``r`` starts at candidate ``r mod len(steps)``
    and goes round the list, so position effects (caches, the previous candidate's frees)
    spread over all candidates. ``on_round(r)`` is called after each timed round (progress).
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[Hashable, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(repeats):
        offset = round_index % len(names)
        for name in names[offset:] + names[:offset]:
            times[name].append(timed(steps[name], device))
        if on_round is not None:
            on_round(round_index)
    return times


def ratio_summary(
    times: Mapping[Hashable, Sequence[tuple[float, float]]], baseline: Hashable
) -> dict[Hashable, dict[str, float]]:
    """Per candidate: median wall and CPU ms, and the medians of the per-round ratios.

    Args:
        times: candidate -> ``(wall, cpu)`` seconds per round, all candidates timed in the same
            rounds (as :func:`interleaved_times` returns them).
        baseline: the candidate the ratios divide by.

    Returns:
        candidate -> ``{"ms", "cpu_ms", "ratio", "cpu_ratio"}``; ``ratio`` is
        ``median_r(t_r / baseline_r)``, not a ratio of medians.

    Raises:
        ValueError: ``baseline`` is missing, or the candidates were timed in different numbers
            of rounds.
    """
    if baseline not in times:
        raise ValueError(f"baseline {baseline!r} is not among the timed candidates {list(times)}")
    reference = times[baseline]
    summary = {}
    for name, rounds in times.items():
        if len(rounds) != len(reference) or not rounds:
            raise ValueError(
                f"candidate {name!r} has {len(rounds)} timed rounds, the baseline "
                f"{len(reference)}; ratios need the same non-empty rounds"
            )
        summary[name] = {
            "ms": 1e3 * statistics.median(t[0] for t in rounds),
            "cpu_ms": 1e3 * statistics.median(t[1] for t in rounds),
            "ratio": statistics.median(t[0] / b[0] for t, b in zip(rounds, reference)),
            "cpu_ratio": statistics.median(t[1] / b[1] for t, b in zip(rounds, reference)),
        }
    return summary


def peak_allocated(step: Step, device: torch.device) -> float:
    """Peak bytes of tensor memory allocated during one step above what was allocated before."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as profile:
        step()
    # Each event's own allocations minus frees, replayed in time order.
    events = sorted(
        (e for e in profile.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return float(peak)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def resident_memory() -> dict[str, int]:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` of this process (Linux).

    Raises:
        OSError: ``/proc/self/status`` cannot be read (not Linux).
    """
    values = {}
    for line in _STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def peak_resident(step: Step) -> float:
    """Growth in bytes of the resident-set high-water mark during one call of ``step``.

    The mark is reset to the current resident set first (writing ``5`` to
    ``/proc/self/clear_refs``, Linux 4.0+). Freed memory that the allocator keeps is still
    resident, so run this in a fresh process after one warm-up step, ideally with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` fixed so that large blocks go back to the system when freed.

    Raises:
        OSError: not on Linux, or the mark cannot be reset.
    """
    _CLEAR_REFS.write_text("5")
    before = resident_memory()["VmRSS"]
    step()
    return float(resident_memory()["VmHWM"] - before)
