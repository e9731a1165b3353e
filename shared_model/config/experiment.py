"""An experiment YAML (a federated run) -> typed config -> Flower run config.

An experiment file has the sections below (all optional except what the data needs); keys are
the dataclass field names (snake_case), parsed strictly: an unknown key or a wrong type raises
:class:`~shared_model.config.ConfigError` naming the file and the dotted field::

    name: demo
    model: {preset: tiny, sam: {lora_rank: 4}}        # preset + nested ModelConfig overrides
    federation: {num_server_rounds: 3, strategy: fedavg, local_steps: 10, ...}  # FederationConfig
    train: {batch_size: 4, lr: 0.003, warmup_steps: 0}                          # TrainConfig
    data: {root: ../shared/data/polyp, centres: [kvasir_seg, cvc_clinicdb]}    # DataConfig
    synthetic: {centres: 3, per_centre: 40, image_size: 128}  # generate data into the run folder
    partition: {mode: centre, dirichlet_alpha: 0.5}                             # PartitionConfig
    privacy: {local_dp: true, epsilon: 8.0}            # PrivacyConfig (local / central DP, SecAgg+)
    adapter: {enabled: true, name: polyp}              # AdapterConfig: exchange only a task adapter
    simulation: {num_supernodes: 3, client_cpus: 1, client_gpus: 0}
    faults: {sleep_fraction: 0.1, error_fraction: 0.05, sleep_seconds: 60}  # simulation-only FaultConfig

The typed config maps onto Flower's flat run config with :func:`shared_model.config.to_run_config`;
``partition.hospitals`` is set to ``simulation.num_supernodes``. Relative data paths are resolved
against the project root (the folder holding ``pyproject.toml``).
"""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from shared_model.config.adapter import AdapterConfig, check_adapter
from shared_model.config.faults import FaultConfig, check_faults
from shared_model.config.federation import FederationConfig, PartitionConfig, check_federation, to_run_config
from shared_model.config.model import model_config_from_dict
from shared_model.config.parse import ConfigError, blame_overrides, from_dict, load_yaml
from shared_model.config.privacy import PrivacyConfig, check_privacy, check_rehearsal_privacy
from shared_model.config.site import DataConfig, TrainConfig, check_data, check_train

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def source_commit() -> str | None:
    """The project's git commit (``git rev-parse HEAD``), or None outside a git checkout: what a
    record needs besides its config when the code behind a config field changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


SECTIONS = ("name", "model", "federation", "train", "data", "synthetic", "partition", "simulation", "privacy",
            "adapter", "faults")


@dataclass
class SyntheticConfig:
    """Synthetic polyp folders generated into ``<run_dir>/data`` before the run."""

    enabled: bool = True
    centres: int = 3
    per_centre: int = 40
    image_size: int = 128
    seed: int = 0


@dataclass
class SimulationConfig:
    """Flower simulation engine (Ray) settings."""

    num_supernodes: int = 3
    client_cpus: int = 1  # Ray CPUs per virtual client (Flower takes whole CPUs)
    client_gpus: float = 0.0  # fractional GPU share (does not cap memory)
    timeout: float = 0.0  # seconds for the whole `flwr run` (0 = none)


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    model: dict[str, Any]  # {"preset": ..., <nested overrides>}; validated by model_config_from_dict
    federation: FederationConfig
    train: TrainConfig
    data: DataConfig
    synthetic: SyntheticConfig | None
    partition: PartitionConfig
    simulation: SimulationConfig
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def run_config(self) -> dict[str, bool | int | float | str]:
        """The Flower run config of this experiment."""
        return to_run_config(self.federation, self.partition, self.model, self.train, self.data, self.privacy,
                             self.adapter, self.faults)


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``federation.num_server_rounds``) in a nested dict, returning a copy.

    String values are parsed as YAML scalars (``"3"`` -> 3, ``"true"`` -> True).
    """
    out = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else value
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def check_counts(exp: Experiment) -> None:
    """Ranges of the ``simulation`` and ``synthetic`` sections, raising ConfigError naming the field."""
    sim, syn = exp.simulation, exp.synthetic
    checks = [
        ("simulation.num_supernodes", sim.num_supernodes >= 1, "must be >= 1"),
        ("simulation.client_cpus", sim.client_cpus >= 1, "must be >= 1 (Flower gives whole CPUs)"),
        ("simulation.client_gpus", sim.client_gpus >= 0.0, "must be >= 0"),
        ("simulation.timeout", sim.timeout >= 0.0, "must be >= 0 (0 = no limit)"),
    ]
    if syn is not None:
        checks += [
            ("synthetic.centres", syn.centres >= 1, "must be >= 1"),
            ("synthetic.per_centre", syn.per_centre >= 1, "must be >= 1"),
            ("synthetic.image_size", syn.image_size >= 8, "must be >= 8 (pixels)"),
        ]
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(f"{name}: {why}")


