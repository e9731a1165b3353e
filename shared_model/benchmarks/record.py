"""What a benchmark's JSON record holds besides its timings: the command, the machine, the load.

``promptsam bench step --out FILE`` and ``promptsam bench dp --out FILE`` write
:func:`bench_record`: a figure quoted in the README comes from such a committed file
(``docs/bench/``), so a reader can see the command, the machine and the spread behind it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model and cores, torch version and threads, Python, OS, and the GPU if one is visible."""
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def spread(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of per-repeat timings, with the timings themselves (seconds)."""
    if not seconds:
        raise ValueError("spread: no timings (repeats must be >= 1)")
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "repeats": len(seconds), "all": list(seconds)}


def ratio_range(numerator: dict[str, Any], denominator: dict[str, Any]) -> list[float]:
    """``[lowest, highest]`` ratio two :func:`spread` results allow (min / max, max / min)."""
    return [numerator["min"] / denominator["max"], numerator["max"] / denominator["min"]]


def bench_record(argv: Sequence[str], warmup: int, results: list[dict[str, Any]],
                 load_start: list[float] | None) -> dict[str, Any]:
    """The JSON a benchmark writes with ``--out``.

    Args:
        argv: The command's arguments after ``promptsam``.
        warmup: Untimed warm-up iterations before the repeats.
        results: The benchmark's result dicts (one per configuration).
        load_start: :func:`load_average` taken before the benchmark started.
    """
    return {
        "command": shlex.join(["promptsam", *argv]),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "warmup": warmup,
        "results": results,
    }


def write_bench_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as indented JSON, creating the folder.

    Raises:
        ValueError: If ``path`` does not end in ``.json`` (names the flag and the path).
    """
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"--out {path}: expected a .json file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def ratio_text(median: float, lo: float, hi: float) -> str:
    """``1.23x (1.10-1.40 over the repeats)``, saying so when the range includes 1 (no difference)."""
    text = f"{median:.2f}x ({lo:.2f}-{hi:.2f} over the repeats)"
    return text + (", no measurable difference" if lo <= 1.0 <= hi else "")


def _conditions(record: dict[str, Any]) -> str:
    m = record["machine"]
    load = "/".join(f"{x:.2f}" for x in record["load_average_start"] or []) or "n/a"
    load_end = "/".join(f"{x:.2f}" for x in record["load_average_end"] or []) or "n/a"
    return (f"`{record['command']}`; {m['cpu_model']}, {m['cpu_cores']} cores, {m['torch_threads']} torch "
            f"thread(s), torch {m['torch']}; load average (1/5/15 min) {load} at start, {load_end} at end")


def step_summary(record: dict[str, Any]) -> str:
    """The README's line for a ``bench step --out`` record (its first result)."""
    r = record["results"][0]

    def both(ratio: str) -> str:
        return (f"wall time **{ratio_text(r[ratio], *r[f'{ratio}_range'])}**, process CPU time "
                f"**{ratio_text(r[f'{ratio}_cpu'], *r[f'{ratio}_cpu_range'])}**")

    return (f"plain {r['plain']['images_per_s']:.2f} img/s, SAM path {r['sam_path']['images_per_s']:.2f} img/s, "
            f"full pipeline {r['full']['images_per_s']:.2f} img/s (median wall time); SAM path / plain: "
            f"{both('sam_path_vs_plain')}; full pipeline / SAM path: {both('full_vs_sam_path')}; median of "
            f"{r['repeats']} steps after {record['warmup']} warm-up; {r['plain']['gflop_per_step']:.2f} GFLOP per "
            f"plain step; max logit difference {r['max_abs_diff_sam_paths']:.0e}; " + _conditions(record))


def dp_summary(record: dict[str, Any]) -> str:
    """The README's line for a ``bench dp --out`` record."""
    r = record["results"][0]

    def both(mode: str) -> str:
        return (f"wall time **{ratio_text(r[f'ratio_{mode}'], *r[f'ratio_{mode}_range'])}**, process CPU time "
                f"**{ratio_text(r[f'ratio_{mode}_cpu'], *r[f'ratio_{mode}_cpu_range'])}**")

    return (f"DP-SGD step / non-DP step (non-DP {r['non_dp_s']:.3f} s per step): per-image microbatches "
            f"{both('microbatch')}; batched {both('batched')}; median of {r['steps']} steps after "
            f"{r['warmup']} warm-up; " + _conditions(record))
