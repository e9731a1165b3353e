"""``promptsam evaluate``: which images it scores, the per-centre table and the stored baseline."""

from __future__ import annotations

import json

import pytest
import torch

from shared_model.checkpoint import save_model_checkpoint
from cli.main import main
from shared_model.config import DataConfig
from shared_model.data import list_samples
from shared_model.data.folder import load_mask, resize_mask
from cli.evaluate import (
    baseline_mask,
    choose_split,
    format_centre_table,
    is_training_data,
    training_record,
)
from shared_model.training.metrics import aggregate, segmentation_metrics
from shared_model.modeling.prompt_sam import build_model


def test_which_images_rule(synthetic_root):
    record = training_record(DataConfig(root=str(synthetic_root), centres=["centre_0", "centre_1"]))
    assert record["root"] == str(synthetic_root.resolve()) and record["centres"] == ["centre_0", "centre_1"]
    new_centre = DataConfig(root=str(synthetic_root / "centre_2"))
    same_root = DataConfig(root=str(synthetic_root))
    one_trained = DataConfig(root=str(synthetic_root / "centre_1"))
    assert not is_training_data(new_centre, record)
    assert is_training_data(same_root, record) and is_training_data(one_trained, record)
    assert choose_split(new_centre, True, None, record)[0] == "all"
    assert choose_split(same_root, True, None, record)[0] == "test"
    assert choose_split(one_trained, True, None, record)[0] == "test"
    assert choose_split(new_centre, True, "val", record) == ("val", "--split val")
    assert choose_split(new_centre, False, None, record) == ("test", "no --data: the test split of the "
                                                                      "checkpoint's training data")
    split, why = choose_split(new_centre, True, None, None)  # the checkpoint does not say what it saw
    assert split == "test" and "does not record its training data" in why and "--split all" in why


def test_centre_table():
    row = {"n": 3, "dice": 0.5, "iou": 0.25, "hd95": 7.0}
    table = format_centre_table({"a": row}, {**row, "n": 5}, {"a": {"dice": 0.125}}, {"dice": 0.2})
    assert table.splitlines() == [
        "| centre | n | Dice | IoU | HD95 (px) | constant-mask Dice |",
        "|---|---|---|---|---|---|",
        "| a | 3 | 0.5000 | 0.2500 | 7.00 | 0.1250 |",
        "| all | 5 | 0.5000 | 0.2500 | 7.00 | 0.2000 |",
    ]
    assert format_centre_table({"a": row}, row, None, None).splitlines()[-1].endswith("| 7.00 | - |")


def test_baseline_only_from_a_stored_training_mask():
    mask, line = baseline_mask({"extra": {}})
    assert mask is None and "not available" in line
    stored = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask, line = baseline_mask({"extra": {"baseline": {"mask": stored, "threshold": 0.3, "train_images": 12}}})
    assert mask is stored and "mean mask of the 12 training images thresholded at 0.3" in line


def test_evaluate_a_new_hospital_folder_scores_every_image(synthetic_root, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(synthetic_root), "--centres", "centre_0", "centre_1",
                 "--steps", "1", "--batch-size", "2", "--out", str(run), "--device", "cpu"]) == 0
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["extra"]["data"]["centres"] == ["centre_0", "centre_1"]
    stored = payload["extra"]["baseline"]
    assert stored["mask"].dtype == torch.bool and stored["mask"].shape == (1, 128, 128)
    assert stored["train_images"] == 10  # 2 centres x (8 - 1 val - 2 test)
    capsys.readouterr()

    out = tmp_path / "new.json"
    hospital = synthetic_root / "centre_2"
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--data", str(hospital),
                 "--out", str(out), "--device", "cpu", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "not the checkpoint's training data: every image is scored" in text
    assert f"images: 8 (every image) of {hospital}: centre_2 8" in text
    assert "| centre_2 | 8 |" in text and "| all | 8 |" in text
    assert "constant-mask baseline: the mean mask of the 10 training images" in text
    saved = json.loads(out.read_text())
    assert saved["split"] == "all" and len(saved["per_image"]) == 8
    # The baseline is the stored training mask, scored on this folder's masks (by hand here).
    samples, _ = list_samples(hospital)
    masks = torch.stack([torch.from_numpy(resize_mask(load_mask(s.mask_path), 128))[None] for s in samples])
    expected = aggregate(segmentation_metrics(stored["mask"].expand_as(masks), masks))
    assert saved["constant_mask_baseline"]["by_centre"]["centre_2"]["dice"] == pytest.approx(expected["dice"])

    # The training data keeps the held-out test split (its split settings come from the checkpoint).
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--data", str(synthetic_root),
                 "--centres", "centre_0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "training data: its held-out test split is scored" in text and "images: 2 (the test split)" in text
    assert main(["evaluate", "--checkpoint", str(run / "model.pt"), "--data", str(synthetic_root),
                 "--split", "all", "--device", "cpu"]) == 0
    assert "images: 24 (every image)" in capsys.readouterr().out


def test_checkpoint_without_training_record_scores_the_test_split(synthetic_root, tmp_path, capsys, one_thread):
    ckpt = save_model_checkpoint(tmp_path / "m.pt", build_model("tiny"))
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(synthetic_root / "centre_2"),
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "does not record its training data" in text and "images: 2 (the test split)" in text
    assert "constant-mask baseline: not available" in text and "| centre_2 | 2 |" in text
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(synthetic_root / "centre_9")]) == 2
    assert "centre_9: dataset root folder not found" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(synthetic_root), "--centres", "kvasir"]) == 2
    assert "no centre 'kvasir'; valid centres: ['centre_0', 'centre_1', 'centre_2']" in capsys.readouterr().err


def test_evaluate_prompts_with_the_class_name_unless_the_oracle_is_named(synthetic_root, tmp_path, capsys,
                                                                          one_thread):
    ckpt = save_model_checkpoint(tmp_path / "m.pt", build_model("tiny"))
    hospital = ["--data", str(synthetic_root / "centre_2"), "--device", "cpu"]
    out = tmp_path / "class.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), *hospital, "--out", str(out)]) == 0
    assert 'evaluation prompt: class (the class name "polyp" only' in capsys.readouterr().out
    assert json.loads(out.read_text())["eval_prompt"] == "class"
    assert main(["evaluate", "--checkpoint", str(ckpt), *hospital, "--eval-prompt", "oracle-caption",
                 "--out", str(out)]) == 0
    assert "evaluation prompt: oracle-caption (each image's caption is built from its ground-truth mask" in \
        capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["eval_prompt"] == "oracle-caption" and "optimistic" in saved["prompt"]
    assert main(["evaluate", "--checkpoint", str(ckpt), *hospital, "--eval-prompt", "oracle-caption",
                 "--prompt", "polyp"]) == 2
    assert "--eval-prompt and --prompt" in capsys.readouterr().err
