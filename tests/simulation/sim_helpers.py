"""Helpers for the tests that run Flower: find and stop the processes a run left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _ancestors() -> set[int]:
    """This process and its parents (pytest and whatever started it)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def processes_mentioning(text: str) -> dict[int, str]:
    """``{pid: command line}`` of the processes, other than this test process and its parents, whose
    command line contains ``text`` (pytest's temporary folders contain "pytest", so no name filter)."""
    found, mine = {}, _ancestors()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in mine:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd:
            found[int(pid)] = cmd
    return found


def stop_processes_mentioning(text: str, grace: float = 15.0) -> None:
    """SIGTERM the processes mentioning ``text`` (their whole group where they lead one), then
    SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_mentioning(text):
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_mentioning(text) and time.monotonic() < deadline:
            time.sleep(0.2)
