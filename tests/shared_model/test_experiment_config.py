"""Experiment YAML -> typed config -> Flower run config, and its errors."""

import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

from shared_model.config import (
    ConfigError,
    DataConfig,
    FederationConfig,
    PartitionConfig,
    TrainConfig,
    from_run_config,
    to_run_config,
)
from shared_model.config.experiment import apply_overrides, load_experiment, parse_experiment
from simulation.experiment import PROJECT_ROOT
from simulation.runner import write_run_config

CONFIGS = PROJECT_ROOT / "simulation" / "configs"


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_maps_onto_the_declared_run_config_keys():
    exp = load_experiment(CONFIGS / "demo.yaml")
    rc = exp.run_config()
    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(rc) == set(declared)  # flwr run refuses keys missing from pyproject
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())
    assert rc["num-server-rounds"] == 5 and rc["wire-dtype"] == "float32" and rc["partition-hospitals"] == 3
    assert rc["local-steps"] == 40 and rc["partition-mode"] == "centre"
    from_run_config(declared)  # the pyproject defaults parse too


def test_run_config_roundtrip_gives_the_same_typed_settings():
    exp = load_experiment(CONFIGS / "polyp_by_centre.yaml")
    settings = from_run_config(exp.run_config())
    assert settings.federation == exp.federation and settings.partition == exp.partition
    assert settings.train == exp.train and settings.data == exp.data
    assert settings.model.preset == "base" and settings.model.sam.lora_rank == 4
    assert Path(settings.data.root).is_absolute() and settings.data.root.endswith("shared/data/polyp")


def test_run_config_file_is_valid_toml_for_flwr(tmp_path):
    rc = to_run_config(FederationConfig(adam_tau=1e-9, run_dir='C:\\a "b"'), PartitionConfig(), {"preset": "tiny"},
                       TrainConfig(), DataConfig())
    path = write_run_config(tmp_path / "rc.toml", rc)
    assert tomllib.loads(path.read_text()) == rc
    assert parse_config_args([str(path)]) == rc


