"""Fixtures of the server tests."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def fixed_task_identity(monkeypatch):
    """Let tests build Flower Messages outside a running ServerApp (run, task and node id 1)."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
