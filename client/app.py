"""Flower ClientApp: a thin adapter from messages to :mod:`client.task`.

Train message in: ``arrays`` (global exchanged state, wire dtype) and ``config`` (``server-round``,
``proximal-mu`` under FedProx). Reply: ``arrays`` = the delta of the exchanged state only (wire
dtype) and ``metrics`` (:data:`client.task.TRAIN_METRIC_KEYS`). Evaluate reply: ``metrics`` only
(:data:`client.task.EVAL_METRIC_KEYS`). The AdamW state, when ``keep-optimizer-state`` is on,
persists between rounds in ``context.state`` (never in globals, never sent).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import (
    client_seed,
    evaluate_round,
    load_local_data,
    pack_optimizer_state,
    parse_node_config,
    train_round,
    unpack_optimizer_state,
)
from client.wire import record_to_state, state_to_record
from shared_model.config import from_run_config

app = ClientApp()

_OPTIMIZER_KEY = "optimizer"


def _setup(msg: Message, context: Context):
    from shared_model.model import build_model

    settings = from_run_config(dict(context.run_config))
    node = parse_node_config(dict(context.node_config))
    server_round = int(msg.content["config"].get("server-round", 0))
    seed = client_seed(settings.federation.seed, server_round, node.partition_id)
    data = load_local_data(settings, node, seed)
    model = build_model(settings.model)
    global_state = record_to_state(msg.content["arrays"])
    return settings, node, server_round, data, model, global_state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round; replies with the delta and the training metrics."""
    settings, node, server_round, data, model, global_state = _setup(msg, context)
    keep = settings.federation.keep_optimizer_state
    optimizer_state = None
    if keep and _OPTIMIZER_KEY in context.state:
        optimizer_state = unpack_optimizer_state(context.state[_OPTIMIZER_KEY]["state"])
    outcome = train_round(
        model,
        global_state,
        data,
        settings,
        server_round,
        node.partition_id,
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        optimizer_state=optimizer_state,
    )
    if keep and outcome.optimizer_state is not None:
        context.state[_OPTIMIZER_KEY] = ConfigRecord({"state": pack_optimizer_state(outcome.optimizer_state)})
    content = RecordDict(
        {
            "arrays": state_to_record(outcome.delta, settings.federation.wire_dtype),
            "metrics": MetricRecord(outcome.metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global state on the local validation split."""
    settings, node, _, data, model, global_state = _setup(msg, context)
    metrics = evaluate_round(model, global_state, data, settings, node.partition_id)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
