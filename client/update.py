"""One hospital's training round with the state it keeps between rounds (Flower's ``Context``).

Used by the ordinary train handler (:mod:`client.app`) and by the SecAgg+ client
(:mod:`client.secagg`). Kept in ``context.state``: the AdamW state when ``keep-optimizer-state``
is on, and the local-DP accountant history (a ConfigRecord of plain lists), mirrored to the
node's ``privacy-ledger`` file when it names one so that a restarted SuperNode remembers what the
hospital has spent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context

from client.phases import phase
from client.task import (
    TrainOutcome,
    client_seed,
    hospital_privacy,
    load_local_data,
    pack_optimizer_state,
    parse_node_config,
    read_ledger,
    train_round,
    unpack_optimizer_state,
    write_ledger,
)
from shared_model.config import from_run_config

if TYPE_CHECKING:
    from collections import OrderedDict

    import torch

log = logging.getLogger("flwr.promptsam." + __name__)  # shown by Flower's console handler

_OPTIMIZER_KEY = "optimizer"
_PRIVACY_KEY = "privacy-accountant"


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
    with phase("imports"):
        from shared_model.fewshot.federated import build_run_model
        from shared_model.training.errors import PrivacyBudgetExceeded  # no Opacus without local DP

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
    with phase("data"):
        data = load_local_data(settings, node, seed)
    with phase("model"):
        model = build_run_model(settings)
    keep = settings.federation.keep_optimizer_state
    optimizer_state = None
    if keep and _OPTIMIZER_KEY in context.state:
        optimizer_state = unpack_optimizer_state(context.state[_OPTIMIZER_KEY]["state"])
    try:
        outcome = train_round(model, global_state, data, settings, server_round, node.partition_id,
                              proximal_mu=proximal_mu, optimizer_state=optimizer_state,
                              privacy=privacy, privacy_state=history)
    except PrivacyBudgetExceeded as err:
        from shared_model.training.privacy import new_accountant_state

        _store_privacy_state(context, node.privacy_ledger, history or new_accountant_state(privacy.accountant),
                             str(err), [privacy.epsilon, privacy.delta])
        raise
    if keep and outcome.optimizer_state is not None:
        context.state[_OPTIMIZER_KEY] = ConfigRecord({"state": pack_optimizer_state(outcome.optimizer_state)})
    if outcome.privacy_state is not None:
        _store_privacy_state(context, node.privacy_ledger, outcome.privacy_state)
    return outcome
