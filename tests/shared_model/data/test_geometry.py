"""Letterbox / squash placement of images in the model input, and scoring at the mask's own size."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.data.dataset import evaluation_dataset
from shared_model.data.folder import list_samples
from shared_model.data.geometry import Frame
from shared_model.training.evaluate import evaluate_model, score_constant_mask


def test_letterbox_keeps_the_aspect_ratio_squash_does_not():
    assert Frame(1024, 1280, 128).content == (102, 128)
    assert Frame(288, 384, 128).content == (96, 128)
    assert Frame(500, 250, 128).content == (128, 64)
    assert Frame(1024, 1280, 128, "squash").content == (128, 128)
    with pytest.raises(ValueError, match="resize mode"):
        Frame(10, 10, 8, "crop")


def test_mask_there_and_back_again():
    mask = np.zeros((288, 384), bool)
    mask[100:200, 50:150] = True
    frame = Frame(288, 384, 128)
    small = frame.mask(mask)
    assert small.shape == (128, 128) and not small[96:].any()  # the padding is background
    back = frame.to_image(torch.from_numpy(small)[None].float())[0] > 0.5
    assert back.shape == (288, 384)
    inter, union = (back.numpy() & mask).sum(), (back.numpy() | mask).sum()
    assert inter / union > 0.95


def test_coordinates_round_trip():
    frame = Frame(1024, 1280, 128)
    box = torch.tensor([[100.0, 200.0, 640.0, 1000.0]])
    assert torch.allclose(frame.to_image_xy(frame.to_input_xy(box)), box, atol=1e-3)
    assert frame.to_input_xy(torch.tensor([[1280.0, 1024.0]])).tolist() == [[128.0, pytest.approx(102.0)]]


class MaskFromRedChannel(torch.nn.Module):
    """A stand-in model whose prediction is the image's red channel (the test images draw the mask in red)."""

    uses_saliency_boxes = False
    uses_mask_boxes = False

    def oracle_prompts(self, masks):
        return {}

    def forward(self, images, texts):
        return SimpleNamespace(mask_logits=(images[:, :1] > 0.5).float() * 20 - 10)


def _write_pairs(root, sizes):
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 3: w // 3 + w // 5] = 255
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = mask
        for sub, arr in (("images", image), ("masks", mask)):
            (root / "c" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / "c" / sub / f"s{i}.png")


def test_original_resolution_scores_the_full_size_mask(tmp_path):
    _write_pairs(tmp_path, [(288, 384), (1024, 1280), (300, 200)])
    samples, _ = list_samples(tmp_path)
    ds = evaluation_dataset(samples, 64)
    model = MaskFromRedChannel()
    at_model = evaluate_model(model, ds, batch_size=2, amp=False)
    at_original = evaluate_model(model, ds, batch_size=2, amp=False, resolution="original")
    assert at_original.resolution == "original" and at_model.resolution == "model"
    assert at_model.aggregate["dice"] > 0.99  # bilinear image vs nearest mask: a pixel differs at edges
    assert at_original.aggregate["dice"] > 0.95  # resizing a 64 px prediction back loses a little
    # HD95 is in each image's own pixels: a 1280-wide frame's errors are ~20x those of its 64 px input.
    big = next(r for r in at_original.per_image if r["stem"] == "s1")
    assert 0 < big["hd95"] < 40
    const = torch.zeros(1, 64, 64, dtype=torch.bool)
    scored = score_constant_mask(const, ds, resolution="original")
    assert scored.aggregate["dice"] == 0.0 and scored.per_image[1]["hd95"] == pytest.approx(np.hypot(1024, 1280))


def test_original_resolution_needs_a_dataset_that_knows_its_frames():
    items = [{"image": torch.zeros(3, 8, 8), "mask": torch.zeros(1, 8, 8), "text": "", "stem": "a", "centre": "c"}]
    with pytest.raises(ValueError, match="frame"):
        evaluate_model(MaskFromRedChannel(), items, resolution="original")
