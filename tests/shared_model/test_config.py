"""Config parsing: strict keys and types, presets, YAML round trip."""

import pytest
import yaml

from shared_model.config import (
    ConfigError,
    ModelConfig,
    PRESETS,
    TrainConfig,
    from_dict,
    get_preset,
    load_yaml,
    merge,
    site_experiment_from_dict,
    to_dict,
)


def test_presets_registered_and_distinct():
    assert {"tiny", "base"} <= set(PRESETS)
    tiny, base = get_preset("tiny"), get_preset("base")
    assert tiny.preset == "tiny" and base.preset == "base"
    assert base.sam.image_size == 1024 and base.sam.width == 768 and base.clip.text.width == 768
    assert tiny.sam.image_size == 128


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.sam: unknown key 'lora_rnk'"):
        get_preset("tiny", {"sam": {"lora_rnk": 2}})


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.sam\.lora_rank: expected an integer"):
        get_preset("tiny", {"sam": {"lora_rank": "four"}})
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number"):
        site_experiment_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"unknown top-level key"):
        site_experiment_from_dict({"modle": {}})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_merge_overrides_nested_and_keeps_rest():
    cfg = merge(get_preset("tiny"), {"sam": {"lora_rank": 8}, "loss": {"dice": 2}})
    assert cfg.sam.lora_rank == 8 and cfg.loss.dice == 2.0 and cfg.sam.width == 128


def test_yaml_round_trip(tmp_path):
    cfg = get_preset("tiny")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    again = from_dict(ModelConfig, load_yaml(tmp_path / "m.yaml"))
    assert to_dict(again) == to_dict(cfg)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_int_accepted_for_float_but_bool_is_not_int():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0
    with pytest.raises(ConfigError, match="train.steps"):
        from_dict(TrainConfig, {"steps": True}, "train")


@pytest.mark.parametrize("section,body,message", [
    ("train", {"steps": -5}, "train.steps: must be >= 1"),
    ("train", {"steps": 0}, "train.steps: must be >= 1"),
    ("train", {"batch_size": 0}, "train.batch_size: must be >= 1"),
    ("train", {"eval_batch_size": -1}, "train.eval_batch_size: must be >= 1"),
    ("train", {"num_workers": -2}, "train.num_workers: must be >= 0"),
    ("train", {"warmup_steps": -1}, "train.warmup_steps: must be >= 0"),
    ("train", {"lr": 0.0}, "train.lr: must be > 0"),
    ("data", {"val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction: val_fraction \\+ test_fraction"),
    ("data", {"on_error": "ignore"}, "data.on_error: 'ignore' not in \\['raise', 'skip'\\]"),
])
def test_site_experiment_refuses_counts_that_make_no_sense(tmp_path, section, body, message):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({section: body}))
    with pytest.raises(ConfigError, match=f"^{path}: {message}"):
        site_experiment_from_dict(load_yaml(path), str(path))


def test_train_refuses_a_bad_config_before_training(tmp_path, capsys):
    from cli.main import main

    path = tmp_path / "site.yaml"
    path.write_text("train:\n  steps: -5\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{path}: train.steps: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model.pt").exists()
