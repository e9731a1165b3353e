"""Server aggregation at scale, for ``promptsam bench round``: time per strategy against one pass, and memory.

* **Time**: :meth:`server.strategy.GuardedStrategy.aggregate_train` (decode, validate, aggregate,
  re-encode) over K train replies built like ``client.app.train`` builds them, per strategy, as
  the median, min and max of ``repeats`` runs, interleaved with the limit's (order rotated per
  repeat, after a warm-up round; a garbage collection before each, none skipped), and the ratio to
  the limit taken within each repeat.
  The replies reuse a pool of distinct random deltas (``pool`` of them, cycled), so K = 1,000
  needs the pool's memory, not K deltas'; the pool is larger than the CPU caches, so every reply
  is read from memory as a fresh one would be.
* **Limit**: one plain ``sum(dim=0)`` over the same K deltas stacked as a K x D float32 matrix in
  this process: one pass over the bytes, the least any aggregation has to read.
* **Memory**: peak resident memory above the baseline (sampled every 2 ms) while aggregating K
  updates, each variant in a fresh process: ``generator`` (replies produced one at a time and
  folded in: what streaming costs), ``list`` (all K replies held, as a Flower Grid returns them,
  each reply's arrays dropped once folded in) and ``hold-all`` (all replies held and Flower's own
  aggregation over full states, ``GuardedStrategy(streaming=False)``: the pre-streaming path),
  the last skipped when its estimate exceeds ``memory_cap_gb``.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.task import TRAIN_METRIC_KEYS
from client.wire import state_to_record
from server.strategy import GuardedStrategy, build_inner_strategy
from shared_model.benchmarks.timing import paired_ratio, spread
from shared_model.config import FederationConfig
from simulation.inprocess import InProcessGrid

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
STREAMING = {"fedavg": True, "fedprox": True, "fedadam": True, "fedmedian": False, "fedtrimmedavg": False}

Shapes = Mapping[str, tuple[int, ...]]


def random_state(shapes: Shapes, scale: float, generator: torch.Generator) -> "OrderedDict[str, torch.Tensor]":
    """Normal(0, scale^2) float32 tensors of the given shapes."""
    return OrderedDict((k, torch.randn(tuple(s), generator=generator) * scale) for k, s in shapes.items())


def train_metrics(partition_id: int, num_examples: int) -> MetricRecord:
    """A train reply's metrics: every :data:`client.task.TRAIN_METRIC_KEYS` key, the others 0.5."""
    values = {key: 0.5 for key in TRAIN_METRIC_KEYS}
    values.update({"num-examples": num_examples, "partition-id": partition_id})
    return MetricRecord(values)


def configured(strategy: str, shapes: Shapes, global_state: Mapping[str, torch.Tensor], k: int,
               wire_dtype: str = "float32", streaming: bool = True) -> tuple[GuardedStrategy, list[Message]]:
    """A GuardedStrategy over Flower's ``strategy`` configured for round 1 on K nodes, and its K train messages."""
    inner = build_inner_strategy(FederationConfig(strategy=strategy, min_nodes=1))
    guard = GuardedStrategy(inner, shapes, wire_dtype, streaming=streaming)
    grid = InProcessGrid(None, {}, k)  # type: ignore[arg-type] - only its node ids are used
    messages = list(guard.configure_train(1, state_to_record(global_state, "float32"), ConfigRecord(), grid))
    if len(messages) != k:
        raise RuntimeError(f"{strategy} sampled {len(messages)} nodes, expected {k}")
    return guard, sorted(messages, key=lambda m: m.metadata.dst_node_id)


def replies(messages: list[Message], records: Iterator[ArrayRecord]) -> Iterator[Message]:
    """One train reply per message, its arrays the next record (partition id i, 10 + i % 7 examples)."""
    for i, (msg, record) in enumerate(zip(messages, records)):
        content = RecordDict({"arrays": record, "metrics": train_metrics(i, 10 + i % 7)})
        yield Message(content=content, reply_to=msg)


def cycle(pool: list[ArrayRecord], k: int) -> Iterator[ArrayRecord]:
    """K records taken round-robin from ``pool``."""
    return (pool[i % len(pool)] for i in range(k))


def time_limit(stacked: torch.Tensor) -> float:
    """Seconds of one ``sum(dim=0)`` over the K x D stacked deltas (after an untimed collection)."""
    gc.collect()
    start = time.perf_counter()
    stacked.sum(dim=0)
    return time.perf_counter() - start


def time_aggregation(strategy: str, shapes: Shapes, global_state: Mapping[str, torch.Tensor],
                     records: Iterator[ArrayRecord], k: int, wire_dtype: str) -> float:
    """Seconds of ``aggregate_train`` over K fresh replies (built and collected untimed).

    Raises:
        RuntimeError: If a reply was dropped (the benchmark's replies are all valid).
    """
    guard, messages = configured(strategy, shapes, global_state, k, wire_dtype)
    batch = list(replies(messages, records))
    gc.collect()
    start = time.perf_counter()
    arrays, _ = guard.aggregate_train(1, batch)
    seconds = time.perf_counter() - start
    if arrays is None or not all(r["accepted"] for r in guard.train_records):
        raise RuntimeError(f"bench: replies were dropped: {guard.train_records[:1]}")
    return seconds


