"""``promptsam predict`` on a folder: outputs (masks, overlays, JSON, index, CSV), batching, skipped
files, and the clear errors for wrong devices, presets, configs, states and non-checkpoint files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli.predict as predict_cli
from shared_model.checkpoint import (
    CheckpointError,
    config_fingerprint,
    expected_model_config,
    load_model_checkpoint,
    save_model_checkpoint,
)
from cli.main import main
from shared_model.config import get_preset
from shared_model.inference import BOX_COLOUR, MASK_COLOUR, TRUTH_COLOUR, blend_saliency, heatmap, predict_images
from shared_model.modeling.prompt_sam import build_model
from cli.predict import CSV_COLUMNS, load_user_boxes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return save_model_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model)


@pytest.fixture
def image_folder(synthetic_root, tmp_path):
    """3 synthetic images of different sizes (two sharing a stem), a corrupt PNG and a text file."""
    folder = tmp_path / "new_images"
    folder.mkdir()
    sources = sorted((synthetic_root / "centre_1" / "images").iterdir())
    sizes = {"case_a.png": (64, 64), "case_b.png": (80, 48), "case_a.jpg": (50, 90)}  # (W, H)
    for src, (name, size) in zip(sources, sizes.items()):
        Image.open(src).convert("RGB").resize(size).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder, sizes


def test_predict_folder_writes_masks_overlays_index_and_csv(checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    folder, sizes = image_folder
    calls = []
    real = predict_cli.predict_images
    monkeypatch.setattr(predict_cli, "predict_images",
                        lambda model, images, *a, **k: (calls.append(len(images)), real(model, images, *a, **k))[1])
    out = tmp_path / "pred"
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--prompt", "polyp", "--out", str(out),
                 "--device", "cpu", "--batch-size", "2", "--threshold", "0.4"]) == 0
    assert "wrote 3 predictions" in capsys.readouterr().out
    assert calls == [1, 2]  # [broken.png, case_a.jpg], [case_a.png, case_b.png]: batched, corrupt one dropped

    index = json.loads((out / "predictions.json").read_text())
    assert index["checkpoint"] == str(checkpoint) and index["preset"] == "tiny"
    assert index["config_fingerprint"] == config_fingerprint(get_preset("tiny"))
    assert (index["prompt"], index["threshold"], index["device"], index["count"]) == ("polyp", 0.4, "cpu", 3)
    skipped = {s["image"].split("/")[-1]: s["reason"] for s in index["skipped"]}
    assert set(skipped) == {"broken.png", "notes.txt"}
    assert "unreadable image" in skipped["broken.png"] and "not an image file type" in skipped["notes.txt"]

    rows = {r["image"]: r for r in index["images"]}
    assert {p.split("/")[-1] for p in rows} == set(sizes)
    assert len({r["name"] for r in rows.values()}) == 3  # case_a.png and case_a.jpg do not overwrite each other
    for path, row in rows.items():
        w, h = sizes[path.split("/")[-1]]
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        shown = Image.open(out / row["overlay"])  # the image at its size, a legend band below
        assert shown.width == max(w, 240) and shown.height > h
        assert (row["width"], row["height"]) == (w, h)
        assert row["area_pixels"] == int((mask > 0).sum())
        assert row["area_fraction"] == pytest.approx(row["area_pixels"] / (w * h))
        assert 0.0 <= row["confidence"] <= 1.0
        for x0, y0, x1, y1 in row["boxes"]:
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert json.loads((out / "masks" / f"{row['name']}.json").read_text()) == row

    with open(out / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        table = list(reader)
    assert len(table) == 3
    for line in table:
        row = rows[line["image"]]
        assert int(line["area_pixels"]) == row["area_pixels"] and int(line["components"]) == row["components"]
        assert float(line["confidence"]) == pytest.approx(row["confidence"])
        assert json.loads(line["boxes"]) == row["boxes"]


def test_user_boxes_are_validated(tmp_path):
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"a.png": [1, 2, 3, 4], "b.png": [[0, 0, 5, 5], [1, 1, 2, 2]]}))
    assert load_user_boxes(path) == {"a.png": [[1, 2, 3, 4]], "b.png": [[0, 0, 5, 5], [1, 1, 2, 2]]}
    path.write_text(json.dumps({"a.png": [1, 2, 3]}))
    with pytest.raises(ValueError, match="boxes of 'a.png' must be"):
        load_user_boxes(path)
    assert "does not fit the 60x40 image" in predict_cli._box_problem([[0, 0, 61, 10]], 60, 40)
    assert predict_cli._box_problem([[0, 0, 60, 40]], 60, 40) is None


def _predict_error(argv, capsys) -> str:
    capsys.readouterr()
    assert main(["predict", *argv, "--device", "cpu"]) == 2
    return capsys.readouterr().err


def test_device_preset_and_config_mismatches_are_clear(checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    folder, _ = image_folder
    ckpt = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    err = _predict_error([str(folder), *ckpt, "--preset", "base"], capsys)
    assert str(checkpoint) in err and "preset 'tiny', not 'base'" in err

    wrong = tmp_path / "expected.yaml"
    wrong.write_text("model:\n  preset: tiny\n  sam:\n    image_size: 256\n  crf:\n    iterations: 5\n")
    err = _predict_error([str(folder), *ckpt, "--config", str(wrong)], capsys)
    assert str(checkpoint) in err and "differs from the expected one in 2 field(s)" in err
    assert "sam.image_size: checkpoint 128, expected 256" in err and "crf.iterations: checkpoint 3, expected 5" in err
    err = _predict_error([str(folder), *ckpt, "--config", "base"], capsys)
    assert "preset: checkpoint 'tiny', expected 'base'" in err and "sam.image_size: checkpoint 128, expected 1024" in err
    err = _predict_error([str(folder), *ckpt, "--config", str(tmp_path / "nope.yaml")], capsys)
    assert "nope.yaml: config file not found (and not a preset" in err

    same = tmp_path / "same.yaml"  # a bare model section also works
    same.write_text("preset: tiny\n")
    assert expected_model_config(same) == get_preset("tiny")
    load_model_checkpoint(checkpoint, expect_config=expected_model_config(same))

    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["predict", str(folder), *ckpt, "--device", "cuda"]) == 2
    assert "device 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    assert main(["predict", str(folder), *ckpt, "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err


def test_bad_checkpoint_files_are_named(checkpoint, image_folder, tmp_path, capsys):
    folder, _ = image_folder
    payload = torch.load(checkpoint, weights_only=True)
    key = next(iter(payload["state"]))

    cases = {}
    misshapen = {**payload, "state": {**payload["state"], key: torch.zeros(3, 3, 3)}}
    cases["misshapen.pt"] = (misshapen, [f"{key}: got (3, 3, 3), expected", "state does not fit"])
    missing = {**payload, "state": {k: v for k, v in payload["state"].items() if k != key}}
    cases["missing.pt"] = (missing, [f"missing ['{key}'] (1)"])
    cases["no_state.pt"] = ({k: v for k, v in payload.items() if k != "state"}, ["checkpoint lacks ['state']"])
    cases["sam_vit_b.pth"] = ({"image_encoder.pos_embed": torch.zeros(2), "mask_decoder.w": torch.zeros(1)},
                              ["not a promptsam checkpoint: it is a plain state dict of 2 tensors",
                               "'image_encoder.pos_embed'"])
    cases["checkpoint.pt"] = ({"format": "promptsam-fl-checkpoint/1", "round": 3},
                              ["federated server checkpoint", "best_model.pt or final_model.pt"])
    for name, (obj, needles) in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    cases["notes.pt"] = (None, ["not a readable checkpoint: a text file (it starts with 'these are my notes",
                                "expected a promptsam checkpoint"])
    (tmp_path / "readme.pt").write_text("epochs: 3\n")  # torch.load said "KeyError: 101" (ord('e'))
    cases["readme.pt"] = (None, ["not a readable checkpoint: a text file (it starts with 'epochs: 3')"])
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = (None, ["not a readable checkpoint: an empty file"])
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    cases["image.pt"] = (None, ["not a readable checkpoint: a binary file starting with"])
    for name, (_, needles) in cases.items():
        err = _predict_error([str(folder), "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "o")],
                             capsys)
        assert f"{tmp_path / name}: " in err, name
        for needle in needles:
            assert needle in err, (name, needle, err)
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_model_checkpoint(tmp_path)


def test_weight_paths_are_not_a_config_difference():
    from shared_model.checkpoint import config_differences
    from shared_model.config import get_preset

    here, there = get_preset("tiny"), get_preset("tiny")
    there.sam.checkpoint, there.clip.checkpoint = "/other/machine/sam.pth", "/other/biomedclip"
    assert config_differences(here, there) == []
    there.sam.image_size = 64
    assert config_differences(here, there) == ["sam.image_size: checkpoint 128, expected 64"]


def _has_colour(image: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((image.reshape(-1, 3) == colour).all(1).any())


def test_ground_truth_gives_dice_contours_and_legend(checkpoint, synthetic_root, tmp_path, capsys):
    """``<centre>/images`` finds the sibling masks/: Dice per image (hand-computed), a wrong-size mask
    and a missing one are named, and the overlay shows the truth contour and a legend naming it."""
    centre = synthetic_root / "centre_0"
    images = sorted((centre / "images").iterdir())
    for extra in images[3:]:
        extra.unlink()
        (centre / "masks" / extra.name).unlink()
    (centre / "masks" / images[1].name).unlink()  # no mask for the second image
    Image.new("L", (10, 10)).save(centre / "masks" / images[2].name)  # the third's has the wrong size
    out = tmp_path / "pred"
    assert main(["predict", str(centre / "images"), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "mean Dice" in capsys.readouterr().out
    index = json.loads((out / "predictions.json").read_text())
    assert index["masks"] == [str(centre / "masks")] and index["with_truth"] == 1
    rows = {Path(r["image"]).name: r for r in index["images"]}
    first, missing, wrong = (rows[p.name] for p in images[:3])

    truth = np.asarray(Image.open(centre / "masks" / images[0].name)) > 0
    pred = np.asarray(Image.open(out / first["mask"])) > 0
    assert first["dice"] == pytest.approx(2 * (truth & pred).sum() / (truth.sum() + pred.sum()))
    assert index["mean_dice"] == first["dice"] and first["truth"] == str(centre / "masks" / images[0].name)
    assert json.loads((out / "masks" / f"{first['name']}.json").read_text())["dice"] == first["dice"]
    assert missing["dice"] is None and "no mask named" in missing["truth_problem"]
    assert wrong["dice"] is None and "differs from its image's 64x64" in wrong["truth_problem"]
    with open(out / "predictions.csv", newline="") as f:
        table = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert float(table[images[0].name]["dice"]) == pytest.approx(first["dice"])
    assert table[images[1].name]["dice"] == ""

    for row, with_truth in ((first, True), (missing, False)):
        shown = np.asarray(Image.open(out / row["overlay"]).convert("RGB"))
        picture, legend = shown[:64, :64], shown[64:]
        assert _has_colour(legend, MASK_COLOUR) and _has_colour(legend, BOX_COLOUR)
        assert _has_colour(legend, TRUTH_COLOUR) == with_truth  # "ground truth" only when there is one
        if with_truth:
            edge = truth & ~np.roll(truth, 1, 0) & ~pred  # truth contour pixels the mask does not cover
            assert (picture[edge] == TRUTH_COLOUR).all(1).mean() > 0.5


def test_masks_flag_and_child_masks_folder(checkpoint, image_folder, tmp_path, capsys):
    folder, sizes = image_folder
    common = ["--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(["predict", str(folder), *common, "--out", str(tmp_path / "a"), "--masks", str(tmp_path / "no")]) == 2
    assert f"--masks {tmp_path / 'no'}: folder not found" in capsys.readouterr().err
    (folder / "masks").mkdir()  # a masks/ child of the input folder is found without the flag
    Image.new("L", sizes["case_b.png"], 255).save(folder / "masks" / "case_b.png")
    assert main(["predict", str(folder), *common, "--out", str(tmp_path / "b")]) == 0
    rows = {Path(r["image"]).name: r for r in json.loads((tmp_path / "b" / "predictions.json").read_text())["images"]}
    area = rows["case_b.png"]["area_fraction"]
    assert rows["case_b.png"]["dice"] == pytest.approx(2 * area / (1 + area))  # truth = the whole image
    elsewhere = tmp_path / "truth"
    elsewhere.mkdir()
    Image.new("L", sizes["case_a.png"], 0).save(elsewhere / "case_a.bmp")
    assert main(["predict", str(folder / "case_a.png"), *common, "--out", str(tmp_path / "c"),
                 "--masks", str(elsewhere)]) == 0
    (row,) = json.loads((tmp_path / "c" / "predictions.json").read_text())["images"]
    assert row["dice"] == (1.0 if row["area_pixels"] == 0 else 0.0)


def test_saliency_heatmap_is_normalised_per_image(checkpoint):
    ramp = np.tile(np.linspace(0.2, 0.3, 16, dtype=np.float32), (4, 1))  # a faint map spans the whole bar
    black = np.zeros((4, 16, 3), np.uint8)
    shown = blend_saliency(black, ramp, alpha=1.0)
    assert (shown[:, 0] == heatmap(np.zeros(1))[0]).all() and (shown[:, -1] == heatmap(np.ones(1))[0]).all()
    assert (blend_saliency(black, np.full((4, 16), 0.7), alpha=1.0) == heatmap(np.zeros(1))[0]).all()
    model = load_model_checkpoint(checkpoint)[0]
    (pred,) = predict_images(model, [np.full((40, 50, 3), 128, np.uint8)], device="cpu")
    assert pred.raw_saliency.shape == (40, 50) and pred.heat is pred.raw_saliency  # the M2IB map, before the CRF


def test_empty_folder_exits_1_as_the_help_says(checkpoint, tmp_path, capsys):
    from cli.main import build_parser

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(empty), "--checkpoint", str(checkpoint), "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 1
    assert f"no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff) found in {empty}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    assert "1 when none could be (an empty folder, or every file skipped)" in predict.description
    # A missing input is a usage error: 2.
    assert main(["predict", str(tmp_path / "nowhere"), "--checkpoint", str(checkpoint)]) == 2