@pytest.mark.parametrize("section,body,message", [
    ("federation", {"local_stepz": 3}, "federation: unknown key\\(s\\) \\['local_stepz'\\]"),
    ("federation", {"local_steps": "ten"}, "federation.local_steps: expected an integer, got str"),
    ("train", {"lr": "fast"}, "train.lr: expected a number"),
    ("data", {"centres": "a"}, "data.centres: expected a list"),
    ("model", {"preset": "tiny", "sam": {"lora_rnk": 2}}, "model.sam: unknown key 'lora_rnk'"),
    ("model", {"preset": "huge"}, "unknown preset 'huge'"),
    ("partition", {"mode": "random"}, "partition.mode: 'random' not in"),
    ("federation", {"strategy": "fedsgd"}, "federation.strategy: 'fedsgd' not in"),
    ("federation", {"num_server_rounds": -1}, "federation.num_server_rounds: must be >= 1"),
    ("federation", {"local_steps": 0}, "federation.local_steps: must be >= 1"),
    ("partition", {"min_size": 0}, "partition.min_size: must be >= 1"),
    ("simulation", {"num_supernodes": 0}, "simulation.num_supernodes: must be >= 1"),
    ("simulation", {"client_cpus": 0}, "simulation.client_cpus: must be >= 1"),
    ("synthetic", {"per_centre": 0}, "synthetic.per_centre: must be >= 1"),
    ("train", {"steps": -5}, "train.steps: must be >= 1"),
    ("train", {"batch_size": 0}, "train.batch_size: must be >= 1"),
    ("train", {"num_workers": -1}, "train.num_workers: must be >= 0"),
    ("data", {"test_fraction": 1.0}, "data.test_fraction: must be in \\[0, 1\\)"),
    ("privacy", {"planned_steps": -1}, "privacy.planned_steps: must be >= 0"),
    ("bogus", {"x": 1}, "unknown top-level key\\(s\\) \\['bogus'\\]"),
])
def test_yaml_errors_name_the_file_and_field(tmp_path, section, body, message):
    path = _write(tmp_path, {"name": "t", section: body})
    with pytest.raises(ConfigError, match=message) as err:
        load_experiment(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("rc,message", [
    ({"local-stepz": 3}, "unknown key\\(s\\) \\['local-stepz'\\]"),
    ({"local-steps": "3"}, "local-steps: expected an integer, got str"),
    ({"keep-optimizer-state": 1}, "keep-optimizer-state: expected true/false"),
    ({"partition-dirichlet-alpha": "x"}, "partition-dirichlet-alpha: expected a number"),
    ({"train-config": "{bad json"}, "train-config: invalid JSON"),
    ({"train-config": '{"lr": "x"}'}, "train-config.lr: expected a number"),
    ({"data-config": "[1]"}, "data-config: expected a JSON object"),
    ({"model-config": '{"preset": "tiny", "crf": {"iterations": "3"}}'}, "model-config.crf.iterations"),
    ({"wire-dtype": "int8"}, "wire-dtype: 'int8' not in"),
    ({"fraction-train": 0.0}, "fraction-train: must be in \\(0, 1\\]"),
    ({"num-server-rounds": 0}, "num-server-rounds: must be >= 1"),
    ({"partition-min-size": 0}, "partition-min-size: must be >= 1"),
    ({"train-config": '{"steps": 0}'}, "train-config.steps: must be >= 1"),
    ({"train-config": '{"eval_batch_size": 0}'}, "train-config.eval_batch_size: must be >= 1"),
    ({"data-config": '{"val_fraction": -0.1}'}, "data-config.val_fraction: must be in"),
])
def test_run_config_errors_name_the_key(rc, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config(rc)


def test_overrides_set_dotted_keys_with_yaml_scalars(tmp_path):
    base = {"federation": {"num_server_rounds": 3}, "model": {"preset": "tiny"}}
    out = apply_overrides(base, {"federation.num_server_rounds": "5", "model.sam.lora_rank": 8,
                                 "federation.resume": "true"})
    assert out["federation"] == {"num_server_rounds": 5, "resume": True}
    assert out["model"] == {"preset": "tiny", "sam": {"lora_rank": 8}}
    assert base["federation"]["num_server_rounds"] == 3
    with pytest.raises(ConfigError, match="override model.preset.x: 'preset' is not a section"):
        apply_overrides(base, {"model.preset.x": 1})
    exp = load_experiment(CONFIGS / "demo.yaml", {"federation.strategy": "fedprox", "federation.proximal_mu": "0.1"})
    assert exp.federation.strategy == "fedprox" and exp.federation.proximal_mu == 0.1


def test_a_bad_override_is_blamed_on_the_set_flag_not_the_file(tmp_path):
    """The bad value came from ``--set``: the error says so, with the key as the user wrote it."""
    with pytest.raises(ConfigError) as err:
        load_experiment(CONFIGS / "demo.yaml", {"federation.num_server_rounds": "-1", "train.lr": "0.01"})
    assert str(err.value) == ("--set federation.num_server_rounds=-1: federation.num_server_rounds: "
                              "must be >= 1")
    with pytest.raises(ConfigError, match="^--set train.steps=ten: train.steps: expected an integer"):
        load_experiment(CONFIGS / "demo.yaml", {"train.steps": "ten"})
    # A bad value in the file is still blamed on the file, even with (good) overrides.
    path = _write(tmp_path, {"name": "t", "federation": {"local_steps": 0}})
    with pytest.raises(ConfigError, match=f"^{path}: federation.local_steps: must be >= 1"):
        load_experiment(path, {"federation.num_server_rounds": "2"})


def test_relative_data_root_resolves_against_the_project(tmp_path):
    exp = parse_experiment({"data": {"root": "some/where"}}, "x.yaml")
    assert exp.data.root == str((PROJECT_ROOT / "some/where").resolve())
    assert exp.synthetic is None and exp.name == "x"
