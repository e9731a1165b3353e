"""Where a ClientApp call's time goes, for the deployment load test (not sent on the wire).

In deployment each SuperNode starts a fresh ClientApp process per message, so a round pays a
process start and the imports before any training. :func:`phase` times the parts of one call
(imports, data, model, training, validation, serialisation); :func:`write_profile` appends them,
with the process's age when the handler was entered, as one JSON line to the file named by the
environment variable :data:`PROFILE_ENV` (nothing is written without it). ``deploy load`` sets
it on every SuperNode and reads the lines back into its table.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

PROFILE_ENV = "PROMPTSAM_CLIENT_PROFILE"
_phases: dict[str, float] = {}


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def reset() -> float | None:
    """Start a call: forget the previous call's phases; return the process age now."""
    _phases.clear()
    _nested.clear()
    return process_age()


_nested: list[float] = []  # per open phase: seconds of the phases opened inside it


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time to phase ``name`` of the current call, less the time of the
    phases opened inside it (each second counts once: ``imports`` inside ``data`` is imports)."""
    start = time.perf_counter()
    _nested.append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = _nested.pop()
        _phases[name] = _phases.get(name, 0.0) + elapsed - inner
        if _nested:
            _nested[-1] += elapsed


def phases() -> dict[str, float]:
    """The current call's phases (seconds)."""
    return dict(_phases)


def write_profile(kind: str, age_at_entry: float | None, handler_seconds: float, **extra: Any) -> None:
    """Append the call's profile to ``$PROMPTSAM_CLIENT_PROFILE`` (one JSON line), if it is set."""
    target = os.environ.get(PROFILE_ENV)
    if not target:
        return
    record = {"pid": os.getpid(), "kind": kind, "ended-at": time.time(), "age-at-entry": age_at_entry,
              "handler": handler_seconds, **{f"phase-{k}": v for k, v in _phases.items()}, **extra}
    with open(target, "a") as out:
        out.write(json.dumps(record) + "\n")
