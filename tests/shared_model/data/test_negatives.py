"""Negative prompts (``data.negative_prompts``): a seeded fraction of a site's own items prompted
with an absent class and trained against an empty mask, left out of the contrastive loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from client.task import load_local_data, parse_node_config, train_round
from shared_model.config import ConfigError, DataConfig, FederationConfig, PartitionConfig, TrainConfig
from shared_model.config import from_run_config, to_run_config
from shared_model.config.experiment import parse_experiment
from shared_model.data.dataset import PolypDataset
from shared_model.data.folder import list_samples
from shared_model.data.negatives import NegativePrompts, site_training_set
from shared_model.data.scene_dataset import SCENE_CENTRE, own_examples
from shared_model.modeling.prompt_sam import build_model
from shared_model.training.loop import infinite_batches, make_loader
from simulation.compare_jobs import comparison_dataset

CLASSES = ["instrument", "breast tumour", "retinal blood vessels"]


def _own(root, mode: str = "attributes") -> PolypDataset:
    samples, _ = list_samples(root, ["centre_0", "centre_1"])
    return PolypDataset(samples, 64, augment=False, seed=0, prompt_mode=mode)


def test_negatives_swap_the_class_empty_the_mask_and_are_seeded_per_epoch(synthetic_root):
    own = _own(synthetic_root)
    data = DataConfig(negative_prompts=0.5, negative_classes=[*CLASSES, "polyp"])
    wrapped = site_training_set(own, data, 64)
    assert isinstance(wrapped, NegativePrompts) and len(wrapped) == len(own) == own_examples(wrapped)
    negatives = [i for i in range(len(own)) if wrapped.negative_class(i) is not None]
    assert 0 < len(negatives) < len(own)  # 50 % of 20+ items: some of each
    for i in range(len(own)):
        item, plain = wrapped[i], own[i]
        absent = wrapped.negative_class(i)
        assert torch.equal(item["image"], plain["image"]) and bool(item["paired"]) == (absent is None)
        if absent is None:
            assert item["text"] == plain["text"] and torch.equal(item["mask"], plain["mask"])
        else:
            assert absent in CLASSES  # the own class ("polyp") is never drawn
            assert item["text"] == plain["text"].replace("polyp", absent, 1) and "polyp" not in item["text"]
            assert item["mask"].sum() == 0 and plain["mask"].sum() > 0
    again = site_training_set(_own(synthetic_root), data, 64)
    assert [again.negative_class(i) for i in range(len(own))] == [wrapped.negative_class(i) for i in range(len(own))]
    wrapped.set_epoch(1)
    assert own.epoch == 1
    assert [wrapped.negative_class(i) for i in range(len(own))] != [again.negative_class(i) for i in range(len(own))]
    # Class prompts become the absent class name itself.
    cls = site_training_set(_own(synthetic_root, "class"), data, 64)
    i = next(i for i in range(len(cls)) if cls.negative_class(i))
    assert cls[i]["text"] == cls.negative_class(i)


def test_negative_phrases_name_the_absent_task_in_its_own_words_and_keep_the_other_draws(synthetic_root):
    """``data.negative_phrases``: that share of negatives is the absent task's phrase; classes of no
    task ("instrument") keep the swap; which items are negatives, and of which class, is unchanged."""
    plain = site_training_set(_own(synthetic_root), DataConfig(negative_prompts=0.5), 64)
    every = site_training_set(_own(synthetic_root), DataConfig(negative_prompts=0.5, negative_phrases=1.0), 64)
    classes = [plain.negative_class(i) for i in range(len(plain))]
    assert [every.negative_class(i) for i in range(len(every))] == classes
    phrases = {"breast tumour": "a breast tumour in an ultrasound image",
               "retinal blood vessels": "retinal blood vessels in a fundus photograph"}
    assert {"breast tumour", "instrument"} <= set(classes)
    for i, absent in enumerate(classes):
        if absent is None:
            assert every[i]["text"] == plain[i]["text"]
        else:
            assert every[i]["text"] == phrases.get(absent, plain[i]["text"])
            assert every[i]["mask"].sum() == 0 and not every[i]["paired"]
    half = site_training_set(_own(synthetic_root), DataConfig(negative_prompts=0.9, negative_phrases=0.5), 64)
    texts = [half[i]["text"] for i in range(len(half)) if half.negative_class(i) in phrases]
    assert 0 < sum(t in phrases.values() for t in texts) < len(texts)


def test_rehearsal_scenes_are_never_negated_and_batches_carry_paired(synthetic_root):
    own = _own(synthetic_root, "class")
    wrapped = site_training_set(own, DataConfig(rehearsal_scenes=4, negative_prompts=0.9), 64)
    assert own_examples(wrapped) == len(own) < len(wrapped)
    scene_items = range(len(own), len(wrapped))
    assert all(wrapped.negative_class(i) is None and bool(wrapped[i]["paired"]) for i in scene_items)
    assert wrapped[len(own)]["centre"] == SCENE_CENTRE
    batch = next(infinite_batches(make_loader(wrapped, len(wrapped), shuffle=True, seed=0)))
    assert batch["paired"].dtype == torch.bool and batch["paired"].shape == (len(wrapped),)
    assert 0 < int((~batch["paired"]).sum()) <= len(own)
    assert site_training_set(own, DataConfig(), 64) is own  # both off: the set itself


def test_negative_rows_are_left_out_of_the_contrastive_loss():
    torch.manual_seed(0)
    model = build_model("tiny")
    images, masks = torch.rand(4, 3, 128, 128), (torch.rand(4, 1, 128, 128) > 0.7).float()
    out = model(images, ["polyp", "instrument", "polyp", "polyp"])
    _, all_rows = model.compute_loss_terms(out, masks)
    _, kept = model.compute_loss_terms(out, masks, torch.tensor([True, False, True, True]))
    assert "nce" in all_rows and "nce" in kept and not torch.isclose(all_rows["nce"], kept["nce"])
    sub = type(out)(**{**vars(out), "image_embedding": out.image_embedding[[0, 2, 3]],
                       "text_embedding": out.text_embedding[[0, 2, 3]]})
    _, expected = model.compute_loss_terms(sub, masks)
    assert torch.isclose(kept["nce"], expected["nce"])
    _, one = model.compute_loss_terms(out, masks, torch.tensor([True, False, False, False]))
    assert "nce" not in one and torch.isclose(one["dice"], all_rows["dice"])


def test_a_hospital_trains_with_negatives_weighs_its_images_and_scores_plain_sets(synthetic_root):
    data = DataConfig(root=str(synthetic_root), val_fraction=0.25, test_fraction=0.25, augment=False,
                      prompt_mode="class", negative_prompts=0.5)
    settings = from_run_config(to_run_config(FederationConfig(local_steps=2), PartitionConfig(), {"preset": "tiny"},
                                             TrainConfig(batch_size=4, warmup_steps=0), data))
    assert settings.data.negative_prompts == 0.5 and settings.data.negative_classes == CLASSES
    local = load_local_data(settings, parse_node_config({"data-path": str(synthetic_root / "centre_0")}), seed=0)
    assert isinstance(local.train, NegativePrompts) and "paired" not in local.val[0]
    from shared_model.exchange import get_exchanged_state

    model = build_model(settings.model)
    outcome = train_round(model, get_exchanged_state(model), local, settings, server_round=1, partition_id=0)
    assert outcome.metrics["num-examples"] == len(local.train)
    exp = SimpleNamespace(data=data, partition=PartitionConfig(), model={"preset": "tiny"})
    assert isinstance(comparison_dataset(exp, ["centre_0"], "train"), NegativePrompts)
    assert isinstance(comparison_dataset(exp, ["centre_0"], "train", extras=False), PolypDataset)


@pytest.mark.parametrize("data, message", [
    ({"negative_prompts": 1.0}, "x.yaml: data.negative_prompts: must be in [0, 1)"),
    ({"negative_prompts": -0.1}, "x.yaml: data.negative_prompts: must be in [0, 1)"),
    ({"negative_prompts": 0.2, "negative_classes": [" "]}, "x.yaml: data.negative_classes: must name"),
    ({"negative_prompts": 0.2, "negative_phrases": 1.5}, "x.yaml: data.negative_phrases: must be in [0, 1]"),
])
def test_bad_negative_prompt_settings_are_named(data, message):
    parse_experiment({"model": {"preset": "tiny"}, "data": {"negative_prompts": 0.2}}, "x.yaml")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_experiment({"model": {"preset": "tiny"}, "data": data}, "x.yaml")


def test_local_dp_trains_with_negative_prompts(tmp_path, one_thread):
    import json

    from client.app import app as client_app
    from server.loop import FederatedServer
    from shared_model.config import from_run_config
    from simulation.experiment import PROJECT_ROOT, prepare_run
    from simulation.inprocess import InProcessGrid

    exp, run_dir = prepare_run(PROJECT_ROOT / "simulation" / "configs" / "demo.yaml", {
        "federation.num_server_rounds": 1, "federation.local_steps": 2, "federation.fraction_evaluate": 0.0,
        "federation.global_eval": "none", "train.batch_size": 4, "synthetic.per_centre": 8,
        "synthetic.image_size": 64, "data.negative_prompts": 0.5, "model.loss": {"nce": 0.0},
        "privacy": {"local_dp": True, "epsilon": 8.0, "delta": 1e-3, "planned_steps": 2},
    }, tmp_path)
    run_config = exp.run_config()
    FederatedServer(from_run_config(run_config), run_config).run(InProcessGrid(client_app, run_config, 3))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all(r["accepted"] and 0 < r["epsilon"] <= 8.0 for r in train)


def test_promptsam_train_says_what_its_training_set_adds(synthetic_root, tmp_path, capsys, one_thread):
    import yaml

    from cli.main import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {
        "root": str(synthetic_root), "rehearsal_scenes": 2, "negative_prompts": 0.5}}))
    assert main(["train", "--config", str(config), "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"),
                 "--device", "cpu"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("training set: "))
    assert "rehearsal: " in line and "synthetic scene items; negative prompts: 50% of the own items" in line
