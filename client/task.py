"""What a hospital's client does each round, as plain functions (no Flower imports).

``client/app.py`` adapts these to Flower messages. The data comes either from the node's own
folder (deployment: ``data-path`` in the node config) or from a partition of a pooled folder
(simulation: ``partition-id`` / ``num-partitions``). Training uses the single-site
``shared_model.training.loop.train_model``; the reply is the delta of the exchanged state.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from client.phases import phase
from shared_model.config import ConfigError, PrivacyConfig, RunSettings, check_privacy
from shared_model.exchange import get_exchanged_state, set_exchanged_state, state_delta

# The metric keys of every reply: the server drops replies with any other key set.
TRAIN_METRIC_KEYS = ("num-examples", "partition-id", "train-loss", "train-steps", "train-seconds", "val-dice")
EVAL_METRIC_KEYS = ("num-examples", "partition-id", "dice", "iou", "hd95", "precision", "recall")
# Added to the train metrics under local DP: the hospital's cumulative epsilon at its delta.
LOCAL_DP_METRIC_KEYS = ("epsilon",)


def train_metric_keys(settings: RunSettings) -> tuple[str, ...]:
    """The train-reply metric keys of a run (with ``epsilon`` under local DP)."""
    return TRAIN_METRIC_KEYS + (LOCAL_DP_METRIC_KEYS if settings.privacy.local_dp else ())


@dataclass
class NodeSettings:
    """A node's own settings (``context.node_config``), typed.

    Deployment: ``data-path`` is either one hospital's folder (``images/`` and ``masks/``) or a
    root of centre folders; ``val-fraction`` / ``test-fraction`` / ``split-seed`` override the
    run's split; ``partition-id`` (optional) labels the site in the server's metrics;
    ``privacy-epsilon`` / ``privacy-delta`` set this hospital's own local-DP budget and
    ``privacy-ledger`` a JSON file keeping its accountant history across SuperNode restarts (and
    runs: every run on the same data spends from the same budget); ``data-cache`` the folder of
    the validated-data cache (:mod:`shared_model.data.disk_cache`; default
    ``~/.cache/promptsam/data``, ``off`` to validate every pair every round).
    Simulation: Flower sets ``partition-id`` and ``num-partitions``.
    """

    data_path: str | None = None
    partition_id: int = -1
    num_partitions: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    privacy_epsilon: float | None = None
    privacy_delta: float | None = None
    privacy_ledger: str | None = None
    data_cache: str | None = None


_NODE_KEYS: dict[str, type] = {
    "data-path": str,
    "partition-id": int,
    "num-partitions": int,
    "val-fraction": float,
    "test-fraction": float,
    "split-seed": int,
    "privacy-epsilon": float,
    "privacy-delta": float,
    "privacy-ledger": str,
    "data-cache": str,
}


def parse_node_config(node_config: Mapping[str, Any]) -> NodeSettings:
    """Parse a node config strictly.

    Raises:
        ConfigError: On an unknown key or a value of the wrong type, naming the key.
    """
    unknown = sorted(set(node_config) - set(_NODE_KEYS))
    if unknown:
        raise ConfigError(f"node config: unknown key(s) {unknown}; valid keys are {sorted(_NODE_KEYS)}")
    values: dict[str, Any] = {}
    for key, value in node_config.items():
        tp = _NODE_KEYS[key]
        ok = isinstance(value, tp) and not isinstance(value, bool)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"node config {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        values[key.replace("-", "_")] = value
    return NodeSettings(**values)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Seed of one client's training in one round: a hash of ``(seed, round, partition)``."""
    words = np.random.SeedSequence([seed, server_round, partition_id + 1]).generate_state(1)
    return int(words[0] & 0x7FFFFFFF)


@dataclass
class LocalData:
    """A hospital's training and validation sets."""

    name: str
    train: Dataset
    val: Dataset | None


def _local_samples(settings: RunSettings, node: NodeSettings) -> tuple[str, dict[str, list]]:
    from shared_model.data.folder import is_centre_folder, list_samples
    from shared_model.data.sources import config_task
    from shared_model.data.splits import split_samples

    data = settings.data
    if node.data_path:
        path = Path(node.data_path)
        # The run's centre list names the pooled data's centres, not this hospital's own folder.
        centres = None if is_centre_folder(path) else data.centres or None
        samples, _ = list_samples(path, centres, data.on_error, config_task(data))
        val = data.val_fraction if node.val_fraction is None else node.val_fraction
        test = data.test_fraction if node.test_fraction is None else node.test_fraction
        seed = data.split_seed if node.split_seed is None else node.split_seed
        return path.name, split_samples(samples, val, test, seed)
    if node.partition_id < 0 or node.num_partitions < 1:
        raise ConfigError("node config: set data-path (deployment) or partition-id and num-partitions "
                          "(simulation)")
    hospitals = settings.partition.hospitals
    if hospitals and hospitals != node.num_partitions:
        raise ConfigError(f"partition-hospitals is {hospitals} but the simulation runs "
                          f"{node.num_partitions} nodes (num-partitions)")
    from shared_model.data.partition import hospital_splits

    site = hospital_splits(data, settings.partition, node.num_partitions)[node.partition_id]
    return site.name, {"train": site.train, "val": site.val, "test": site.test}


