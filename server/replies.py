"""A client reply as the server sees it: its structure, its metric contract, why it was dropped."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

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


@dataclass
class ReplyParts:
    """A reply's records by kind, read once.

    Flower's ``RecordDict.array_records`` / ``metric_records`` / ``config_records`` build a new
    typed dict on every access; a server handling 1,000 replies reads each kind once, here.
    ``arrays`` is cleared once the reply's delta has been folded in, so the arrays can be freed.
    """

    arrays: dict[str, ArrayRecord] = field(default_factory=dict)
    metrics: dict[str, MetricRecord] = field(default_factory=dict)
    configs: dict[str, ConfigRecord] = field(default_factory=dict)

    @classmethod
    def of(cls, msg: Message) -> "ReplyParts":
        """The records of ``msg`` (none for an error reply)."""
        parts = cls()
        if msg.has_error():
            return parts
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                parts.arrays[name] = record
            elif isinstance(record, MetricRecord):
                parts.metrics[name] = record
            elif isinstance(record, ConfigRecord):
                parts.configs[name] = record
        return parts


def describe_message(msg: Message, parts: ReplyParts | None = None) -> dict[str, Any]:
    """Structure of a reply as received: record names, array keys with dtype and shape, metric keys."""
    if msg.has_error():
        return {"error": str(msg.error.reason)}
    parts = parts or ReplyParts.of(msg)
    return {
        "array-records": {
            name: {key: [arr.dtype, list(arr.shape)] for key, arr in rec.items()}
            for name, rec in parts.arrays.items()
        },
        "metric-records": {name: sorted(rec.keys()) for name, rec in parts.metrics.items()},
        "config-records": {name: sorted(rec.keys()) for name, rec in parts.configs.items()},
    }


def single_metrics(records: Mapping[str, MetricRecord], expected: tuple[str, ...]) -> MetricRecord:
    """The reply's one MetricRecord (``records``: its metric records by name), checked against the
    metric contract ``expected``.

    Raises:
        ReplyError: Naming what breaks the contract.
    """
    if len(records) != 1:
        raise ReplyError(f"expected one MetricRecord, got {len(records)}")
    metrics = next(iter(records.values()))
    if set(metrics.keys()) != set(expected):
        raise ReplyError(f"metric keys {sorted(metrics.keys())} != expected {sorted(expected)}")
    for key, value in metrics.items():
        if isinstance(value, list) or isinstance(value, bool):
            raise ReplyError(f"metric {key!r} must be a single number, got {value!r}")
    examples = metrics["num-examples"]
    if not math.isfinite(examples) or examples <= 0:
        raise ReplyError(f"num-examples must be a positive number, got {examples!r}")
    return metrics


def weighted_metrics(records: Sequence[MetricRecord], weight_key: str) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` on validated replies' single MetricRecords.

    The mean of every metric but ``weight_key`` weighted by ``weight_key``, summed in the same
    order with the same arithmetic (so the same floats), without Flower's per-access record views.

    Args:
        records: One MetricRecord of scalar metrics per accepted reply (:func:`single_metrics`).
        weight_key: The weighting metric (``num-examples``), left out of the result.
    """
    weights = [float(r[weight_key]) for r in records]
    total = sum(weights)
    sums: dict[str, Any] = {}
    for record, weight in zip(records, weights):
        factor = weight / total
        for key, value in record.items():
            if key != weight_key:
                sums[key] = value * factor if key not in sums else sums[key] + value * factor
    return MetricRecord(sums)


def order_key(msg: Message, parts: ReplyParts | None = None) -> tuple[float, int]:
    """(partition id, node id) of a reply; malformed replies (dropped later) sort last."""
    try:
        metrics = next(iter((parts or ReplyParts.of(msg)).metrics.values()))
        partition = float(metrics["partition-id"])
    except Exception:  # noqa: BLE001 - an error reply or broken metrics: validation says what
        partition = math.inf
    return (partition if math.isfinite(partition) else math.inf, int(msg.metadata.src_node_id))
