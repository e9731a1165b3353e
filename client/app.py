"""Flower ClientApp: a thin adapter from messages to :mod:`client.task`.

Train message in: ``arrays`` (global exchanged state, wire dtype) and ``config`` (``server-round``,
``proximal-mu`` under FedProx). Reply: ``arrays`` = the delta of the exchanged state only (wire
dtype) and ``metrics`` (:data:`client.task.TRAIN_METRIC_KEYS`). Evaluate reply: ``metrics`` only
(:data:`client.task.EVAL_METRIC_KEYS`). The AdamW state, when ``keep-optimizer-state`` is on,
persists between rounds in ``context.state`` (never in globals, never sent).

Privacy: under local DP (``privacy-local-dp``) the hospital trains with DP-SGD and keeps its
accountant history in ``context.state`` (a ConfigRecord of plain lists), so epsilon accumulates
over every round it takes part in; when the next round would exceed its budget it declines with
an error reply (code :data:`BUDGET_EXHAUSTED`) whose reason says so, every round from then on.
SecAgg+ rounds (``privacy-secagg``) arrive as train messages carrying the protocol's config record
and are handed to Flower's legacy SecAgg+ client (:mod:`client.secagg`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.task import (
    TrainOutcome,
    client_seed,
    evaluate_round,
    hospital_privacy,
    load_local_data,
    pack_optimizer_state,
    parse_node_config,
    read_ledger,
    train_round,
    unpack_optimizer_state,
    write_ledger,
)
from client.wire import record_to_state, state_to_record
from shared_model.config import from_run_config

if TYPE_CHECKING:
    from collections import OrderedDict

    import torch

app = ClientApp()
log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler

_OPTIMIZER_KEY = "optimizer"
_PRIVACY_KEY = "privacy-accountant"
BUDGET_EXHAUSTED = 100  # error code of a reply declining because of the hospital's DP budget


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


def _load_privacy_state(context: Context, ledger: str | None) -> tuple[dict | None, str, list[float]]:
    """(accountant history or None, the decline reason if the budget ran out earlier, else "", and
    the [epsilon, delta] budget it ran out at).

    ``context.state`` first; after a SuperNode restart it is empty, and the ledger file (if the
    node config names one) has the history.
    """
    if _PRIVACY_KEY not in context.state:
        return read_ledger(ledger) if ledger else (None, "", [])
    record = context.state[_PRIVACY_KEY]
    history = {k: record[k] if k == "mechanism" else list(record[k])
               for k in ("mechanism", "noise_multiplier", "sample_rate", "steps")}
    return history, str(record["exhausted"]), list(record["exhausted-budget"])


def _store_privacy_state(context: Context, ledger: str | None, history: dict, exhausted: str = "",
                         budget: list[float] | None = None) -> None:
    budget = budget or []
    context.state[_PRIVACY_KEY] = ConfigRecord({**history, "exhausted": exhausted, "exhausted-budget": budget})
    if ledger:
        write_ledger(ledger, history, exhausted, budget)


def local_update(
    context: Context, server_round: int, global_state: "OrderedDict[str, torch.Tensor]", proximal_mu: float
) -> TrainOutcome:
    """One hospital round: data, model, training (DP-SGD under local DP), state kept in ``context``.

    Used by the ordinary train handler and by the SecAgg+ client.

    Raises:
        PrivacyBudgetExceeded: The round would exceed the hospital's epsilon (now or earlier).
    """
    from shared_model.model import build_model
    from shared_model.privacy import PrivacyBudgetExceeded

    settings = from_run_config(dict(context.run_config))
    node = parse_node_config(dict(context.node_config))
    privacy = hospital_privacy(settings, node)
    history, exhausted, spent_at = _load_privacy_state(context, node.privacy_ledger)
    if privacy.local_dp and node.data_path and not node.privacy_ledger:
        log.warning("local DP without privacy-ledger in the node config: a restarted SuperNode would "
                    "forget the epsilon this hospital has spent")
    if privacy.local_dp and exhausted and spent_at == [privacy.epsilon, privacy.delta]:
        raise PrivacyBudgetExceeded(exhausted)  # spent at this budget already: no need to load data
    seed = client_seed(settings.federation.seed, server_round, node.partition_id)
    data = load_local_data(settings, node, seed)
    model = build_model(settings.model)
    keep = settings.federation.keep_optimizer_state
    optimizer_state = None
    if keep and _OPTIMIZER_KEY in context.state:
        optimizer_state = unpack_optimizer_state(context.state[_OPTIMIZER_KEY]["state"])
    try:
        outcome = train_round(model, global_state, data, settings, server_round, node.partition_id,
                              proximal_mu=proximal_mu, optimizer_state=optimizer_state,
                              privacy=privacy, privacy_state=history)
    except PrivacyBudgetExceeded as err:
        from shared_model.privacy import new_accountant_state

        _store_privacy_state(context, node.privacy_ledger, history or new_accountant_state(privacy.accountant),
                             str(err), [privacy.epsilon, privacy.delta])
        raise
    if keep and outcome.optimizer_state is not None:
        context.state[_OPTIMIZER_KEY] = ConfigRecord({"state": pack_optimizer_state(outcome.optimizer_state)})
    if outcome.privacy_state is not None:
        _store_privacy_state(context, node.privacy_ledger, outcome.privacy_state)
    return outcome


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round; replies with the delta and the training metrics (or declines)."""
    from client.secagg import is_secagg_message
    from shared_model.privacy import PrivacyBudgetExceeded

    if is_secagg_message(msg):
        from client.secagg import app as secagg_app

        return secagg_app(msg, context)
    settings = from_run_config(dict(context.run_config))
    config = msg.content["config"]
    try:
        outcome = local_update(context, int(config.get("server-round", 0)), record_to_state(msg.content["arrays"]),
                               float(config.get("proximal-mu", 0.0)))
    except PrivacyBudgetExceeded as err:
        log.warning("declining round %s: %s", config.get("server-round", "?"), err)
        return Message(Error(code=BUDGET_EXHAUSTED, reason=f"declined: {err}"), reply_to=msg)
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