def data_cache_dir(node: NodeSettings) -> Path | None:
    """The validated-data cache of a deployed hospital (``data-cache``, default
    :func:`~shared_model.data.disk_cache.default_cache_dir`), or None: off (``data-cache = "off"``,
    and in simulation, where the actors keep their processes and the partitions are small)."""
    from shared_model.data.disk_cache import default_cache_dir

    if node.data_cache == "off" or (not node.data_path and not node.data_cache):
        return None
    return Path(node.data_cache) if node.data_cache else default_cache_dir()


def load_local_data(settings: RunSettings, node: NodeSettings, seed: int) -> LocalData:
    """Build the hospital's datasets (training set augmented with ``seed`` if configured; the
    validation set, scored in federated evaluation, prompted per ``data.eval_prompt``).

    With a data cache (:func:`data_cache_dir`) the pairs' validation (image headers, full-size
    masks) is read from disk when the data folder's files are unchanged since it was stored.
    """
    with phase("imports"):
        from shared_model.data.dataset import PolypDataset, evaluation_dataset
        from shared_model.data.disk_cache import validate_cached

    name, splits = _local_samples(settings, node)
    data, size, resize = settings.data, settings.model.sam.image_size, settings.model.sam.input_resize
    cache = data_cache_dir(node)
    train = PolypDataset(splits["train"], size, augment=data.augment, seed=seed, prompt_mode=data.prompt_mode,
                         class_name=data.class_name, on_error=data.on_error, resize=resize, validate=cache is None)
    val = (evaluation_dataset(splits["val"], size, data.eval_prompt, data.class_name, data.on_error,
                              resize=resize, validate=cache is None)
           if splits["val"] else None)
    if cache is not None:
        for dataset in (train, val) if val is not None else (train,):
            validate_cached(dataset, cache)
    from shared_model.data.negatives import site_training_set

    return LocalData(name, site_training_set(train, data, size), val)


@dataclass
class TrainOutcome:
    """A client's reply: the delta (new - received, float32) and its metrics."""

    delta: "OrderedDict[str, torch.Tensor]"
    metrics: dict[str, int | float]
    optimizer_state: dict | None
    privacy_state: dict | None = None  # local-DP accountant history (see shared_model.training.privacy)


