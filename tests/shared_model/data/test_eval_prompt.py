"""Evaluation prompts: every scored set is prompted with the class name unless the ground-truth
oracle is asked for by name (:func:`shared_model.data.dataset.evaluation_dataset`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cli.evaluate import evaluation_images, training_record
from client.task import load_local_data, parse_node_config
from server.loop import evaluation_sets
from shared_model.config import (ConfigError, DataConfig, FederationConfig, PartitionConfig, TrainConfig, check_data,
                                 from_run_config, to_run_config)
from shared_model.data import build_datasets, evaluation_dataset, list_samples
from shared_model.data.tasks import Task
from simulation.compare_jobs import comparison_dataset


def _data(root, **kwargs) -> DataConfig:
    # Training on attribute captions (the recipe), as the scored sets must not inherit.
    return DataConfig(root=str(root), prompt_mode="attributes", augment=False, val_fraction=0.25,
                      test_fraction=0.25, **kwargs)


def test_evaluation_dataset_class_by_default_oracle_by_name(synthetic_root):
    samples, _ = list_samples(synthetic_root, ["centre_0"])
    plain = evaluation_dataset(samples, 32, class_name="lesion")
    assert plain.eval_prompt == "class" and not plain.augment
    assert {plain[i]["text"] for i in range(len(plain))} == {"lesion"}
    oracle = evaluation_dataset(samples, 32, "oracle-caption", class_name="lesion")
    texts = [oracle[i]["text"] for i in range(len(oracle))]
    assert oracle.eval_prompt == "oracle-caption" and all("lesion" in t and t != "lesion" for t in texts)
    with pytest.raises(ValueError, match="eval_prompt must be one of \\['class', 'oracle-caption'\\], got 'caption'"):
        evaluation_dataset(samples, 32, "caption")
    with pytest.raises(ConfigError, match="data.eval_prompt: 'attributes' not in \\['class', 'oracle-caption'\\]"):
        check_data(DataConfig(eval_prompt="attributes"))


def test_no_evaluation_path_uses_ground_truth_captions_by_default(synthetic_root, monkeypatch):
    """Every path that scores a model: a caption computed from a mask while reading one fails."""

    def no_caption(*args, **kwargs):
        raise AssertionError("a scored set built a caption from its ground-truth mask")

    monkeypatch.setattr(Task, "caption", no_caption)  # every task's caption, polyps' included
    data = _data(synthetic_root)
    built = build_datasets(data, 32)
    with pytest.raises(AssertionError, match="ground-truth mask"):  # training keeps its captions
        built["train"][0]
    rc = to_run_config(FederationConfig(global_eval="val"), PartitionConfig(), {"preset": "tiny"}, TrainConfig(),
                       data)
    settings = from_run_config(rc)
    server_eval, server_test = evaluation_sets(settings, 32)
    client_val = load_local_data(settings, parse_node_config({"data-path": str(synthetic_root / "centre_0"),
                                                               "val-fraction": 0.25}), seed=0).val
    record = {"extra": {"data": training_record(data)}}
    cli_set, _, lines = evaluation_images(record, 32)
    exp = SimpleNamespace(data=data, partition=PartitionConfig(), model={"preset": "tiny"})
    scored = {"train val": built["val"], "train test": built["test"], "server global eval": server_eval,
              "server test report": server_test, "client federated evaluation": client_val,
              "promptsam evaluate": cli_set, "comparison test": comparison_dataset(exp, ["centre_1"], "test")}
    for name, dataset in scored.items():
        assert dataset is not None and len(dataset) > 0, name
        assert dataset.eval_prompt == "class", name
        assert {dataset[i]["text"] for i in range(len(dataset))} == {"polyp"}, name
    assert lines[2].startswith('evaluation prompt: class (the class name "polyp" only')


def test_the_oracle_is_an_explicit_option(synthetic_root):
    data = _data(synthetic_root, centres=["centre_2"], eval_prompt="oracle-caption")
    test = build_datasets(data, 32)["test"]
    assert test.eval_prompt == "oracle-caption" and all(test[i]["text"] != "polyp" for i in range(len(test)))
    record = {"extra": {"data": training_record(_data(synthetic_root))}}
    dataset, _, lines = evaluation_images(record, 32, eval_prompt="oracle-caption")
    assert dataset.eval_prompt == "oracle-caption" and dataset[0]["text"] != "polyp"
    assert lines[2].startswith("evaluation prompt: oracle-caption") and "ground-truth mask" in lines[2]
    # A recorded eval_prompt of the training data does not carry over: the default stays the class.
    oracle_record = {"extra": {"data": training_record(data)}}
    assert evaluation_images(oracle_record, 32)[0].eval_prompt == "class"
