"""Send a round's messages and collect the replies that arrive before the deadline.

Flower's ``Grid.send_and_receive(messages, timeout=...)`` returns the replies that came in time
and says nothing about the others. :func:`send_and_collect` keeps the bookkeeping the server
needs to say, per round, which hospital was dropped and why:

* every message gets a time-to-live of the deadline (``reply-timeout``), so a message that a
  node has not picked up by then expires in the SuperLink instead of being run a round late (a
  sleeping hospital does not hold a simulation actor into the next round);
* the replies are pulled every ``poll_interval`` seconds (Flower's deployment grid sleeps 3 s
  between pulls, which a short round pays in full twice: train and evaluate);
* the nodes whose message got no reply before the deadline, and those for which the SuperLink
  answered in the node's place (the message expired, or the node went away), are returned as
  ``unreplied``: node id, drop kind and reason, so the strategy records them as dropped.

Grids without ``push_messages`` / ``pull_messages`` (the in-process grid of
:mod:`simulation.inprocess`) are driven through their ``send_and_receive``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.replies import error_summary

POLL_INTERVAL = 0.2  # seconds between pulls of the replies


@dataclass
class Collected:
    """The replies of one phase of a round and the nodes that did not reply in time.

    Attributes:
        replies: The nodes' own replies received before the deadline, in arrival order.
        sent: Node ids the messages went to, in sending order.
        unreplied: ``(node id, drop kind, reason)`` of every node without a reply of its own:
            ``timeout`` for no reply before the deadline (or a message that expired in the
            SuperLink), ``error`` for a node the SuperLink reports unavailable.
        seconds: Wall time from sending to the last reply (or the deadline).
    """

    replies: list[Message]
    sent: list[int]
    unreplied: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def missing(self) -> list[int]:
        """Node ids of :attr:`unreplied`."""
        return [node for node, _, _ in self.unreplied]


def deadline_reason(timeout: float | None) -> str:
    """The reason recorded for a node without a reply before the deadline."""
    return f"no reply before the deadline ({'no deadline' if timeout is None else f'reply-timeout {timeout:g} s'})"


def _superlink_reply(reply: Message, timeout: float | None) -> tuple[str, str]:
    """Drop kind and reason of an error reply the SuperLink made in a node's place."""
    code = int(reply.error.code) if reply.has_error() else -1
    flower = error_summary(reply.error.reason) if reply.has_error() else "a reply from another node"
    if code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
        return "timeout", f"{deadline_reason(timeout)}; Flower: {flower}"
    return "error", f"node unavailable; Flower: {flower}"


def _with_deadline(messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """The messages, each with a time-to-live no longer than ``timeout`` seconds."""
    out = list(messages)
    if timeout is not None and timeout > 0:
        for msg in out:
            if msg.metadata.ttl > timeout:
                msg.metadata.ttl = float(timeout)
    return out


def send_and_collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    poll_interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Collected:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed.

    Args:
        grid: The run's Flower grid.
        messages: The phase's messages (one per sampled node).
        timeout: The deadline in seconds (None = wait for every reply).
        poll_interval: Seconds between pulls.
        clock, sleep: Replaceable for tests.

    Returns:
        :class:`Collected` with the replies and the nodes that missed the deadline.
    """
    messages = _with_deadline(messages, timeout)
    sent = [int(m.metadata.dst_node_id) for m in messages]
    start = clock()
    if not messages:
        return Collected([], [])
    try:
        ids = list(grid.push_messages(messages))
    except NotImplementedError:
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        answered = {int(r.metadata.src_node_id) for r in replies}
        unreplied = [(n, "timeout", deadline_reason(timeout)) for n in sent if n not in answered]
        return Collected(replies, sent, unreplied, clock() - start)
    node_of = {mid: int(m.metadata.dst_node_id) for mid, m in zip(ids, messages) if mid}
    del messages
    pending = set(node_of)
    replies: list[Message] = []
    deadline = None if timeout is None else start + timeout
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        pending -= {r.metadata.reply_to_message_id for r in pulled}
        if not pending or (deadline is not None and clock() >= deadline):
            break
        sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - clock())))
    own, unreplied = [], [(node_of[mid], "timeout", deadline_reason(timeout)) for mid in pending]
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id)
        if node is None or int(reply.metadata.src_node_id) == node:
            own.append(reply)
        else:  # the SuperLink answered for the node: its message expired or the node is gone
            unreplied.append((node, *_superlink_reply(reply, timeout)))
    return Collected(own, sent, sorted(unreplied), clock() - start)
