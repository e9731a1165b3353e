"""Test doubles shared by the strategy tests (imported as ``server_helpers``; pytest puts this folder on sys.path)."""

from __future__ import annotations

from typing import Iterable


class FakeGrid:
    """The one Grid method a strategy's ``configure_*`` calls: the ids of the connected nodes."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)
