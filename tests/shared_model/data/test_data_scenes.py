"""Synthetic scenes: determinism, disjoint target masks, prompts that name one target and whose words
match the masks and pixels (checked here from the masks, not from the generator's bookkeeping)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cli.main import main
from shared_model.data import list_samples
from shared_model.data.captions import axis_ratio, location_word
from shared_model.data.scene_dataset import SceneDataset, generate_scenes, scene_items, write_scenes
from shared_model.data.scenes import LOCATION_MARGIN, SIZE_RATIO, synthetic_scene

SIZE = 96
FRAMES = 60


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(FRAMES, SIZE, seed=3)


def _area(mask):
    return mask.mean()


def _green_over_red(image, mask):
    mean = image[mask].reshape(-1, 3).astype(float).mean(0)
    return mean[1] / mean[0]


def test_same_seed_same_scenes_and_frames_are_independent():
    a = synthetic_scene(np.random.default_rng([5, 2]), SIZE)
    b = synthetic_scene(np.random.default_rng([5, 2]), SIZE)
    assert np.array_equal(a.image, b.image) and a.prompts == b.prompts
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.targets, b.targets))
    c = synthetic_scene(np.random.default_rng([6, 2]), SIZE)
    assert not np.array_equal(a.image, c.image)
    short, long = generate_scenes(2, SIZE, seed=5), generate_scenes(3, SIZE, seed=5)
    assert np.array_equal(short[1].image, long[1].image) and np.array_equal(long[2].image, a.image)


def test_targets_are_disjoint_non_empty_and_at_least_two(scenes):
    for scene in scenes:
        masks = np.stack([t.mask for t in scene.targets])
        assert len(scene.targets) >= 2 and masks.any((1, 2)).all()
        assert masks.sum(0).max() == 1  # no pixel in two targets
        kinds = [t.kind for t in scene.targets]
        assert kinds.count("instrument") <= 1 and 1 <= kinds.count("polyp") <= 3
        if kinds.count("polyp") == 1:
            assert "instrument" in kinds


def test_instrument_is_elongated_and_enters_from_a_border(scenes):
    for scene in scenes:
        for target in scene.targets:
            border = np.concatenate([target.mask[0], target.mask[-1], target.mask[:, 0], target.mask[:, -1]])
            if target.kind == "instrument":
                assert axis_ratio(target.mask) > 2 and border.any()  # polyps: < 1.5 (b >= 0.7 a)


def test_each_prompt_names_one_target_and_its_words_match_the_masks(scenes):
    seen = set()
    for scene in scenes:
        texts = [p.text for p in scene.prompts]
        assert len(texts) == len(set(texts)) and scene.prompts
        polyps = [i for i, t in enumerate(scene.targets) if t.kind == "polyp"]
        for prompt in scene.prompts:
            named = scene.targets[prompt.target]
            others = [scene.targets[i] for i in polyps if i != prompt.target]
            seen.add(prompt.rule)
            if prompt.text == "the instrument":
                assert named.kind == "instrument"
            elif prompt.text == "the polyp":
                assert named.kind == "polyp" and not others
            else:
                assert named.kind == "polyp" and others, prompt  # attributes only choose between polyps
            if prompt.rule == "size":
                ratios = [_area(named.mask) / _area(o.mask) for o in others]
                if prompt.text == "the large polyp":
                    assert min(ratios) >= SIZE_RATIO
                else:
                    assert max(ratios) <= 1 / SIZE_RATIO
            elif prompt.rule == "colour":
                mine = _green_over_red(scene.image, named.mask)
                theirs = [_green_over_red(scene.image, o.mask) for o in others]
                assert prompt.text in ("the red polyp", "the pale polyp")
                # Pixels, not labels: the red one is the reddest, the pale one the least red.
                assert mine < min(theirs) if prompt.text == "the red polyp" else mine > max(theirs)
            elif prompt.rule == "location":
                ys, xs = np.nonzero(named.mask)
                cy, cx = (ys.mean() + 0.5) / SIZE, (xs.mean() + 0.5) / SIZE
                word = prompt.text.removeprefix("the polyp in the ")
                assert location_word(cy, cx) == word
                if "top" in word:
                    assert cy < 1 / 3 - LOCATION_MARGIN
                if "left" in word:
                    assert cx < 1 / 3 - LOCATION_MARGIN
                if "bottom" in word:
                    assert cy > 2 / 3 + LOCATION_MARGIN
                if "right" in word:
                    assert cx > 2 / 3 + LOCATION_MARGIN
                assert all(o.location != word for o in others)
    assert seen == {"kind", "size", "colour", "location"}


def test_distractor_is_another_target_of_the_frame(scenes):
    for scene in scenes:
        for j, prompt in enumerate(scene.prompts):
            other = scene.distractor(j)
            assert other is not None and other != prompt.target
            if scene.targets[prompt.target].kind == "polyp" and len(scene.targets) > 2:
                assert scene.targets[other].kind == "polyp"  # the hard negative


def test_frame_caption_counts_every_target_and_names_none_in_particular(scenes):
    ds = SceneDataset(FRAMES, SIZE, seed=3)
    words = {1: "a polyp", 2: "two polyps", 3: "three polyps", 4: "four polyps"}
    for i, item in enumerate(ds.items):
        scene = scenes[item.frame]
        caption = ds.frame_caption(i)
        assert caption == scene.caption() and caption.endswith(" in a colonoscopy image")
        polyps = sum(t.kind == "polyp" for t in scene.targets)
        assert caption.startswith(words[polyps] if polyps else "an instrument")
        assert ("an instrument" in caption) == any(t.kind == "instrument" for t in scene.targets)
        assert not any(w in caption for w in ("large", "small", "red", "pale", "left", "right", "the "))


def test_dataset_items_are_polyp_dataset_items_whose_mask_follows_the_text(scenes):
    dataset = SceneDataset(12, SIZE, seed=3)
    assert len(dataset) == len(scene_items(scenes[:12]))
    masks_of_frame: dict[int, list[torch.Tensor]] = {}
    for i in range(len(dataset)):
        item, info = dataset[i], dataset.items[i]
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
        assert torch.equal(item["mask"][0].bool(), torch.from_numpy(scenes[info.frame].targets[info.target].mask))
        assert item["text"] == info.text and item["centre"] == "scenes"
        distractor = dataset.distractor_mask(i)
        assert distractor.sum() > 0 and (distractor * item["mask"]).sum() == 0
        masks_of_frame.setdefault(info.frame, []).append(item["mask"])
    # The same image with different texts asks for different masks.
    assert any(not torch.equal(ms[0], ms[1]) for ms in masks_of_frame.values() if len(ms) > 1)
    assert len({dataset[i]["stem"] for i in range(len(dataset))}) == len(dataset)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and len(batch["text"]) == 4
    only_size = SceneDataset(12, SIZE, seed=3, rules=["size"])
    assert {it.rule for it in only_size.items} == {"size"}
    with pytest.raises(ValueError, match=r"unknown prompt rule\(s\) \['shape'\]"):
        SceneDataset(2, SIZE, rules=["shape"])


def test_written_folder_matches_the_dataset_and_is_a_data_folder(tmp_path):
    out = write_scenes(tmp_path / "scenes", 5, 64, seed=1)
    meta = json.loads((out / "prompts.json").read_text())
    dataset = SceneDataset(5, 64, seed=1)
    assert [m["text"] for m in meta["items"]] == [it.text for it in dataset.items]
    assert meta["generator"] == {"n_frames": 5, "image_size": 64, "seed": 1}
    for k, entry in enumerate(meta["items"]):
        target = np.asarray(Image.open(out / entry["target"])) > 0
        assert np.array_equal(target, dataset[k]["mask"][0].numpy() > 0)
        union = np.asarray(Image.open(out / "masks" / f"{entry['stem']}.png")) > 0
        assert (union | target).sum() == union.sum()  # the target is part of the folder mask
    samples, _ = list_samples(out)
    assert [s.stem for s in samples] == [f"scene_{i:05d}" for i in range(5)]


def test_cli_writes_scenes_and_refuses_a_tiny_size(tmp_path, capsys):
    assert main(["data", "synth-scenes", "--out", str(tmp_path / "s"), "--n", "3", "--size", "64"]) == 0
    assert "wrote 3 scenes of 64 px" in capsys.readouterr().out
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    with pytest.raises(SystemExit):
        main(["data", "synth-scenes", "--out", str(tmp_path / "t"), "--size", "40"])
    assert "argument --size: must be an integer >= 48, got 40" in capsys.readouterr().err


def test_training_loop_and_evaluation_take_scene_items_unchanged(one_thread):
    from shared_model.config import TrainConfig
    from shared_model.modeling.prompt_sam import build_model
    from shared_model.training.evaluate import evaluate_model
    from shared_model.training.loop import train_model

    model = build_model("tiny")
    dataset = SceneDataset(3, model.image_size, seed=0)
    result = train_model(model, dataset, TrainConfig(steps=2, batch_size=2, warmup_steps=0, progress=False))
    assert result.steps == 2 and all(np.isfinite(h["total"]) for h in result.history)
    scored = evaluate_model(model, dataset, batch_size=4)
    assert scored.aggregate["n"] == len(dataset)
