"""Flower strategies over deltas of the exchanged state, with every reply validated first.

Clients reply with ``delta = local - received``. :class:`GuardedStrategy` wraps one of Flower's
message strategies (``flwr.serverapp.strategy``) and

1. sends the global state in the wire dtype (``configure_train`` / ``configure_evaluate``);
2. validates each train reply: one ArrayRecord and one MetricRecord, the client metric contract
   (:data:`client.task.TRAIN_METRIC_KEYS`), decodable wire arrays, then the exact key set, shapes,
   finite values and optional L2 bound on the delta (``shared_model.exchange.check_flat`` on the
   delta decoded into one flat vector, or ``check_state`` for a reply not in the canonical wire
   layout). A bad reply is dropped and logged with its node id, the reason and its kind
   (:data:`server.replies.DROP_KINDS`: an error reply, a declined round, a failed validation; the
   server adds the nodes without a reply of their own with :meth:`record_unreplied`); the
   round is aggregated when at least ``min-nodes`` replies are valid, else the global state is
   kept and the run goes on;
3. aggregates the deltas in partition-id order, so the aggregate does not depend on arrival order:
   for Flower's FedAvg / FedProx (weighted by ``num-examples``), FedAdam, FedMedian and
   FedTrimmedAvg with the same arithmetic on flat vectors, each reply folded in as it is validated
   (:mod:`server.aggregate`); any other inner strategy (the central-DP wrappers) gets full float32
   states ``global + delta`` and aggregates them with Flower's code;
4. applies the server learning rate: ``global += server_lr * (aggregate - global)`` for the
   averaging strategies. For FedAdam the server step size is Flower's ``eta`` (``adam-eta``).
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from client.task import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS
from client.wire import record_into, record_nbytes, record_to_state, state_to_record
from server.aggregate import SortedStack, WeightedMean, adam_step
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from server.replies import (DROP_KINDS, ReplyError, ReplyParts, describe_message, drop_kind,  # noqa: F401
                            error_summary, order_key, single_metrics, weighted_metrics)
from shared_model.config import FederationConfig
from shared_model.exchange import ExchangeError, FlatLayout, check_flat, check_state, state_norm

log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler


def build_inner_strategy(fed: FederationConfig) -> FedAvg:
    """Flower's strategy named by ``fed.strategy`` with the sampling and algorithm settings."""
    common = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_nodes,
        min_evaluate_nodes=fed.min_nodes if fed.fraction_evaluate > 0 else 0,
        min_available_nodes=fed.min_nodes,
    )
    if fed.strategy == "fedavg":
        return FedAvg(**common)
    if fed.strategy == "fedprox":
        return FedProx(**common, proximal_mu=fed.proximal_mu)
    if fed.strategy == "fedmedian":
        return FedMedian(**common)
    if fed.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=fed.trimmed_beta)
    if fed.strategy == "fedadam":
        return FedAdam(**common, eta=fed.adam_eta, beta_1=fed.adam_beta_1, beta_2=fed.adam_beta_2,
                       tau=fed.adam_tau)
    raise ValueError(f"strategy: unknown strategy {fed.strategy!r}")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's automatic garbage collections for the block.

    Folding in K replies allocates small containers (audit rows, records) that trigger automatic
    collections escalating to full ones, each scanning every object of the K replies held: half
    the aggregation time at K = 1,000. The caller collects the young generation after each reply
    instead (cheap: only what that reply allocated): Flower's record views
    (``content.array_records``) form reference cycles that keep the reply's ArrayRecord alive
    until collected, so this is what frees a streamed reply's arrays.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class GuardedStrategy(Strategy):
    """Validation, wire encoding, delta handling and server learning rate around a Flower strategy.

    Args:
        inner: A Flower message strategy (FedAvg family or FedAdam).
        shapes: Exchanged tensor name -> shape (``shared_model.exchange.state_shapes``).
        wire_dtype: dtype of the global state sent to clients.
        max_update_norm: Bound on the L2 norm of a client's delta (0 = none).
        server_lr: Step on the aggregated delta (ignored for FedAdam, which uses its ``eta``).
        train_metric_keys: The train replies' metric keys (``client.task.train_metric_keys``:
            with ``epsilon`` under local DP).
        streaming: Aggregate flat deltas as replies are validated (:mod:`server.aggregate`) where
            the inner strategy is one of Flower's FedAvg, FedProx, FedAdam, FedMedian,
            FedTrimmedAvg; False hands every strategy full states (Flower's own aggregation,
            all replies held), the reference the streaming path is tested against.

    Attributes:
        train_records / eval_records: Per-reply dicts of the last round (node id, partition id,
            accepted, reason, metrics, bytes), for the metrics log.
        audit: Per-reply structure (:func:`describe_message`) of the last round, for the audit log.
        bytes_down: Bytes of the global state as sent to one client in the last round.
    """

    def __init__(
        self,
        inner: FedAvg,
        shapes: Mapping[str, torch.Size | tuple[int, ...]],
        wire_dtype: str = "float32",
        max_update_norm: float = 0.0,
        server_lr: float = 1.0,
        train_metric_keys: tuple[str, ...] = TRAIN_METRIC_KEYS,
        streaming: bool = True,
    ) -> None:
        self.inner = inner
        self.train_metric_keys = tuple(train_metric_keys)
        self.shapes = OrderedDict((k, tuple(v)) for k, v in shapes.items())
        self.layout = FlatLayout(self.shapes)
        self.streaming = streaming
        self.wire_dtype = wire_dtype
        self.max_update_norm = max_update_norm if max_update_norm > 0 else None
        self.server_lr = server_lr
        self.global_state: OrderedDict[str, torch.Tensor] | None = None
        self.global_flat = torch.empty(0)
        self.train_records: list[dict[str, Any]] = []
        self.eval_records: list[dict[str, Any]] = []
        self.audit: list[dict[str, Any]] = []
        self.bytes_down = 0
        self.round_status = ""
        self.node_partitions: dict[int, float] = {}  # node id -> partition id, from its valid replies

    # -- sending -----------------------------------------------------------------------------

    def _to_wire(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        wire = state_to_record(record_to_state(arrays), self.wire_dtype)
        self.bytes_down = record_nbytes(wire)
        out = []
        for msg in messages:
            content = msg.content
            config = content.config_records.get(self.inner.configrecord_key, ConfigRecord())
            msg.content = RecordDict({self.inner.arrayrecord_key: wire, self.inner.configrecord_key: config})
            out.append(msg)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes through the inner strategy; send the global state in the wire dtype."""
        self.global_state = record_to_state(arrays)
        self.global_flat = self.layout.flatten(self.global_state)
        self.audit = []
        return self._to_wire(self.inner.configure_train(server_round, arrays, config, grid), arrays)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes through the inner strategy; send the global state in the wire dtype."""
        return self._to_wire(self.inner.configure_evaluate(server_round, arrays, config, grid), arrays)

    # -- receiving ---------------------------------------------------------------------------

    def _aggregator(self) -> WeightedMean | SortedStack | None:
        """The flat aggregator for the inner strategy, or None: hand full states to Flower's."""
        kind = type(self.inner)
        if not self.streaming:
            return None
        if kind in (FedAvg, FedProx, FedAdam):
            return WeightedMean(self.layout.numel)
        if kind is FedMedian:
            return SortedStack()
        if kind is FedTrimmedAvg:
            return SortedStack(self.inner.beta)
        return None  # central DP wrappers and other strategies: Flower aggregates the full states

    def validate_train_reply(self, msg: Message, out: torch.Tensor, parts: ReplyParts | None = None
                             ) -> tuple[MetricRecord, int, float]:
        """Decode and check one train reply, writing its delta into ``out`` (D float32, layout order).

        A reply in the canonical wire layout (``client.wire.record_into``) is checked in one pass
        over its values (``check_flat``); any other reply goes through the per-tensor decoding and
        ``check_state``, which name what is wrong. Same checks, same messages.

        Args:
            msg: The reply.
            out: D float32, overwritten with the delta.
            parts: The reply's records (:meth:`ReplyParts.of`), if already read.

        Returns:
            ``(metrics, payload bytes, update norm)``.

        Raises:
            ReplyError / ExchangeError: Naming what is wrong.
        """
        if msg.has_error():
            raise ReplyError(f"client error: {error_summary(msg.error.reason)}")
        parts = parts or ReplyParts.of(msg)
        if len(parts.arrays) != 1:
            raise ReplyError(f"expected one ArrayRecord, got {len(parts.arrays)}")
        metrics = single_metrics(parts.metrics, self.train_metric_keys)
        record = next(iter(parts.arrays.values()))
        if record_into(record, self.layout, out):
            norm = check_flat(out, self.layout, self.max_update_norm)
        else:
            delta = record_to_state(record)
            check_state(delta, self.shapes, self.max_update_norm)
            self.layout.flatten(delta, out)
            norm = state_norm(delta)
        return metrics, record_nbytes(record), norm

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies and aggregate their deltas; apply the server learning rate.

        FedAvg, FedProx, FedAdam, FedMedian and FedTrimmedAvg aggregate flat deltas
        (:mod:`server.aggregate`): each reply is decoded into one reused vector, checked, folded
        in, and its arrays dropped. A list of replies is folded in partition-id order (the result
        does not depend on arrival order); a one-pass iterator is folded as it arrives, so only
        one reply's arrays are held at a time. Other inner strategies (the central-DP wrappers)
        get ``global + delta`` messages and aggregate them with Flower's code.
        """
        if self.global_state is None:
            raise RuntimeError("aggregate_train called before configure_train")
        with _collector_paused():
            return self._aggregate_train(server_round, replies)

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregator = self._aggregator()
        buffer = torch.empty(self.layout.numel, dtype=torch.float32)
        read = ((position, msg, ReplyParts.of(msg)) for position, msg in enumerate(replies))
        ordered = sorted(read, key=lambda item: order_key(item[1], item[2])) \
            if isinstance(replies, Sequence) else read
        rows: dict[int, dict[str, Any]] = {}
        audit: dict[int, dict[str, Any]] = {}
        accepted: list[tuple[tuple[float, int], Message, MetricRecord]] = []
        for position, msg, parts in ordered:
            audit[position], rows[position] = self._fold_in(server_round, msg, parts, buffer, aggregator, accepted)
            gc.collect(0)  # the young generation only: frees the reply's arrays (see _collector_paused)
        self.audit += [audit[i] for i in sorted(audit)]
        self.train_records = [rows[i] for i in sorted(rows)]
        self.round_status = "aggregated"
        if not accepted:
            log.warning("round %d: no valid reply; the global state is unchanged", server_round)
            self.round_status = "skipped: no valid reply"
            return None, None
        # A node that died mid-round answers with an error (or not at all): below min-nodes the round fails.
        min_replies = int(getattr(self.inner, "min_train_nodes", 1))
        if len(accepted) < min_replies:
            log.warning("round %d failed: %d valid train repl%s, fewer than min-nodes=%d; the global state is "
                        "unchanged and the next round goes on", server_round, len(accepted),
                        "y" if len(accepted) == 1 else "ies", min_replies)
            self.round_status = f"skipped: {len(accepted)} valid replies < min-nodes {min_replies}"
            return None, None
        accepted.sort(key=lambda item: item[0])
        if aggregator is None:
            return self._flower_aggregate(server_round, [m for _, m, _ in accepted])
        if self.inner.train_metrics_aggr_fn is aggregate_metricrecords:
            metrics = weighted_metrics([r for _, _, r in accepted], self.inner.weighted_by_key)
        else:
            metrics = self.inner.train_metrics_aggr_fn([m.content for _, m, _ in accepted],
                                                       self.inner.weighted_by_key)
        delta = aggregator.result()
        if isinstance(self.inner, FedAdam):
            new_flat = adam_step(self.inner, self.layout, server_round, self.global_flat, delta)
        else:
            new_flat = self.global_flat + self.server_lr * delta
        return state_to_record(self.layout.unflatten(new_flat), "float32"), metrics

    def _fold_in(self, server_round: int, msg: Message, parts: ReplyParts, buffer: torch.Tensor,
                 aggregator: WeightedMean | SortedStack | None,
                 accepted: list[tuple[tuple[float, int], Message, MetricRecord]]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validate one reply into ``buffer`` and fold it into ``aggregator`` (or, without one, turn
        it into a full-state message for Flower), appending it to ``accepted``.

        Returns:
            The reply's audit entry and its train-record row.
        """
        node = int(msg.metadata.src_node_id)
        audit = {"round": server_round, "phase": "train", "node-id": node, **describe_message(msg, parts)}
        row: dict[str, Any] = {"node-id": node, "accepted": False, "reason": "", "bytes-down": self.bytes_down}
        try:
            metrics, nbytes, norm = self.validate_train_reply(msg, buffer, parts)
        except (ReplyError, ExchangeError) as err:
            log.warning("round %d: dropped reply from node %d: %s", server_round, node, err)
            row.update(reason=str(err), drop=drop_kind(msg))
            if node in self.node_partitions:
                row["partition-id"] = self.node_partitions[node]
            return audit, row
        self.node_partitions[node] = float(metrics["partition-id"])
        row.update(accepted=True, **{k: float(v) for k, v in metrics.items()},
                   **{"bytes-up": nbytes, "update-norm": norm})
        if aggregator is not None:
            aggregator.add(buffer, float(metrics[self.inner.weighted_by_key]))
            for name in parts.arrays:  # folded in: drop the arrays
                del msg.content[name]
            parts.arrays.clear()
        else:
            full = self.layout.unflatten(self.global_flat + buffer)
            msg.content = RecordDict({
                self.inner.arrayrecord_key: ArrayRecord({k: Array(v.numpy()) for k, v in full.items()}),
                "metrics": metrics,
            })
        accepted.append(((float(metrics["partition-id"]), node), msg, metrics))
        return audit, row

    def record_unreplied(self, server_round: int, unreplied: Iterable[tuple[int, str, str]],
                         phase: str = "train") -> None:
        """Add a dropped row for every node without a reply of its own to its ``phase`` message
        (to :attr:`train_records` or :attr:`eval_records`).

        Args:
            server_round: The round.
            unreplied: ``(node id, drop kind, reason)`` (:attr:`server.collect.Collected.unreplied`).
            phase: ``train`` or ``evaluate``.
        """
        records = self.train_records if phase == "train" else self.eval_records
        for node, kind, reason in unreplied:
            log.warning("round %d: dropped node %d (%s): %s", server_round, node, phase, reason)
            row: dict[str, Any] = {"node-id": int(node), "accepted": False, "drop": kind, "reason": reason}
            if phase == "train":
                row["bytes-down"] = self.bytes_down
            if node in self.node_partitions:
                row["partition-id"] = self.node_partitions[node]
            records.append(row)

    def _flower_aggregate(self, server_round: int, replies: list[Message]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate full-state replies with the inner (Flower) strategy; apply the server lr."""
        agg_arrays, agg_metrics = self.inner.aggregate_train(server_round, replies)
        if agg_arrays is None:
            return None, agg_metrics
        # Flower's aggregators may promote to float64 (FedAdam, trimmed mean): back to float32.
        aggregate = OrderedDict(
            (k, torch.from_numpy(np.asarray(a.numpy(), dtype=np.float32))) for k, a in agg_arrays.items()
        )
        if isinstance(self.inner, FedOpt) or self.server_lr == 1.0:
            new_state = aggregate
        else:
            new_state = OrderedDict(
                (k, g + self.server_lr * (aggregate[k] - g)) for k, g in self.global_state.items()
            )
        return state_to_record(new_state, "float32"), agg_metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop malformed evaluation replies, then aggregate with the inner strategy."""
        self.eval_records = []
        accepted: list[tuple[tuple[float, int], Message]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            parts = ReplyParts.of(msg)
            self.audit.append({"round": server_round, "phase": "evaluate", "node-id": node,
                               **describe_message(msg, parts)})
            try:
                if msg.has_error():
                    raise ReplyError(f"client error: {error_summary(msg.error.reason)}")
                if parts.arrays:
                    raise ReplyError("evaluation replies must not carry arrays")
                metrics = single_metrics(parts.metrics, EVAL_METRIC_KEYS)
            except ReplyError as err:
                log.warning("round %d: dropped evaluation reply from node %d: %s", server_round, node, err)
                self.eval_records.append({"node-id": node, "accepted": False, "reason": str(err),
                                          "drop": drop_kind(msg)})
                continue
            self.eval_records.append({"node-id": node, "accepted": True, "reason": "",
                                      **{k: float(v) for k, v in metrics.items()}})
            accepted.append(((float(metrics["partition-id"]), node), msg))
        if not accepted:
            return None
        accepted.sort(key=lambda item: item[0])
        return self.inner.aggregate_evaluate(server_round, [m for _, m in accepted])

    def summary(self) -> None:
        """Log the inner strategy's summary and the guard's settings."""
        self.inner.summary()
        log.info("GuardedStrategy: wire dtype %s, max update norm %s, server lr %s",
                 self.wire_dtype, self.max_update_norm, self.server_lr)

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Server-optimiser state of the inner strategy (FedAdam's moments) as CPU tensors, and the
        central-DP accountant's history under ``"privacy"`` (see :mod:`server.privacy`)."""
        state: dict[str, Any] = {}
        if hasattr(self.inner, "privacy_state_dict"):
            state["privacy"] = self.inner.privacy_state_dict()
        if not isinstance(self.inner, FedOpt):
            return state
        return state | {
            name: None if getattr(self.inner, name) is None
            else {k: torch.from_numpy(np.array(v)) for k, v in getattr(self.inner, name).items()}
            for name in ("m_t", "v_t")
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: If the state does not belong to this strategy.
        """
        state = dict(state)
        privacy = state.pop("privacy", None)
        if (privacy is not None) != hasattr(self.inner, "load_privacy_state_dict"):
            raise ValueError("checkpoint and run disagree on central DP: resume with the same privacy-central-dp")
        if privacy is not None:
            self.inner.load_privacy_state_dict(privacy)
        if not isinstance(self.inner, FedOpt):
            if state:
                raise ValueError(f"checkpoint holds server-optimiser state {sorted(state)} but the "
                                 f"strategy {type(self.inner).__name__} has none")
            return
        for name in ("m_t", "v_t"):
            if name not in state:
                raise ValueError(f"checkpoint lacks the {type(self.inner).__name__} state {name!r}")
            value = state[name]
            setattr(self.inner, name, None if value is None else {k: v.numpy() for k, v in value.items()})
