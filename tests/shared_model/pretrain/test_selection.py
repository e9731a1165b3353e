"""Tests for shared_model.pretrain.selection: named vs other Dice on hand-made masks, the kind /
attribute split, and the scene loop's wiring (an oracle scores named 1 / other 0, a predictor that
always answers another target scores the reverse)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli import selection as selection_cli
from shared_model.config import ConfigError
from shared_model.data.scene_dataset import generate_scenes, scene_items
from shared_model.modeling.foundation import ASSETS
from shared_model.pretrain import selection as S


def _mask(*slices) -> np.ndarray:
    m = np.zeros((8, 8), bool)
    for rows, cols in slices:
        m[rows, cols] = True
    return m


A = _mask((slice(0, 4), slice(0, 4)))  # 16 px
B = _mask((slice(4, 8), slice(4, 8)))  # 16 px
C = _mask((slice(0, 2), slice(6, 8)))  # 4 px


def test_dice_on_hand_made_masks():
    empty = np.zeros((8, 8), bool)
    assert S.dice(A, A) == 1.0 and S.dice(A, B) == 0.0 and S.dice(empty, empty) == 1.0
    half = _mask((slice(0, 2), slice(0, 4)))  # 8 px inside A
    assert S.dice(half, A) == pytest.approx(2 * 8 / 24)


def test_named_against_the_best_matching_other_target():
    exact = S.score_prediction(A, [A, B, C], named=0)
    assert exact["named"] == 1.0 and exact["other"] == 0.0 and exact["dice"] == [1.0, 0.0, 0.0]
    wrong = S.score_prediction(B, [A, B, C], named=0)  # the model segments another target
    assert wrong["named"] == 0.0 and wrong["other"] == 1.0 and wrong["other_mean"] == 0.5
    both = S.score_prediction(A | C, [A, B, C], named=2)  # the named one and a larger one
    assert both["named"] == pytest.approx(2 * 4 / 24) and both["other"] == pytest.approx(2 * 16 / 36)
    assert both["other_mean"] == pytest.approx((2 * 16 / 36 + 0.0) / 2)
    with pytest.raises(ValueError, match="at least two targets"):
        S.score_prediction(A, [A], named=0)


def test_summary_splits_kind_and_attribute_prompts():
    rows = [{"rule": "kind", "named": 0.9, "other": 0.1, "other_mean": 0.1},
            {"rule": "kind", "named": 0.7, "other": 0.1, "other_mean": 0.05},
            {"rule": "size", "named": 0.6, "other": 0.5, "other_mean": 0.3},
            {"rule": "location", "named": 0.4, "other": 0.3, "other_mean": 0.2}]
    s = S.summarise(rows, margin=0.3)
    assert list(s) == ["kind", "attribute", "size", "location"]  # no colour rows: no colour entry
    assert s["kind"]["n"] == 2 and s["kind"]["named"] == pytest.approx(0.8) and s["kind"]["other"] == pytest.approx(0.1)
    assert s["kind"]["difference"] == pytest.approx(0.7) and s["kind"]["meets_margin"]
    assert s["kind"]["other_mean"] == pytest.approx(0.075)
    assert s["attribute"]["n"] == 2 and s["attribute"]["named"] == pytest.approx(0.5)
    assert s["attribute"]["difference"] == pytest.approx(0.1) and not s["attribute"]["meets_margin"]
    assert s["size"]["n"] == 1 and s["location"]["difference"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown prompt rule"):
        S.summarise([{"rule": "shape", "named": 1.0, "other": 0.0, "other_mean": 0.0}])
    table = S.format_selection_table(s).splitlines()
    assert table[2] == "| kind | 2 | 0.800 | 0.100 | +0.700 | 0.075 |"
    assert table[4].startswith("|   size | 1 |")


def _answering(scenes, pick):
    """A predictor that knows the scenes: for an image and a text, the mask of target ``pick(scene, named)``."""
    lookup = {}
    for scene in scenes:
        for prompt in scene.prompts:
            lookup[(scene.image.tobytes(), prompt.text)] = scene.targets[pick(scene, prompt.target)].mask

    def predict(images: torch.Tensor, texts):
        out = []
        for image, text in zip(images, texts):
            key = (image.mul(255).round().byte().permute(1, 2, 0).numpy().tobytes(), text)
            out.append(torch.from_numpy(lookup[key]).float()[None])
        return torch.stack(out)

    return predict


@pytest.mark.parametrize("batch_size", [1, 5])
def test_scene_loop_scores_the_named_target(batch_size):
    scenes = generate_scenes(4, 64, seed=7)
    items = scene_items(scenes)
    oracle = S.text_selection(_answering(scenes, lambda s, named: named), 4, 64, seed=7, batch_size=batch_size)
    assert oracle["prompts"] == len(items) and len(oracle["items"]) == len(items)
    assert {r["text"] for r in oracle["items"]} == {i.text for i in items}
    for group in ("kind", "attribute"):
        if group in oracle["summary"]:
            assert oracle["summary"][group]["named"] == 1.0 and oracle["summary"][group]["other"] == 0.0
    assert sum(oracle["summary"][g]["n"] for g in S.GROUPS if g in oracle["summary"]) == len(items)
    other = lambda s, named: next(i for i in range(len(s.targets)) if i != named)  # noqa: E731
    wrong = S.text_selection(_answering(scenes, other), 4, 64, seed=7, batch_size=batch_size)
    for group, s in wrong["summary"].items():
        assert s["named"] == 0.0 and s["other"] == 1.0 and not s["meets_margin"], group


def test_scene_loop_refuses_bad_counts_and_shapes():
    with pytest.raises(ValueError, match="scenes: must be >= 1"):
        S.text_selection(lambda im, t: torch.zeros(len(t), 1, 64, 64), 0, 64)
    with pytest.raises(ValueError, match="predictor returned"):
        S.text_selection(lambda im, t: torch.zeros(len(t), 1, 32, 32), 1, 64)


def test_held_out_seed_and_cli_defaults():
    assert S.pretraining_scene_seed(ASSETS / "tiny") == 0  # simulation/configs/pretrain_tiny.yaml
    with pytest.raises(ConfigError, match="--scene-seed 0: the foundation 'tiny' was pre-trained"):
        S.check_held_out(0, 0, "the foundation 'tiny'")
    S.check_held_out(S.DEFAULT_SCENE_SEED, 0, "the foundation 'tiny'")
    S.check_held_out(0, None, "a model without a foundation")
    assert (selection_cli.DEFAULT_SCENE_SEED, selection_cli.DEFAULT_MARGIN) == (S.DEFAULT_SCENE_SEED,
                                                                                 S.DEFAULT_MARGIN)
