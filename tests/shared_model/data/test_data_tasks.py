"""Tasks: registry, per-task prompts and captions, and data configs that mix roots and tasks."""

from __future__ import annotations

import numpy as np
import pytest

from cli.evaluate import evaluation_images, is_training_data, training_record
from shared_model.config import (ConfigError, DataConfig, FederationConfig, PartitionConfig, TrainConfig, check_data,
                                 from_dict, from_run_config, to_run_config)
from shared_model.config.experiment import parse_experiment
from shared_model.config.site import BUILTIN_TASKS
from shared_model.data import PolypDataset, build_datasets, list_samples
from shared_model.data.captions import attribute_caption, network_caption, object_caption
from shared_model.data.folder import DataError
from shared_model.data.sources import class_names, list_config_samples
from shared_model.data.splits import split_samples
from shared_model.data.synthetic import generate_dataset
from shared_model.data.tasks import BREAST_TUMOUR, POLYP, RETINAL_VESSELS, TASKS, get_task, user_task
from shared_model.training.evaluate import _class_view
from simulation.experiment import PROJECT_ROOT


def _data(raw: dict) -> DataConfig:
    """A data config parsed and checked as a YAML ``data:`` section is."""
    cfg = from_dict(DataConfig, raw, "data")
    check_data(cfg)
    return cfg


def _disc(size, cy, cx, r):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _grey(mask, inside, outside):
    image = np.full((*mask.shape, 3), outside, np.uint8)
    image[mask] = inside
    return image