def read_ledger(path: str | Path) -> tuple[dict | None, str, list[float]]:
    """A hospital's privacy ledger: (accountant history or None if the file is absent, the decline
    reason or "", the [epsilon, delta] budget that ran out or []).

    Raises:
        ConfigError: If the file is not a ledger (the message names it).
    """
    path = Path(path)
    if not path.exists():
        return None, "", []
    try:
        data = json.loads(path.read_text())
        return data["history"], str(data["exhausted"]), [float(v) for v in data["exhausted-budget"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a privacy ledger ({err}); it must hold the hospital's accountant history") from None


def write_ledger(path: str | Path, history: dict, exhausted: str = "", budget: list[float] | None = None) -> None:
    """Write the ledger atomically (a crash leaves the previous version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    record = {"history": history, "exhausted": exhausted, "exhausted-budget": list(budget or [])}
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def hospital_privacy(settings: RunSettings, node: NodeSettings) -> PrivacyConfig:
    """The run's privacy settings with this hospital's own budget (node config) and, unless set,
    ``planned-steps`` = rounds x local steps: the noise is calibrated so that the hospital spends
    its epsilon exactly when it has taken part in every round."""
    fed, dp = settings.federation, settings.privacy
    dp = dataclasses.replace(
        dp,
        epsilon=dp.epsilon if node.privacy_epsilon is None else node.privacy_epsilon,
        delta=dp.delta if node.privacy_delta is None else node.privacy_delta,
        planned_steps=dp.planned_steps or fed.num_server_rounds * fed.local_steps,
    )
    check_privacy(dp, "privacy-")
    return dp


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float("nan")


def train_round(
    model: torch.nn.Module,
    global_state: Mapping[str, torch.Tensor],
    data: LocalData,
    settings: RunSettings,
    server_round: int,
    partition_id: int,
    proximal_mu: float = 0.0,
    optimizer_state: dict | None = None,
    privacy: PrivacyConfig | None = None,
    privacy_state: dict | None = None,
) -> TrainOutcome:
    """Load the global state, train ``local-steps`` steps, validate locally, return the delta.

    The learning rate follows the run's one schedule (warm-up once, then cosine decay over
    ``num-server-rounds`` x ``local-steps`` steps): the round's position in it is a function of
    ``server_round``, which the server sends with every train message.

    Args:
        model: A model built from ``settings.model`` (its frozen weights match the server's).
        global_state: The received exchanged state (name -> float32 tensor).
        data: The hospital's datasets.
        settings: The run settings.
        server_round: Current round (1-based), part of the training seed.
        partition_id: The hospital's id, part of the training seed.
        proximal_mu: FedProx's mu from the server (0 = plain local training).
        optimizer_state: AdamW state carried over from the previous round, or None.
        privacy: The hospital's privacy settings (:func:`hospital_privacy`); with ``local_dp``
            the round trains with DP-SGD and the metrics gain ``epsilon``.
        privacy_state: The local-DP accountant history of earlier rounds, or None.

    Raises:
        shared_model.training.privacy.PrivacyBudgetExceeded: If this round would take the hospital past
            its epsilon budget (nothing is trained).
    """
    with phase("imports"):
        from shared_model.training.evaluate import evaluate_model
        from shared_model.data.scene_dataset import own_examples
        from shared_model.training.loop import LRSchedule, train_model

    fed = settings.federation
    schedule = LRSchedule.federated(server_round, fed.local_steps, fed.num_server_rounds)
    seed = client_seed(fed.seed, server_round, partition_id)
    torch.manual_seed(seed)
    set_exchanged_state(model, global_state)
    cfg = dataclasses.replace(settings.train, seed=seed, proximal_mu=proximal_mu, progress=False)
    reference = OrderedDict((k, v.float()) for k, v in global_state.items()) if proximal_mu > 0 else None
    local_dp = privacy is not None and privacy.local_dp
    epsilon = None
    if local_dp:
        from shared_model.training.privacy import train_model_dp

        with phase("training"):
            result, privacy_state, epsilon = train_model_dp(
                model, data.train, cfg, privacy, privacy_state, device=fed.device, steps=fed.local_steps,
                proximal_reference=reference, optimizer_state=optimizer_state, schedule=schedule)
    else:
        with phase("training"):
            result = train_model(model, data.train, cfg, device=fed.device, steps=fed.local_steps,
                                 proximal_reference=reference, optimizer_state=optimizer_state, schedule=schedule)
    delta = state_delta(get_exchanged_state(model), global_state)
    # Under local DP the loss, the local Dice and the training time (it follows the Poisson-sampled
    # batch sizes) are statistics of the private data that the DP guarantee does not cover: not
    # released unless privacy-release-metrics is set.
    release = not local_dp or privacy.release_metrics
    val_dice = float("nan")
    if data.val is not None and release:
        with phase("validation"):
            val_dice = evaluate_model(model, data.val, device=fed.device,
                                      batch_size=fed.eval_batch_size).aggregate["dice"]
    metrics = {
        "num-examples": own_examples(data.train),  # FedAvg's weight: the hospital's own images
        "partition-id": partition_id,
        "train-loss": _finite(result.loss) if release else float("nan"),
        "train-steps": result.steps,
        "train-seconds": result.seconds if release else float("nan"),
        "val-dice": _finite(val_dice),
    }
    if local_dp:
        metrics["epsilon"] = float(epsilon)
    return TrainOutcome(delta, metrics, result.optimizer_state, privacy_state)


def evaluate_round(
    model: torch.nn.Module,
    global_state: Mapping[str, torch.Tensor],
    data: LocalData,
    settings: RunSettings,
    partition_id: int,
) -> dict[str, int | float]:
    """Evaluate the global state on the hospital's validation split (Dice, IoU, HD95, ...).

    Raises:
        ValueError: If the hospital has no validation split.
    """
    from shared_model.training.evaluate import evaluate_model

    if data.val is None:
        raise ValueError(f"hospital {data.name!r} has no validation samples to evaluate on")
    set_exchanged_state(model, global_state)
    agg = evaluate_model(model, data.val, device=settings.federation.device,
                         batch_size=settings.federation.eval_batch_size).aggregate
    return {
        "num-examples": len(data.val),
        "partition-id": partition_id,
        **{key: _finite(agg[key]) for key in ("dice", "iou", "hd95", "precision", "recall")},
    }


def pack_optimizer_state(state: dict) -> bytes:
    """Serialise an optimizer ``state_dict`` for ``context.state``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unpack_optimizer_state(blob: bytes) -> dict:
    """Inverse of :func:`pack_optimizer_state`."""
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
