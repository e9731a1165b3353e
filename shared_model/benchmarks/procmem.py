"""Memory of a tree of processes, sampled while a run goes on (Linux ``/proc``).

A federated run is many processes: the SuperLink, the simulation engine, Ray's daemons and its
client actors (or SuperNodes and their ClientApp processes). :class:`ProcessTreeProbe` samples
them every ``interval`` seconds and keeps the peak of the summed proportional set size (PSS:
shared pages split among their users, so the sum is what the tree costs the machine) and, per
process whose command line contains ``track``, its peak resident set size (RSS).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def memory_kib(pid: int, kind: str = "pss") -> int:
    """PSS (``kind="pss"``, falling back to RSS where ``smaps_rollup`` is missing) or RSS of a
    process in KiB; 0 for a process that is gone."""
    sources = (("smaps_rollup", "Pss:"), ("status", "VmRSS:")) if kind == "pss" else (("status", "VmRSS:"),)
    for name, key in sources:
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


def command_line(pid: int) -> str:
    """The process's command line (its title, for Ray workers), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class ProcessTreeProbe:
    """Samples the processes under ``roots`` every ``interval`` seconds, in a thread.

    Args:
        roots: Process ids whose trees (themselves and their descendants) are measured.
        interval: Seconds between samples.
        track: Keep the peak RSS of each process whose command line contains this text (e.g.
            ``"ClientAppActor"``: Ray's client actors); None = none.

    Attributes:
        peak_mib: Peak of the summed PSS of the trees, MiB.
        tracked_peak_mib: Process id -> its peak RSS in MiB, for the tracked processes.
        samples: Samples taken.
        timeline: ``(seconds since the first sample, summed PSS in MiB)`` of every sample: a
            bounded run levels off, a leak keeps climbing.
    """

    def __init__(self, roots: list[int], interval: float = 1.0, track: str | None = None) -> None:
        self.roots, self.interval, self.track = list(roots), interval, track
        self.peak_mib = 0.0
        self.tracked_peak_mib: dict[int, float] = {}
        self.samples = 0
        self.timeline: list[tuple[float, float]] = []
        self._t0: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add_root(self, pid: int) -> None:
        """Measure the tree of ``pid`` too, from the next sample on."""
        self.roots.append(pid)

    def sample(self) -> None:
        """Take one sample now."""
        pids = {p for r in list(self.roots) for p in (r, *descendants(r))}
        total = sum(memory_kib(p) for p in pids) / 1024
        self.peak_mib = max(self.peak_mib, total)
        now = time.monotonic()
        self._t0 = now if self._t0 is None else self._t0
        self.timeline.append((round(now - self._t0, 1), round(total, 1)))
        if self.track:
            for pid in pids:
                if self.track in command_line(pid):
                    rss = memory_kib(pid, "rss") / 1024
                    self.tracked_peak_mib[pid] = max(self.tracked_peak_mib.get(pid, 0.0), rss)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, Any]:
        """Peak PSS of all processes and the tracked processes' peak RSS (MiB)."""
        tracked = sorted(self.tracked_peak_mib.values())
        return {"peak_pss_all_processes_mib": round(self.peak_mib, 1), "tracked": self.track,
                "tracked_processes": len(tracked), "tracked_peak_rss_mib": [round(v, 1) for v in tracked],
                "tracked_peak_rss_max_mib": round(max(tracked), 1) if tracked else None,
                "samples": self.samples, "interval_s": self.interval, "pss_timeline_mib": self.timeline}

    def __enter__(self) -> "ProcessTreeProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
