"""The prompt-path switches of the ablation: what runs, what trains, where the boxes come from."""

import pytest
import torch

from shared_model.config import ConfigError, get_preset, merge
from shared_model.modeling.boxes import box_agreement, mask_boxes
from shared_model.modeling.prompt_sam import build_model

SAMED = {"prompts": {"text_tokens": 0, "dense_saliency": False, "use_boxes": False}}
TEXT_ONLY = {"prompts": {"dense_saliency": False, "use_boxes": False}}
ORACLE = {"prompts": {"box_source": "ground-truth"}}
CASCADE = {"prompts": {"box_source": "mask"}}


def _model(overrides):
    return build_model(merge(get_preset("tiny"), overrides, "model")).train()


def _batch(b=2, s=128):
    images = torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(b, 1, s, s)
    masks[0, :, 40:90, 30:80] = 1
    masks[1, :, 10:20, 100:128] = 1
    return images, masks, ["polyp"] * b


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_samed_style_runs_no_clip_branch_and_trains_only_sam():
    model = _model(SAMED)
    assert not model.uses_text and not model.uses_saliency
    assert _trainable(model.clip_text) == _trainable(model.clip_vision) == _trainable(model.bottleneck) == 0
    assert _trainable(model.prompts) == 0 and _trainable(model.sam) > 0
    images, masks, texts = _batch()
    out = model(images, texts)
    assert out.kl is None and out.text_embedding is None and out.boxes.shape == (2, 0, 4)
    assert torch.count_nonzero(out.saliency) == 0
    loss, parts = model.compute_losses(out, masks)
    assert set(parts) == {"dice", "bce", "iou", "total"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_text_only_trains_the_text_tower_not_the_saliency_branch():
    model = _model(TEXT_ONLY)
    assert model.uses_text and not model.uses_saliency
    assert _trainable(model.clip_text) > 0 and _trainable(model.clip_vision) == _trainable(model.bottleneck) == 0
    images, masks, texts = _batch()
    out = model(images, texts)
    assert out.text_embedding is not None and out.kl is None
    a = model(images, ["polyp", "polyp"]).mask_logits
    b = model(images, ["a breast tumour", "a breast tumour"]).mask_logits
    assert not torch.allclose(a, b)  # the text reaches SAM through the sparse tokens


def test_ground_truth_boxes_are_the_masks_enclosing_boxes():
    model = _model(ORACLE)
    images, masks, texts = _batch()
    kwargs = model.oracle_prompts(masks)
    assert kwargs["boxes"].tolist() == [[[30.0, 40.0, 80.0, 90.0]], [[100.0, 10.0, 128.0, 20.0]]]
    out = model(images, texts, **kwargs)
    assert torch.equal(out.boxes, kwargs["boxes"])
    assert build_model("tiny").oracle_prompts(masks) == {}  # saliency boxes: nothing to pass
    with pytest.raises(ConfigError, match="box_source"):
        _model({"prompts": {"box_source": "clicks"}})


def test_cascade_prompts_the_second_pass_with_the_box_of_the_first_mask():
    model = _model(CASCADE)
    assert model.uses_mask_boxes and not model.uses_saliency_boxes and model.oracle_prompts(torch.ones(1)) == {}
    images, masks, texts = _batch()
    out = model.eval()(images, texts)
    expected, valid = mask_boxes((out.coarse_logits > 0).float())
    assert torch.equal(out.boxes, expected) and valid.all() and out.boxes.shape == (2, 1, 4)
    # The second pass is the box-prompted one: the same box given by hand gives the same mask.
    by_hand = model(images, texts, boxes=out.boxes)
    again = model(images, texts)
    assert torch.allclose(again.mask_logits, by_hand.mask_logits, atol=1e-5)
    assert not torch.allclose(again.coarse_logits, again.mask_logits)
    # Both passes are trained: the coarse mask has its own loss term, and user prompts skip the cascade.
    model.train()
    loss, parts = model.compute_losses(model(images, texts), masks)
    assert "coarse" in parts and parts["total"] > parts["dice"]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model(images, texts, boxes=torch.tensor([[[0.0, 0.0, 64.0, 64.0]]] * 2)).coarse_logits is None
    assert build_model("tiny")(images, texts).coarse_logits is None


def test_mask_boxes_of_an_empty_mask_is_the_whole_image():
    boxes, valid = mask_boxes(torch.zeros(1, 1, 16, 16))
    assert boxes.tolist() == [[[0.0, 0.0, 16.0, 16.0]]] and valid.all()


def test_box_agreement_hand_computed():
    masks = torch.zeros(2, 1, 10, 10)
    masks[:, :, 0:4, 0:4] = 1  # 16 pixels, box [0, 0, 4, 4]
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 2.0]], [[5.0, 5.0, 10.0, 10.0]]])
    rows = box_agreement(boxes, torch.ones(2, 1, dtype=torch.bool), masks)
    assert rows[0] == {"box_iou": pytest.approx(0.5), "box_hit": 1.0, "box_coverage": pytest.approx(0.5)}
    assert rows[1] == {"box_iou": 0.0, "box_hit": 0.0, "box_coverage": 0.0}
    none = box_agreement(boxes, torch.zeros(2, 1, dtype=torch.bool), masks)
    assert none[0]["box_coverage"] == 0.0
