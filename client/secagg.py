"""SecAgg+ on the hospital side: Flower's legacy ClientApp with ``secaggplus_mod``.

SecAgg+ lives on Flower's legacy path only, so the project's ClientApp (:mod:`client.app`)
forwards every train message that carries SecAgg+'s config record to :data:`app` here. The mod
runs the protocol (key agreement, Shamir shares, masking); the wrapped ``NumPyClient`` trains as
the ordinary path does (same data, seeds, local DP and accountant in ``context.state``) and hands
the mod the delta of the exchanged state as a list of float32 arrays, in the model's parameter
order, with ``num-examples`` as its weight. The mod clips every value to
``+-clipping_range``, quantises it, adds the masks and sends only the masked integers; the
metrics travel in plain text beside them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import NDArrays, Scalar
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared_model.config import RunSettings, to_dict

log = logging.getLogger("flwr.promptsam." + __name__)


def is_secagg_message(msg: Message) -> bool:
    """True for the messages of a SecAgg+ round (they carry the protocol's config record)."""
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


class SecAggHospital(NumPyClient):
    """The hospital's training step as a NumPyClient (the shape SecAgg+'s mod expects)."""

    def __init__(self, context: Context) -> None:
        self._context = context

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train one round on the global state ``parameters``; return the delta, weight, metrics."""
        from client.update import local_update
        from shared_model.config import from_run_config

        settings = from_run_config(dict(self._context.run_config))
        names = _exchanged_names(settings)
        if len(parameters) != len(names):
            raise ValueError(f"SecAgg+ round: got {len(parameters)} arrays for {len(names)} exchanged tensors")
        global_state = OrderedDict(
            (n, torch.from_numpy(np.asarray(a, dtype=np.float32))) for n, a in zip(names, parameters)
        )
        outcome = local_update(self._context, int(config["server-round"]), global_state,
                               float(config.get("proximal-mu", 0.0)))
        limit = settings.privacy.secagg_clipping_range
        largest = max(float(v.abs().max()) for v in outcome.delta.values())
        if largest > limit:
            log.warning("SecAgg+: delta values up to %.4g are clipped to +-%.4g before quantisation "
                        "(raise privacy-secagg-clipping-range)", largest, limit)
        return [outcome.delta[n].numpy() for n in names], int(outcome.metrics["num-examples"]), outcome.metrics


def _exchanged_names(settings: RunSettings) -> list[str]:
    """Exchanged tensor names in the model's parameter order (the order of SecAgg+'s arrays)."""
    return list(_names_for(json.dumps(to_dict(settings.model), sort_keys=True),
                           json.dumps(to_dict(settings.adapter), sort_keys=True)))


@lru_cache(maxsize=4)
def _names_for(model_json: str, adapter_json: str = "{}") -> tuple[str, ...]:
    from shared_model.config import AdapterConfig, DataConfig, from_dict, ModelConfig, RunSettings
    from shared_model.config import FederationConfig, PartitionConfig, TrainConfig
    from shared_model.exchange import trainable_names
    from shared_model.fewshot.federated import build_run_model

    settings = RunSettings(FederationConfig(), PartitionConfig(), from_dict(ModelConfig, json.loads(model_json), "model"),
                           TrainConfig(), DataConfig(), adapter=from_dict(AdapterConfig, json.loads(adapter_json), "adapter"))
    return tuple(trainable_names(build_run_model(settings)))


app = ClientApp(client_fn=lambda context: SecAggHospital(context).to_client(), mods=[secaggplus_mod])
