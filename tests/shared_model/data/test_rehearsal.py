"""Rehearsal: synthetic scenes appended to a site's training set (``data.rehearsal_scenes``), so that
adapting to one class keeps the text choosing the target; never in scored sets, never under local DP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from client.task import load_local_data, parse_node_config, train_round
from shared_model.config import ConfigError, DataConfig, FederationConfig, PartitionConfig, TrainConfig
from shared_model.config import from_run_config, to_run_config
from shared_model.config.experiment import parse_experiment
from shared_model.config.privacy import PrivacyConfig
from shared_model.data.dataset import PolypDataset
from shared_model.data.folder import list_samples
from shared_model.data.scene_dataset import SCENE_CENTRE, RehearsalDataset, SceneDataset, own_examples, with_rehearsal
from shared_model.training.loop import infinite_batches, make_loader
from simulation.compare_jobs import comparison_dataset


def test_rehearsal_appends_scenes_counts_own_images_and_keeps_augmenting_the_own_set(synthetic_root):
    samples, _ = list_samples(synthetic_root, ["centre_0"])
    own = PolypDataset(samples, 64, augment=True, seed=0, prompt_mode="class")
    assert with_rehearsal(own, 0, 64) is own and own_examples(own) == len(own)
    mixed = with_rehearsal(own, 4, 64, seed=3)
    scenes = SceneDataset(4, 64, seed=3)
    assert isinstance(mixed, RehearsalDataset) and len(mixed) == len(own) + len(scenes)
    assert own_examples(mixed) == len(own) and mixed.centres()[-1] == SCENE_CENTRE
    last = mixed[len(mixed) - 1]
    assert last["centre"] == SCENE_CENTRE and last["text"] == scenes[len(scenes) - 1]["text"]
    assert torch.equal(last["mask"], scenes[len(scenes) - 1]["mask"])
    first = own[0]["image"].clone()
    mixed.set_epoch(1)  # new augmentations of the own images
    assert own.epoch == 1 and not torch.equal(own[0]["image"], first)
    # Own and scene items collate into one batch with the training loop's loader.
    batches = infinite_batches(make_loader(mixed, len(mixed), shuffle=True, seed=0))
    batch = next(batches)
    assert batch["image"].shape == (len(mixed), 3, 64, 64) and SCENE_CENTRE in batch["centre"]
    assert set(batch["centre"]) - {SCENE_CENTRE} == {"centre_0"}


def test_a_hospital_trains_on_rehearsal_scenes_but_weighs_and_scores_only_its_own_images(synthetic_root):
    data = DataConfig(root=str(synthetic_root), val_fraction=0.25, test_fraction=0.25, augment=False,
                      rehearsal_scenes=3)
    settings = from_run_config(to_run_config(FederationConfig(local_steps=1), PartitionConfig(), {"preset": "tiny"},
                                             TrainConfig(batch_size=2, warmup_steps=0), data))
    node = parse_node_config({"data-path": str(synthetic_root / "centre_0"), "val-fraction": 0.25})
    local = load_local_data(settings, node, seed=0)
    assert isinstance(local.train, RehearsalDataset) and len(local.train.scenes) > 0
    assert SCENE_CENTRE not in {local.val[i]["centre"] for i in range(len(local.val))}
    from shared_model.exchange import get_exchanged_state
    from shared_model.modeling.prompt_sam import build_model

    model = build_model(settings.model)
    outcome = train_round(model, get_exchanged_state(model), local, settings, server_round=1, partition_id=0)
    assert outcome.metrics["num-examples"] == own_examples(local.train) == len(local.train.own)
    # The comparison's training split carries them too, its constant-mask fit does not.
    exp = SimpleNamespace(data=data, partition=PartitionConfig(), model={"preset": "tiny"})
    assert isinstance(comparison_dataset(exp, ["centre_0"], "train"), RehearsalDataset)
    assert isinstance(comparison_dataset(exp, ["centre_0"], "train", extras=False), PolypDataset)
    assert isinstance(comparison_dataset(exp, ["centre_0"], "test"), PolypDataset)


def test_rehearsal_is_refused_under_local_dp_and_when_negative():
    base = {"model": {"preset": "tiny"}, "data": {"rehearsal_scenes": 10}}
    parse_experiment(base, "x.yaml")
    with pytest.raises(ConfigError, match="x.yaml: data.rehearsal_scenes: not with privacy local_dp"):
        parse_experiment({**base, "privacy": {"local_dp": True}, "model": {"preset": "tiny", "loss": {"nce": 0.0}}},
                         "x.yaml")
    with pytest.raises(ConfigError, match="data.rehearsal_scenes: must be >= 0"):
        parse_experiment({**base, "data": {"rehearsal_scenes": -1}}, "x.yaml")
    rc = to_run_config(FederationConfig(), PartitionConfig(), {"preset": "tiny"}, TrainConfig(),
                       DataConfig(rehearsal_scenes=5), PrivacyConfig(local_dp=True))
    with pytest.raises(ConfigError, match="data-config.rehearsal_scenes: not with privacy local_dp"):
        from_run_config(rc)