def time_strategies(shapes: Shapes, updates: tuple[int, ...], strategies: tuple[str, ...] = STRATEGIES,
                    wire_dtype: str = "float32", repeats: int = 3, pool: int = 100, seed: int = 0,
                    warmup: int = 1) -> dict[str, Any]:
    """Seconds of validate + aggregate per strategy and K, next to the one-pass limit.

    For each K, every repeat times the limit and each strategy once, in an order rotated by one
    per repeat (limit, A, B; A, B, limit; ...) after ``warmup`` untimed rounds done the same way,
    so a change of load or cache state hits every row; the replies are built before each timing
    and a garbage collection runs, both untimed.

    Returns:
        ``{str(K): {"limit": spread, "strategies": {name: spread | {"ratio_to_limit": paired
        spread, "streaming": bool}}}}``: ``ratio_to_limit`` is the spread of the per-repeat ratio
        strategy / limit (:func:`paired_ratio`).
    """
    gen = torch.Generator().manual_seed(seed)
    global_state = random_state(shapes, 0.02, gen)
    deltas = [random_state(shapes, 1e-3, gen) for _ in range(min(pool, max(updates)))]
    records = [state_to_record(d, wire_dtype) for d in deltas]
    flat = torch.stack([torch.cat([v.reshape(-1) for v in d.values()]) for d in deltas])
    del deltas
    out: dict[str, Any] = {}
    for k in updates:
        stacked = flat.repeat((k + len(flat) - 1) // len(flat), 1)[:k]  # the K deltas as one K x D matrix
        names = ["limit", *strategies]
        seconds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                value = (time_limit(stacked) if name == "limit" else
                         time_aggregation(name, shapes, global_state, cycle(records, k), k, wire_dtype))
                if r >= warmup:
                    seconds[name].append(value)
        del stacked
        row: dict[str, Any] = {"limit": spread(seconds["limit"]), "strategies": {}}
        for name in strategies:
            timing = spread(seconds[name])
            timing["ratio_to_limit"] = paired_ratio(seconds[name], seconds["limit"])
            timing["streaming"] = STREAMING[name]
            row["strategies"][name] = timing
        out[str(k)] = row
    return out


# -- memory -------------------------------------------------------------------------------------


def _rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak resident memory above the level at entry, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        gc.collect()
        self.base = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def _memory_child(strategy: str, shapes: dict[str, tuple[int, ...]], k: int, variant: str, seed: int
                  ) -> dict[str, Any]:
    """In a fresh process: peak RSS above baseline of aggregating K fresh random updates (``variant``)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    global_state = random_state(shapes, 0.02, gen)
    guard, messages = configured(strategy, shapes, global_state, k, streaming=variant != "hold-all")
    fresh = (state_to_record(random_state(shapes, 1e-3, gen), "float32") for _ in range(k))
    with PeakRss() as peak:
        start = time.perf_counter()
        batch = replies(messages, fresh) if variant == "generator" else list(replies(messages, fresh))
        arrays, _ = guard.aggregate_train(1, batch)
        seconds = time.perf_counter() - start
    if arrays is None:
        raise RuntimeError("bench: memory run aggregated nothing")
    return {"strategy": strategy, "variant": variant, "updates": k, "peak_rss_above_base_bytes": peak.above_base,
            "seconds_including_reply_generation": seconds}


def memory_footprint(shapes: Shapes, k: int, cap_gb: float, seed: int = 0) -> list[dict[str, Any]]:
    """Peak memory of aggregating K updates: FedAvg streamed from a generator, from a held list,
    and held all (Flower's aggregation); FedMedian (which keeps every delta) from a generator.

    Each runs in a fresh process (``spawn``) so that one run's freed memory does not hide the next
    one's. ``hold-all`` is skipped, with a note, when its estimate (3 x K x the float32 state:
    the replies, their full states and Flower's decoded copies) exceeds ``cap_gb``.
    """
    numel = sum(int(np.prod(s)) for s in shapes.values())
    update_bytes = 4 * numel
    plain = {k_: tuple(int(d) for d in v) for k_, v in shapes.items()}
    runs = [("fedavg", "generator"), ("fedavg", "list"), ("fedavg", "hold-all"), ("fedmedian", "generator")]
    out = []
    context = multiprocessing.get_context("spawn")
    for strategy, variant in runs:
        estimate = 3 * k * update_bytes if variant == "hold-all" else 0
        if estimate > cap_gb * 2**30:
            out.append({"strategy": strategy, "variant": variant, "updates": k, "skipped":
                        f"estimated {estimate / 2**30:.1f} GiB > --memory-cap-gb {cap_gb}"})
            continue
        with context.Pool(1) as pool:
            row = pool.apply(_memory_child, (strategy, plain, k, variant, seed))
        row["update_bytes"] = update_bytes
        row["peak_in_updates"] = row["peak_rss_above_base_bytes"] / update_bytes
        out.append(row)
    return out
