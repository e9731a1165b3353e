"""Evaluation under several text-prompt styles: numbers per style, the prompts that reach the model,
the deltas against the attribute captions, the Markdown table and the ``evaluate --prompt-styles`` CLI."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from shared_model.checkpoint import save_model_checkpoint
from cli.main import PROMPT_STYLE_NAMES, main
from shared_model.config import DataConfig
from shared_model.data import attribute_caption, build_datasets
from shared_model.training.evaluate import (
    CAPTION_STYLE,
    PROMPT_STYLES,
    evaluate_model,
    evaluate_prompt_styles,
    format_prompt_table,
)
from shared_model.modeling.prompt_sam import build_model

CONSTANT = {"class-name": "polyp", "generic": "a medical image", "wrong-organ": "a breast tumour in an ultrasound image",
            "empty": ""}


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


def _test_set(root, **kwargs):
    cfg = DataConfig(root=str(root), centres=["centre_0"], val_fraction=0.0, test_fraction=0.5, augment=False,
                     **kwargs)
    return build_datasets(cfg, 128)["test"]


def test_every_style_yields_metrics_and_class_name_equals_evaluate_model(model, synthetic_root):
    data = _test_set(synthetic_root)
    results = evaluate_prompt_styles(model, data, batch_size=4)
    assert list(results) == list(PROMPT_STYLES) == list(PROMPT_STYLE_NAMES)
    caption_dice = results[CAPTION_STYLE]["dice"]
    for style, row in results.items():
        assert row["n"] == len(data) == 4
        for key in ("dice", "iou", "hd95", "precision", "recall"):
            assert math.isfinite(row[key]), (style, key)
        assert row["delta_dice_vs_caption"] == pytest.approx(row["dice"] - caption_dice, abs=1e-12)
        assert 0.0 <= row["mean_abs_image_delta_vs_caption"] <= 1.0
    assert results[CAPTION_STYLE]["delta_dice_vs_caption"] == 0.0
    assert {s: results[s]["prompt"] for s in CONSTANT} == CONSTANT
    reference = evaluate_model(model, data, batch_size=4, prompt="polyp").aggregate
    assert {k: results["class-name"][k] for k in reference} == reference


def test_each_style_sends_its_own_prompt_to_the_text_encoder(model, synthetic_root, monkeypatch):
    # A class-mode dataset with another class noun: the caption style must still send captions.
    data = _test_set(synthetic_root, prompt_mode="class", class_name="lesion")
    expected_captions = []
    for i in range(len(data)):
        item = data[i]
        image = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected_captions.append(attribute_caption(item["mask"][0].numpy() > 0.5, image, "lesion"))
    seen: list[str] = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts: (seen.extend(texts), original(texts))[1])
    for style in PROMPT_STYLES:
        seen.clear()
        evaluate_prompt_styles(model, data, styles=[style], batch_size=3)
        if style == CAPTION_STYLE:
            assert seen == expected_captions
            assert all("lesion" in c and c != "lesion" for c in seen)
        else:
            assert seen == [CONSTANT[style].replace("polyp", "lesion")] * len(data), style
    assert data[0]["text"] == "lesion"  # the caption view did not change the dataset itself


class _TextGatedModel(nn.Module):
    """Predicts all foreground when the prompt mentions a polyp, else all background."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    uses_saliency_boxes = False
    uses_mask_boxes = False

    def oracle_prompts(self, masks):
        return {}

    def forward(self, images, texts):
        on = torch.tensor(["polyp" in t for t in texts], dtype=torch.float32)
        logits = (on * 20 - 10)[:, None, None, None].expand(len(texts), 1, *images.shape[-2:])
        return SimpleNamespace(mask_logits=logits)


def test_deltas_follow_a_text_dependent_model(synthetic_root):
    data = _test_set(synthetic_root)
    results = evaluate_prompt_styles(_TextGatedModel(), data, batch_size=4)
    masks = [data[i]["mask"] > 0.5 for i in range(len(data))]
    full = np.mean([2 * float(m.sum()) / (float(m.sum()) + m.numel()) for m in masks])
    for style in ("class-name", CAPTION_STYLE):
        assert results[style]["dice"] == pytest.approx(full)
    for style in ("generic", "wrong-organ", "empty"):
        assert results[style]["dice"] == 0.0
        assert results[style]["delta_dice_vs_caption"] == pytest.approx(-full)
        assert results[style]["mean_abs_image_delta_vs_caption"] == pytest.approx(full)
    without_caption = evaluate_prompt_styles(_TextGatedModel(), data, styles=["empty", "class-name"])
    assert list(without_caption) == ["empty", "class-name"]
    assert without_caption["empty"]["delta_dice_vs_caption"] is None


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match=r"unknown prompt style\(s\) \['bogus'\].*wrong-organ"):
        evaluate_prompt_styles(_TextGatedModel(), [], styles=["generic", "bogus"])


def test_format_prompt_table():
    row = {"dice": 0.5, "iou": 0.33, "hd95": 12.0, "n": 4, "delta_dice_vs_caption": -0.25,
           "mean_abs_image_delta_vs_caption": 0.3}
    table = format_prompt_table({
        CAPTION_STYLE: {**row, "prompt": "<per-image attribute caption>", "delta_dice_vs_caption": 0.0},
        "generic": {**row, "prompt": "a | b"},
        "empty": {**row, "prompt": "", "delta_dice_vs_caption": None, "mean_abs_image_delta_vs_caption": None},
    })
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| prompt style | prompt | Dice |")
    assert all(line.count("|") - line.count("\\|") == 9 for line in lines)
    assert '| generic | "a \\| b" | 0.5000 | 0.3300 | 12.00 | 4 | -0.2500 | 0.3000 |' in lines
    assert lines[-1] == '| empty | "" | 0.5000 | 0.3300 | 12.00 | 4 | - | - |'


def test_cli_evaluate_prompt_styles(synthetic_root, tmp_path, capsys):
    ckpt = save_model_checkpoint(tmp_path / "m.pt", build_model("tiny"))
    out = tmp_path / "styles.json"
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(synthetic_root), "--centres", "centre_0",
            "--device", "cpu", "--batch-size", "4"]
    assert main([*args, "--styles", "class-name", "empty", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert '| class-name | "polyp" |' in table and '| empty | "" |' in table
    saved = json.loads(out.read_text())
    assert list(saved["styles"]) == ["class-name", "empty"] and saved["split"] == "test"
    assert saved["styles"]["class-name"]["n"] == 2
    assert main([*args, "--prompt-styles", "--prompt", "polyp"]) == 2
    assert "--prompt and --prompt-styles" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--styles", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
