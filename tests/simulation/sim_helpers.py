"""Helpers for the tests that run Flower: find and stop the processes a run left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def processes_mentioning(text: str) -> dict[int, str]:
    """``{pid: command line}`` of the processes (other than pytest) whose command line contains ``text``."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmd and "pytest" not in cmd:
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
