"""Timing that reproduces: warm-up, interleaved repeats, spreads, paired ratios and their verdict.

On a shared machine the load changes while a benchmark runs. :func:`interleaved` therefore runs
the ways being compared in turn within every repeat (A, B, C, then B, C, A, ...), so a change of
load hits them alike, and :func:`paired_ratio` compares them repeat by repeat. A ratio whose
spread over the repeats includes 1 is reported as "no measurable difference" (:func:`verdict`).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch

NO_DIFFERENCE = "no measurable difference"


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and quartiles (``q1``, ``q3``, inclusive method) of per-repeat values.

    Raises:
        ValueError: If ``values`` is empty.
    """
    if not values:
        raise ValueError("spread: no timings (repeats must be >= 1)")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "repeats": len(values), "all": list(values)}


def interleaved(
    fns: Mapping[str, Callable[[], None]],
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None = None,
    wall_clock: Callable[[], float] = time.perf_counter,
    cpu_clock: Callable[[], float] = time.process_time,
) -> dict[str, dict[str, Any]]:
    """Time every function of ``fns`` once per repeat, in turn, after ``warmup`` untimed rounds.

    Repeat ``r`` starts with function ``r mod len(fns)`` and goes round (A, B, C; B, C, A; ...),
    so none always runs first (after another's garbage, with a cold cache) and a change of load
    between repeats hits every function. The warm-up rounds run the same way, untimed.

    Args:
        fns: Name -> a step to time (no arguments, its result ignored).
        warmup: Untimed rounds before the timed ones.
        repeats: Timed rounds.
        sync: Called before each clock reading (e.g. ``torch.cuda.synchronize``).
        wall_clock, cpu_clock: Clocks in seconds (wall time; this process's CPU time, which does
            not count waiting for a core). Replaceable for tests.

    Returns:
        Name -> ``{"wall": spread, "cpu": spread}`` (see :func:`spread`; ``all`` in repeat order).

    Raises:
        ValueError: If ``fns`` is empty, ``repeats < 1`` or ``warmup < 0``.
    """
    if not fns or repeats < 1 or warmup < 0:
        raise ValueError(f"interleaved: need functions, repeats >= 1 and warmup >= 0 "
                         f"(got {len(fns)}, {repeats}, {warmup})")
    names = list(fns)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if sync:
                sync()
            w0, c0 = wall_clock(), cpu_clock()
            fns[name]()
            if sync:
                sync()
            if r >= warmup:
                wall[name].append(wall_clock() - w0)
                cpu[name].append(cpu_clock() - c0)
    return {n: {"wall": spread(wall[n]), "cpu": spread(cpu[n])} for n in names}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """:func:`spread` of ``numerator[i] / denominator[i]``, the ratio within each repeat.

    For a speed-up give the slower way's times as numerator (images/s ratio = time ratio
    inverted); for a cost (e.g. DP / non-DP) the costlier way's.

    Raises:
        ValueError: If the sequences are empty or differ in length.
    """
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio: need equally many repeats (got {len(numerator)} and {len(denominator)})")
    return spread([a / b for a, b in zip(numerator, denominator)])


def verdict(ratio: Mapping[str, float], above: str = "faster", below: str = "slower") -> str:
    """``above`` or ``below`` 1, or :data:`NO_DIFFERENCE` when the ratio's min-max range includes 1.

    The range of the paired ratios is the spread the figure would claim against: when it
    reaches across 1, the difference is smaller than the noise.
    """
    if ratio["min"] <= 1.0 <= ratio["max"]:
        return NO_DIFFERENCE
    return above if ratio["median"] > 1.0 else below


def ratio_text(ratio: Mapping[str, float]) -> str:
    """``1.23x (1.10-1.40, IQR 1.18-1.30)``, or that with ``, no measurable difference``."""
    text = (f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}, IQR {ratio['q1']:.2f}-"
            f"{ratio['q3']:.2f})")
    return text + (f", {NO_DIFFERENCE}" if verdict(ratio) == NO_DIFFERENCE else "")


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: leave them); return the number in use.

    Raises:
        ValueError: If ``threads < 1`` (names the flag).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def busy_warning(load: Sequence[float] | None, threads: int, cores: int | None = None) -> str | None:
    """A warning when the 1-minute load average leaves fewer free cores than ``threads``, else None."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if load is None or load[0] + threads <= cores:
        return None
    return (f"load average {load[0]:.2f} on {cores} cores leaves fewer than {threads} free for this benchmark's "
            f"{threads} thread(s): its figures will not reproduce on an idle machine")
