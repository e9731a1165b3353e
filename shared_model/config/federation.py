"""A federated run's settings and their mapping onto Flower's kebab-case run config."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared_model.config.adapter import AdapterConfig, check_adapter
from shared_model.config.faults import FaultConfig, check_faults
from shared_model.config.model import ModelConfig, model_config_from_dict
from shared_model.config.parse import ConfigError, _coerce, from_dict, kebab, to_dict
from shared_model.config.privacy import PrivacyConfig, check_privacy, check_rehearsal_privacy
from shared_model.config.site import DataConfig, TrainConfig, check_data, check_train

T = TypeVar("T")


STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
PARTITION_MODES = ("centre", "iid", "dirichlet")


@dataclass
class FederationConfig:
    """Server and client settings of a federated run (run-config keys are the kebab-case names)."""

    num_server_rounds: int = 3
    strategy: str = "fedavg"  # one of STRATEGIES
    # global += server_lr * aggregated delta (fedavg, fedprox, fedmedian, fedtrimmedavg).
    server_lr: float = 1.0
    proximal_mu: float = 0.01  # fedprox
    trimmed_beta: float = 0.2  # fedtrimmedavg: fraction cut at each end
    adam_eta: float = 1e-3  # fedadam: server step size (Flower's eta)
    adam_beta_1: float = 0.9
    adam_beta_2: float = 0.99
    adam_tau: float = 1e-6
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2  # minimum available / train / evaluate nodes
    local_steps: int = 10  # optimiser steps per client per round
    wire_dtype: str = "float32"  # float32 | float16 | bfloat16, both directions
    max_update_norm: float = 0.0  # L2 bound on a client's delta (0 = no bound)
    # False (FedAvg's stateless clients): every round starts a fresh AdamW, on purpose: with partial
    # participation a client's moments would be rounds stale. True: kept per client in context.state.
    keep_optimizer_state: bool = False
    seed: int = 0  # initial state, client seeds per (seed, round, partition), node sampling
    device: str = "cpu"  # clients and server-side evaluation ("auto" = CUDA if present)
    eval_batch_size: int = 8
    global_eval: str = "val"  # "val" / "test" (pooled over partitions), "none", or a folder
    run_dir: str = ""  # checkpoints, metrics and report; required by the server
    resume: bool = False  # continue from run_dir/checkpoint.pt
    keep_round_checkpoints: bool = False  # also keep run_dir/checkpoints/round-NNN.pt
    reply_timeout: float = 3600.0  # seconds to wait for replies each round


@dataclass
class PartitionConfig:
    """How simulated hospitals split a pooled folder (run-config keys ``partition-*``)."""

    mode: str = "centre"  # one of PARTITION_MODES
    hospitals: int = 0  # number of simulated hospitals (0 = deployment: real sites, no partitioning)
    dirichlet_alpha: float = 0.5  # size skew: smaller = more unequal
    min_size: int = 4  # every partition gets at least this many samples
    seed: int = 0


@dataclass
class RunSettings:
    """Everything a ServerApp / ClientApp reads from ``context.run_config``, typed."""

    federation: FederationConfig
    partition: PartitionConfig
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    privacy: "PrivacyConfig" = field(default_factory=lambda: PrivacyConfig())
    # adapter.enabled: exchange only a task adapter (the base frozen at every site).
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)  # simulation only


_RUN_JSON_KEYS = ("model-config", "train-config", "data-config", "adapter-config")


def to_run_config(
    federation: FederationConfig,
    partition: PartitionConfig,
    model: dict[str, Any],
    train: TrainConfig,
    data: DataConfig,
    privacy: "PrivacyConfig | None" = None,
    adapter: AdapterConfig | None = None,
    faults: FaultConfig | None = None,
) -> dict[str, bool | int | float | str]:
    """Map typed settings onto Flower's flat run config (kebab-case keys, scalar values).

    Federation fields keep their names (``num-server-rounds``, ``wire-dtype``); partition fields
    get a ``partition-`` prefix, privacy fields (if given) a ``privacy-`` prefix, fault-injection
    fields (if given; simulation only) a ``fault-`` prefix; the model (``{"preset": ..., <overrides>}``), train and data
    configs travel as JSON strings under ``model-config``, ``train-config`` and ``data-config``, and
    an :class:`AdapterConfig` (if given) under ``adapter-config``.
    """
    import json

    out: dict[str, bool | int | float | str] = {}
    for f in dataclasses.fields(federation):
        out[kebab(f.name)] = getattr(federation, f.name)
    for f in dataclasses.fields(partition):
        out["partition-" + kebab(f.name)] = getattr(partition, f.name)
    for f in dataclasses.fields(privacy) if privacy is not None else ():
        out["privacy-" + kebab(f.name)] = getattr(privacy, f.name)
    for f in dataclasses.fields(faults) if faults is not None else ():
        out["fault-" + kebab(f.name)] = getattr(faults, f.name)
    out["model-config"] = json.dumps(model, sort_keys=True)
    out["train-config"] = json.dumps(to_dict(train), sort_keys=True)
    out["data-config"] = json.dumps(to_dict(data), sort_keys=True)
    if adapter is not None:
        out["adapter-config"] = json.dumps(to_dict(adapter), sort_keys=True)
    return out


def _scalar_section(cls: type[T], run_config: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + kebab(f.name)
        if key in run_config:
            kwargs[f.name] = _coerce(run_config[key], hints[f.name], key)
    return cls(**kwargs)


def from_run_config(run_config: dict[str, Any]) -> RunSettings:
    """Parse Flower's ``context.run_config`` strictly into :class:`RunSettings`.

    Missing keys take the dataclass defaults.

    Raises:
        ConfigError: On an unknown key, a value of the wrong type, invalid JSON, or an invalid
            choice; the message names the run-config key (and the nested field).
    """
    import json

    fed_keys = {kebab(f.name) for f in dataclasses.fields(FederationConfig)}
    part_keys = {"partition-" + kebab(f.name) for f in dataclasses.fields(PartitionConfig)}
    part_keys |= {"privacy-" + kebab(f.name) for f in dataclasses.fields(PrivacyConfig)}
    part_keys |= {"fault-" + kebab(f.name) for f in dataclasses.fields(FaultConfig)}
    unknown = sorted(set(run_config) - fed_keys - part_keys - set(_RUN_JSON_KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {unknown}")
    federation = _scalar_section(FederationConfig, run_config, "")
    partition = _scalar_section(PartitionConfig, run_config, "partition-")
    parsed: dict[str, dict] = {}
    for key in _RUN_JSON_KEYS:
        text = run_config.get(key, "{}")
        if not isinstance(text, str):
            raise ConfigError(f"{key}: expected a JSON string, got {type(text).__name__}")
        try:
            parsed[key] = json.loads(text or "{}")
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: invalid JSON: {err}") from None
        if not isinstance(parsed[key], dict):
            raise ConfigError(f"{key}: expected a JSON object, got {type(parsed[key]).__name__}")
    settings = RunSettings(
        federation=federation,
        partition=partition,
        model=model_config_from_dict(parsed["model-config"], "model-config"),
        train=from_dict(TrainConfig, parsed["train-config"], "train-config"),
        data=from_dict(DataConfig, parsed["data-config"], "data-config"),
        privacy=_scalar_section(PrivacyConfig, run_config, "privacy-"),
        adapter=from_dict(AdapterConfig, parsed["adapter-config"], "adapter-config"),
        faults=_scalar_section(FaultConfig, run_config, "fault-"),
    )
    check_federation(settings.federation, settings.partition)
    check_train(settings.train, "train-config.")
    check_data(settings.data, "data-config.")
    check_privacy(settings.privacy, "privacy-")
    check_rehearsal_privacy(settings.data, settings.privacy, "data-config.")
    check_adapter(settings.adapter, "adapter-config.")
    check_faults(settings.faults, "fault-")
    return settings


def check_federation(fed: FederationConfig, part: PartitionConfig, run_config: bool = True) -> None:
    """Check choices and ranges, raising ConfigError naming the field as its source spells it.

    Args:
        fed: Federation settings.
        part: Partition settings.
        run_config: Name fields as Flower's run-config keys (``num-server-rounds``,
            ``partition-min-size``); False: as an experiment YAML's dotted snake_case fields
            (``federation.num_server_rounds``, ``partition.min_size``).
    """
    from shared_model.exchange import WIRE_DTYPES

    fed_prefix, part_prefix = ("", "partition-") if run_config else ("federation.", "partition.")

    def name(field_name: str, prefix: str) -> str:
        return prefix + (kebab(field_name) if run_config else field_name)

    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"{name('strategy', fed_prefix)}: {fed.strategy!r} not in {list(STRATEGIES)}")
    if fed.wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"{name('wire_dtype', fed_prefix)}: {fed.wire_dtype!r} not in {sorted(WIRE_DTYPES)}")
    if part.mode not in PARTITION_MODES:
        raise ConfigError(f"{name('mode', part_prefix)}: {part.mode!r} not in {list(PARTITION_MODES)}")
    checks = [
        ("num_server_rounds", fed.num_server_rounds >= 1, "must be >= 1"),
        ("local_steps", fed.local_steps >= 1, "must be >= 1"),
        ("min_nodes", fed.min_nodes >= 1, "must be >= 1"),
        ("fraction_train", 0.0 < fed.fraction_train <= 1.0, "must be in (0, 1]"),
        ("fraction_evaluate", 0.0 <= fed.fraction_evaluate <= 1.0, "must be in [0, 1]"),
        ("trimmed_beta", 0.0 <= fed.trimmed_beta < 0.5, "must be in [0, 0.5)"),
        ("max_update_norm", fed.max_update_norm >= 0.0, "must be >= 0 (0 = no bound)"),
        ("server_lr", fed.server_lr > 0.0, "must be > 0"),
        ("proximal_mu", fed.proximal_mu >= 0.0, "must be >= 0"),
        ("eval_batch_size", fed.eval_batch_size >= 1, "must be >= 1"),
        ("reply_timeout", fed.reply_timeout > 0.0, "must be > 0 (seconds)"),
    ]
    for field_name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name(field_name, fed_prefix)}: {why}")
    checks = [
        ("dirichlet_alpha", part.dirichlet_alpha > 0.0, "must be > 0"),
        ("min_size", part.min_size >= 1, "must be >= 1"),
        ("hospitals", part.hospitals >= 0, "must be >= 0"),
    ]
    for field_name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name(field_name, part_prefix)}: {why}")
