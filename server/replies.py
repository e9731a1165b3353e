"""A client reply as the server sees it: its structure, its metric contract, why it was dropped."""

from __future__ import annotations

import math
import re
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict

# Why a sampled node's reply was not used: no reply before the deadline, an error reply (the
# ClientApp raised, the node went away), a declined round (its local-DP budget is spent), or a
# reply that failed validation (message contract, keys, shapes, finite values, norm bound).
DROP_KINDS = ("timeout", "error", "declined", "invalid")
DECLINED_CODE = 100  # client.app.BUDGET_EXHAUSTED: the error code of a declined round


def drop_kind(msg: Message) -> str:
    """The :data:`DROP_KINDS` entry of a reply that was dropped (it has an error or failed validation)."""
    if msg.has_error():
        return "declined" if int(msg.error.code) == DECLINED_CODE else "error"
    return "invalid"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(reason: str, limit: int = 300) -> str:
    """One line of a client's error reason: Flower's simulation wraps the ClientApp's exception in a
    Ray traceback whose last line says what was raised (the full text stays in ``messages.jsonl``)."""
    lines = [line.strip() for line in _ANSI.sub("", str(reason)).splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1].rstrip("'>\"")
    if "Message: " in line:
        line = line.split("Message: ", 1)[1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


class ReplyError(ValueError):
    """A client reply breaks the message contract."""


def describe_message(msg: Message) -> dict[str, Any]:
    """Structure of a reply as received: record names, array keys with dtype and shape, metric keys."""
    if msg.has_error():
        return {"error": str(msg.error.reason)}
    content = msg.content
    return {
        "array-records": {
            name: {key: [arr.dtype, list(arr.shape)] for key, arr in rec.items()}
            for name, rec in content.array_records.items()
        },
        "metric-records": {name: sorted(rec.keys()) for name, rec in content.metric_records.items()},
        "config-records": {name: sorted(rec.keys()) for name, rec in content.config_records.items()},
    }


def single_metrics(content: RecordDict, expected: tuple[str, ...]) -> MetricRecord:
    """The reply's one MetricRecord, checked against the metric contract ``expected``.

    Raises:
        ReplyError: Naming what breaks the contract.
    """
    if len(content.metric_records) != 1:
        raise ReplyError(f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    if set(metrics.keys()) != set(expected):
        raise ReplyError(f"metric keys {sorted(metrics.keys())} != expected {sorted(expected)}")
    for key, value in metrics.items():
        if isinstance(value, list) or isinstance(value, bool):
            raise ReplyError(f"metric {key!r} must be a single number, got {value!r}")
    examples = metrics["num-examples"]
    if not math.isfinite(examples) or examples <= 0:
        raise ReplyError(f"num-examples must be a positive number, got {examples!r}")
    return metrics


def order_key(msg: Message) -> tuple[float, int]:
    """(partition id, node id) of a reply; malformed replies (dropped later) sort last."""
    try:
        metrics = next(iter(msg.content.metric_records.values()))
        partition = float(metrics["partition-id"])
    except Exception:  # noqa: BLE001 - an error reply or broken metrics: validation says what
        partition = math.inf
    return (partition if math.isfinite(partition) else math.inf, int(msg.metadata.src_node_id))
