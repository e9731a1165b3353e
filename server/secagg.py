"""Secure aggregation (Flower SecAgg+) for the training phase of a round.

SecAgg+ exists only on Flower's legacy workflow path (``SecAggPlusWorkflow`` with a legacy
``Strategy`` in a ``LegacyContext``; ``secaggplus_mod`` on a legacy ``ClientApp`` with a
``NumPyClient``). :func:`secagg_train_round` runs that workflow for one round inside the project's
own round loop; the client side is :mod:`client.secagg`, reached through the ordinary ClientApp.

What the server sees per hospital: public keys, encrypted key shares for other hospitals, one
vector of masked integers per tensor (uniform in [0, 2**32)), the (plain) ``num-examples`` and
metrics, and in the last stage key shares. Only the weighted sum survives unmasking:
``sum_i w_i delta_i / sum_i w_i`` with ``w_i = num-examples``, each value clipped to
``+-privacy-secagg-clipping-range`` and stochastically quantised to
``privacy-secagg-quantization-range`` levels. Per-hospital checks (key set, shapes, norm bound)
cannot be done on masked vectors: the server checks the unmasked average instead.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitRes, Parameters, Scalar
from flwr.common.serde import message_to_proto
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from client.task import train_metric_keys
from shared_model.config import RunSettings
from shared_model.exchange import check_state

log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler


def message_bytes(msg: Message) -> int:
    """Serialised size of a message (what Flower's transport carries, headers included)."""
    return len(message_to_proto(msg).SerializeToString())


class CountingGrid:
    """A Grid proxy counting the serialised bytes sent to and received from the nodes."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_down = 0
        self.bytes_up = 0
        self.replies: list[Message] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_down += sum(message_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(message_bytes(r) for r in replies)
        self.replies.extend(replies)
        return replies


class _RoundStrategy(LegacyFedAvg):
    """Legacy FedAvg that sends the round config and keeps each hospital's plain metrics."""

    def __init__(self, settings: RunSettings, server_round: int, proximal_mu: float) -> None:
        fed = settings.federation
        super().__init__(
            fraction_fit=fed.fraction_train, fraction_evaluate=0.0, min_fit_clients=fed.min_nodes,
            min_evaluate_clients=0, min_available_clients=fed.min_nodes, accept_failures=True,
            on_fit_config_fn=lambda rnd: {"server-round": rnd, "proximal-mu": proximal_mu},
        )
        self.records: list[dict[str, Any]] = []
        self.aggregated = False
        self.metric_keys = train_metric_keys(settings)

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        for proxy, res in results:
            row = {"node-id": int(proxy.node_id), "accepted": True, "reason": ""}
            row.update({k: float(v) for k, v in res.metrics.items() if k in self.metric_keys})
            self.records.append(row)
        for failure in failures:
            self.records.append({"node-id": -1, "accepted": False, "reason": str(failure)})
        # Every result carries the same unmasked average: the weighted mean is that average.
        params, _ = super().aggregate_fit(server_round, results, failures)
        self.aggregated = params is not None
        return params, {}


def secagg_train_round(
    grid: Grid,
    settings: RunSettings,
    server_round: int,
    state: "OrderedDict[str, torch.Tensor]",
    proximal_mu: float = 0.0,
) -> tuple["OrderedDict[str, torch.Tensor] | None", dict[str, Any]]:
    """Train one round with SecAgg+; return the averaged delta (or None) and the round's record.

    Args:
        grid: The Grid.
        settings: Run settings (``privacy-secagg-*``, sampling, reply timeout).
        server_round: Round number (1-based).
        state: Global exchanged state (name -> float32 tensor); its order is the wire order.
        proximal_mu: FedProx's mu, sent to the hospitals.

    Returns:
        ``(delta or None, {"records": per-hospital rows, "seconds", "bytes-up", "bytes-down",
        "hospitals"})``; the delta is ``sum_i w_i delta_i / sum_i w_i`` after checks (keys,
        shapes, finite values).
    """
    privacy = settings.privacy
    names = list(state)
    counting = CountingGrid(grid)
    manager = SimpleClientManager()
    node_ids = list(grid.get_node_ids())
    record: dict[str, Any] = {"records": [], "seconds": 0.0, "bytes-up": 0, "bytes-down": 0, "hospitals": 0,
                              "replies": []}
    if len(node_ids) < max(2, settings.federation.min_nodes):  # Flower's manager would wait a day
        log.warning("round %d: SecAgg+ needs min-nodes (and at least 2) hospitals, %d are connected",
                    server_round, len(node_ids))
        return None, record
    for node_id in node_ids:
        manager.register(GridClientProxy(node_id, counting, 0))
    strategy = _RoundStrategy(settings, server_round, proximal_mu)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=settings.federation.num_server_rounds),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    sent = ArrayRecord([state[k].numpy() for k in names])
    context.state.array_records[MAIN_PARAMS_RECORD] = sent
    workflow = SecAggPlusWorkflow(
        num_shares=float(privacy.secagg_shares),
        reconstruction_threshold=float(privacy.secagg_threshold),
        max_weight=privacy.secagg_max_weight,
        clipping_range=privacy.secagg_clipping_range,
        quantization_range=privacy.secagg_quantization_range,
        timeout=settings.federation.reply_timeout,
    )
    start = time.perf_counter()
    workflow(counting, context)
    result = context.state.array_records[MAIN_PARAMS_RECORD]
    record.update({
        "records": strategy.records,
        "seconds": time.perf_counter() - start,
        "bytes-up": counting.bytes_up,
        "bytes-down": counting.bytes_down,
        "hospitals": sum(r["accepted"] for r in strategy.records),
        "replies": counting.replies,
    })
    if not strategy.aggregated:  # the workflow halted (too few hospitals, shares or replies)
        return None, record
    arrays = result.to_numpy_ndarrays()
    delta = OrderedDict((k, torch.from_numpy(np.asarray(a, dtype=np.float32))) for k, a in zip(names, arrays))
    check_state(delta, {k: v.shape for k, v in state.items()})
    return delta, record