def _vessel_tree(size, width, spacing=64):
    """A grid of crossing lines ``width`` pixels wide, ``spacing`` apart: a network, no blob."""
    mask = np.zeros((size, size), bool)
    for start in range(spacing // 2, size, spacing):
        mask[start: start + width, 4:-4] = True
        mask[4:-4, start: start + width] = True
    return mask


def test_registry_names_and_unknown_task():
    assert tuple(TASKS) == BUILTIN_TASKS == ("polyp", "breast-tumour", "retinal-vessels")
    assert get_task("breast-tumour").modality == "ultrasound"
    with pytest.raises(ValueError, match=r"unknown task 'busi'; valid tasks: \['breast-tumour', 'polyp'"):
        get_task("busi")
    assert POLYP.phrase() == "a polyp in a colonoscopy image"
    assert BREAST_TUMOUR.phrase() == "a breast tumour in an ultrasound image"
    assert RETINAL_VESSELS.phrase() == "retinal blood vessels in a fundus photograph"
    assert user_task("skin", "skin lesion", "dermoscopy").image_noun == "a dermoscopy image"
    assert user_task("eye", "lesion", "OCT").phrase() == "a lesion in an OCT image"


def test_class_prompts_are_the_class_names_and_polyp_captions_are_unchanged():
    assert [t.class_prompt() for t in TASKS.values()] == ["polyp", "breast tumour", "retinal blood vessels"]
    assert BREAST_TUMOUR.class_prompt("lesion") == "lesion"
    mask = _disc(100, 20, 20, 9)
    image = _grey(mask, (180, 60, 50), (200, 120, 110))
    assert POLYP.caption(mask, image) == attribute_caption(mask, image) == (
        "one small red round polyp, located in the top left of the image")


def test_object_caption_uses_brightness_and_the_modality():
    mask = _disc(100, 20, 20, 9)  # 2.6 % of the image, top left
    dark = BREAST_TUMOUR.caption(mask, _grey(mask, 40, 120))
    assert dark == "one small dark round breast tumour, located in the top left of an ultrasound image"
    bright = object_caption(mask, _grey(mask, 200, 120), "cyst", "an ultrasound image")
    assert bright == "one small bright round cyst, located in the top left of an ultrasound image"
    same = object_caption(mask, _grey(mask, 118, 120), "cyst", "an ultrasound image")
    assert same == "one small round cyst, located in the top left of an ultrasound image"
    two = mask | _disc(100, 72, 72, 24)
    caption = BREAST_TUMOUR.caption(two, _grey(two, 40, 120))
    assert caption == ("two breast tumours: a large dark round one in the bottom right and a small dark round one "
                       "in the top left of an ultrasound image")
    assert BREAST_TUMOUR.caption(np.zeros((50, 50), bool), np.zeros((50, 50, 3), np.uint8)) == (
        "no breast tumour visible in an ultrasound image")


def test_network_caption_density_and_thickness_not_objects():
    thin = _vessel_tree(256, 2)
    assert 0.05 < thin.mean() < 0.075
    caption = RETINAL_VESSELS.caption(thin, np.zeros((256, 256, 3), np.uint8))
    assert caption == "a sparse network of thin retinal blood vessels in a fundus photograph"
    dense = _vessel_tree(256, 12, spacing=128)
    assert dense.mean() >= 0.09
    assert network_caption(dense, "vessels", "a fundus photograph") == (
        "a dense network of thick vessels in a fundus photograph")  # 12 px of 256 = 4.7 % >= 4 %
    middling = _vessel_tree(256, 3)
    assert 0.075 <= middling.mean() < 0.09
    assert network_caption(middling, "vessels", "a fundus photograph") == (
        "a network of thin vessels in a fundus photograph")
    for word in ("polyp", "round", "oval", "one "):
        assert word not in caption


def test_sources_parse_strictly_and_name_the_field():
    raw = {"sources": [{"root": "a", "centres": ["x"]}, {"root": "b", "task": "breast-tumour"}]}
    cfg = from_dict(DataConfig, raw, "data")
    check_data(cfg)
    assert cfg.sources[0].task == "polyp" and cfg.sources[1].centres == []
    bad = [
        ({"sources": [{"rooot": "a"}]}, r"data.sources\[0\]: unknown key\(s\) \['rooot'\]"),
        ({"sources": [{"root": "a", "task": "busi"}]}, r"data.sources\[0\].task: 'busi' is not a task; valid: "),
        ({"sources": [{"root": ""}]}, r"data.sources\[0\].root: must name a folder"),
        ({"root": "elsewhere", "sources": [{"root": "a"}]}, r"data.root: leave it unset when data.sources is given"),
        ({"task": "breast-tumour", "sources": [{"root": "a"}]}, r"data.task: leave it unset"),
        ({"task": "vessels"}, r"data.task: 'vessels' is not a task"),
        ({"tasks": [{"name": "polyp", "class_name": "p", "modality": "m"}]},
         r"data.tasks\[0\].name: 'polyp' is already"),
        ({"tasks": [{"name": "s", "class_name": "", "modality": "m"}]}, r"data.tasks\[0\].class_name: must be"),
        ({"tasks": [{"name": "s", "class_name": "c", "modality": "m", "caption": "polyp"}]},
         r"data.tasks\[0\].caption: 'polyp' not in \['objects', 'network'\]"),
        ({"class_name": " "}, r"data.class_name: must be a non-empty string"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            check_data(from_dict(DataConfig, data, "data"))


@pytest.fixture
def two_roots(tmp_path):
    """A polyp root with centre ``endo`` and a second root with centres ``us_a``, ``us_b``."""
    polyp = generate_dataset(tmp_path / "polyp", ["endo"], per_centre=6, image_size=32, seed=1)
    other = generate_dataset(tmp_path / "other", ["us_a", "us_b"], per_centre=5, image_size=32, seed=2)
    return polyp, other


def test_mixed_sources_carry_their_task_into_prompts_and_captions(two_roots):
    polyp, other = two_roots
    cfg = _data({"sources": [{"root": str(polyp), "task": "polyp"},
                             {"root": str(other), "centres": ["us_b"], "task": "breast-tumour"}],
                 "prompt_mode": "class", "augment": False, "val_fraction": 0.2, "test_fraction": 0.2})
    samples, skipped = list_config_samples(cfg)
    assert not skipped and [s.centre for s in samples] == ["endo"] * 6 + ["us_b"] * 5
    assert {s.centre: s.task.name for s in samples} == {"endo": "polyp", "us_b": "breast-tumour"}
    # The split of the mix is the union of each source's own split (per centre, as before).
    alone, _ = list_samples(other, ["us_b"])
    mixed = split_samples(samples, 0.2, 0.2, 0)
    assert [s.key for s in split_samples(alone, 0.2, 0.2, 0)["test"]] == [
        s.key for s in mixed["test"] if s.centre == "us_b"]
    train = build_datasets(cfg, 32)["train"]
    texts = {item["centre"]: item["text"] for item in (train[i] for i in range(len(train)))}
    assert texts == {"endo": "polyp", "us_b": "breast tumour"} and train.class_name is None
    captions = PolypDataset(samples, 32, prompt_mode="attributes")
    by_centre = {captions[i]["centre"]: captions[i]["text"] for i in range(len(captions))}
    assert by_centre["endo"].endswith("of the image") and "polyp" in by_centre["endo"]
    assert by_centre["us_b"].endswith("of an ultrasound image") and "polyp" not in by_centre["us_b"]
    assert class_names(cfg) == "polyp, breast tumour"
    overridden = PolypDataset(samples, 32, prompt_mode="class", class_name="lesion")
    assert {overridden[i]["text"] for i in range(len(overridden))} == {"lesion"}
    # The "class-name" prompt style of a mixed set: each item's own class name, not "polyp".
    view = _class_view(captions)
    assert {view[i]["centre"]: view[i]["text"] for i in range(len(view))} == {"endo": "polyp", "us_b": "breast tumour"}
    assert _class_view(PolypDataset(alone, 32)) is None and PolypDataset(alone, 32).class_name == "polyp"


def test_single_root_form_is_polyp_by_default_and_takes_a_user_task(two_roots):
    polyp, other = two_roots
    samples, _ = list_config_samples(DataConfig(root=str(polyp)))
    assert samples == list_samples(polyp)[0] and {s.task for s in samples} == {POLYP}
    cfg = _data({"root": str(other), "task": "skin", "prompt_mode": "attributes",
                 "tasks": [{"name": "skin", "class_name": "skin lesion", "modality": "dermoscopy"}]})
    samples, _ = list_config_samples(cfg)
    dataset = PolypDataset(samples, 32)
    assert dataset.class_name == "skin lesion" and dataset[0]["text"].endswith("of a dermoscopy image")


def test_sources_centre_names_must_be_distinct_and_centres_restrict(two_roots, tmp_path):
    polyp, other = two_roots
    clash = generate_dataset(tmp_path / "clash", ["endo"], per_centre=2, image_size=32)
    with pytest.raises(DataError, match=r"centre 'endo' is also in .*polyp; centre names must be distinct"):
        list_config_samples(_data({"sources": [{"root": str(polyp)}, {"root": str(clash)}]}))
    with pytest.raises(DataError, match="listed by two sources"):
        list_config_samples(_data({"sources": [{"root": str(polyp)}, {"root": str(polyp / "endo")}]}))
    cfg = _data({"sources": [{"root": str(polyp)}, {"root": str(other), "task": "breast-tumour"}],
                 "centres": ["us_a", "endo"]})
    assert sorted({s.centre for s in list_config_samples(cfg)[0]}) == ["endo", "us_a"]
    cfg.centres = ["us_c"]
    with pytest.raises(DataError, match=r"data.centres: no centre 'us_c' in data.sources; valid centres: \['endo'"):
        list_config_samples(cfg)


def test_experiment_resolves_source_roots_and_the_run_config_carries_them():
    exp = parse_experiment({"model": {"preset": "tiny"}, "data": {"sources": [
        {"root": "../shared/data/polyp", "centres": ["kvasir_seg"]},
        {"root": "../shared/data/tasks", "centres": ["busi"], "task": "breast-tumour"}]}})
    roots = [s.root for s in exp.data.sources]
    assert roots == [str((PROJECT_ROOT / r).resolve()) for r in ("../shared/data/polyp", "../shared/data/tasks")]
    assert exp.data.root == "../shared/data/polyp"  # not read with sources; keeps its default
    rc = to_run_config(FederationConfig(), PartitionConfig(), {"preset": "tiny"}, TrainConfig(), exp.data)
    assert from_run_config(rc).data == exp.data


def test_a_checkpoint_record_of_sources_finds_its_folders_and_their_task(two_roots, tmp_path):
    polyp, other = two_roots
    cfg = _data({"sources": [{"root": str(polyp)}, {"root": str(other), "task": "breast-tumour"}],
                 "val_fraction": 0.2, "test_fraction": 0.4})
    record = training_record(cfg)
    assert [s["root"] for s in record["sources"]] == [str(polyp.resolve()), str(other.resolve())]
    assert is_training_data(DataConfig(root=str(other / "us_a")), record)
    assert not is_training_data(DataConfig(root=str(generate_dataset(tmp_path / "new", ["x"], 2, 32))), record)
    payload = {"extra": {"data": record}}
    dataset, split, lines = evaluation_images(payload, 32, data_arg=str(other / "us_a"))
    assert split == "test" and {s.centre for s in dataset.samples} == {"us_a"}
    assert {s.task.name for s in dataset.samples} == {"breast-tumour"}
    assert dataset[0]["text"] == "breast tumour" and 'class (the class name "breast tumour"' in lines[2]
    whole, split, lines = evaluation_images(payload, 32)  # no --data: the test split of every source
    assert {s.centre for s in whole.samples} == {"endo", "us_a", "us_b"}
    assert 'class (the class name "polyp, breast tumour"' in lines[2]
    assert f"of {polyp.resolve()} + {other.resolve()}: endo " in lines[1]