def parse_experiment(data: dict[str, Any], source: str = "experiment") -> Experiment:
    """Parse an experiment mapping strictly.

    Raises:
        ConfigError: Naming ``source`` and the offending field.
    """
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; valid: {list(SECTIONS)}")
    try:
        name = data.get("name", Path(source).stem)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name: expected a non-empty string, got {name!r}")
        model = dict(data.get("model") or {"preset": "tiny"})
        model_config_from_dict(model)  # validate now; the dict travels in the run config
        section = lambda key: data.get(key) or {}  # noqa: E731
        synthetic = None
        if data.get("synthetic") is not None:
            synthetic = from_dict(SyntheticConfig, section("synthetic"), "synthetic")
            synthetic = synthetic if synthetic.enabled else None
        exp = Experiment(
            name=name,
            model=model,
            federation=from_dict(FederationConfig, section("federation"), "federation"),
            train=from_dict(TrainConfig, section("train"), "train"),
            data=from_dict(DataConfig, section("data"), "data"),
            synthetic=synthetic,
            partition=from_dict(PartitionConfig, section("partition"), "partition"),
            privacy=from_dict(PrivacyConfig, section("privacy"), "privacy"),
            simulation=from_dict(SimulationConfig, section("simulation"), "simulation"),
            adapter=from_dict(AdapterConfig, section("adapter"), "adapter"),
            faults=from_dict(FaultConfig, section("faults"), "faults"),
            source=source,
            raw=data,
        )
        check_counts(exp)
        if exp.partition.hospitals not in (0, exp.simulation.num_supernodes):
            raise ConfigError("partition.hospitals: leave it unset; it is simulation.num_supernodes")
        exp.partition.hospitals = exp.simulation.num_supernodes
        check_federation(exp.federation, exp.partition, run_config=False)
        check_train(exp.train, "train.")
        check_data(exp.data, "data.")
        check_privacy(exp.privacy, "privacy.")
        check_rehearsal_privacy(exp.data, exp.privacy, "data.")
        check_adapter(exp.adapter, "adapter.")
        check_faults(exp.faults, "faults.")
        if exp.faults.sleep_fraction > 0 and exp.federation.reply_timeout >= exp.faults.sleep_seconds:
            raise ConfigError(f"faults.sleep_seconds: {exp.faults.sleep_seconds:g} s does not pass the deadline "
                              f"federation.reply_timeout={exp.federation.reply_timeout:g} s; make it longer")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if exp.data.sources:  # the root is not read, and must keep its default
        for source in exp.data.sources:
            if not Path(source.root).is_absolute():
                source.root = str((PROJECT_ROOT / source.root).resolve())
    elif not Path(exp.data.root).is_absolute():
        exp.data.root = str((PROJECT_ROOT / exp.data.root).resolve())
    if exp.adapter.base_checkpoint and not Path(exp.adapter.base_checkpoint).is_absolute():
        exp.adapter.base_checkpoint = str((PROJECT_ROOT / exp.adapter.base_checkpoint).resolve())
    if exp.data.split_file and not Path(exp.data.split_file).is_absolute():
        exp.data.split_file = str((PROJECT_ROOT / exp.data.split_file).resolve())
    return exp


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Experiment:
    """Read an experiment YAML, apply dotted ``overrides``, and parse it.

    Errors name the file, or the ``--set KEY=VALUE`` override when that is where the bad value
    came from (see :func:`blame_overrides`).
    """
    raw = load_yaml(path)
    try:
        return parse_experiment(apply_overrides(raw, overrides), str(path))
    except ConfigError as err:
        if not overrides:
            raise
        raise blame_overrides(err, str(path), overrides, lambda: parse_experiment(raw, str(path))) from None
