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

Simulation only: ``fault-*`` run-config keys (:mod:`shared_model.config.faults`) make a seeded
fraction of the hospitals sleep past the deadline, raise, or reply with a non-finite delta, so
that the server's drop path runs; a deployed hospital (``data-path``) refuses them.
"""

from __future__ import annotations

import time

_IMPORT_START = time.perf_counter()  # this module's imports are part of every ClientApp process's start-up

import logging  # noqa: E402

from flwr.app import Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client import phases  # noqa: E402
from client.task import client_seed, evaluate_round, load_local_data, parse_node_config  # noqa: E402
from client.update import local_update  # noqa: E402
from client.wire import record_to_state, state_to_record  # noqa: E402
from shared_model.config import ConfigError, RunSettings, from_run_config  # noqa: E402
from shared_model.config.faults import choose_fault  # noqa: E402

app = ClientApp()
IMPORT_SECONDS = time.perf_counter() - _IMPORT_START
log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler

BUDGET_EXHAUSTED = 100  # error code of a reply declining because of the hospital's DP budget
sleep = time.sleep  # the injected "sleep" fault's clock (tests replace it)


class InjectedFault(RuntimeError):
    """The ``error`` fault of a simulated hospital (Flower replies with an error)."""


def injected_fault(settings: RunSettings, context: Context, server_round: int) -> str | None:
    """This hospital's fault in this round (``sleep``, ``error``, ``corrupt``) or None.

    Raises:
        ConfigError: If faults are configured on a deployed hospital (a node with ``data-path``).
    """
    if not settings.faults.enabled:
        return None
    node = parse_node_config(dict(context.node_config))
    if node.data_path:
        raise ConfigError("fault-*: fault injection is for simulations only; a hospital with data-path refuses it")
    return choose_fault(settings.faults, server_round, node.partition_id)


def _setup(msg: Message, context: Context):
    from shared_model.fewshot.federated import build_run_model

    settings = from_run_config(dict(context.run_config))
    node = parse_node_config(dict(context.node_config))
    server_round = int(msg.content["config"].get("server-round", 0))
    seed = client_seed(settings.federation.seed, server_round, node.partition_id)
    data = load_local_data(settings, node, seed)
    model = build_run_model(settings)
    global_state = record_to_state(msg.content["arrays"])
    return settings, node, server_round, data, model, global_state


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training round; replies with the delta and the training metrics (or declines)."""
    from client.secagg import is_secagg_message

    if is_secagg_message(msg):
        from client.secagg import app as secagg_app

        return secagg_app(msg, context)
    age, start = phases.reset(), time.perf_counter()
    reply = _train(msg, context)
    phases.write_profile("train", age, time.perf_counter() - start, **{"app-imports": IMPORT_SECONDS})
    return reply


def _train(msg: Message, context: Context) -> Message:
    from shared_model.training.errors import PrivacyBudgetExceeded  # not .privacy: that imports Opacus

    settings = from_run_config(dict(context.run_config))
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    fault = injected_fault(settings, context, server_round)
    if fault == "error":
        raise InjectedFault(f"injected fault in round {server_round}: the ClientApp raised")
    if fault == "sleep":
        log.warning("injected fault in round %d: sleeping %g s before training", server_round,
                    settings.faults.sleep_seconds)
        sleep(settings.faults.sleep_seconds)
    try:
        outcome = local_update(context, server_round, record_to_state(msg.content["arrays"]),
                               float(config.get("proximal-mu", 0.0)))
    except PrivacyBudgetExceeded as err:
        log.warning("declining round %s: %s", config.get("server-round", "?"), err)
        return Message(Error(code=BUDGET_EXHAUSTED, reason=f"declined: {err}"), reply_to=msg)
    if fault == "corrupt":
        first = next(iter(outcome.delta))
        outcome.delta[first].view(-1)[0] = float("nan")
    with phases.phase("serialisation"):
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
