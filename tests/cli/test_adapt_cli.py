"""``promptsam adapt`` and the few-shot options of ``predict`` / ``evaluate`` (``--adapter``,
``--support --shots``), with their one-line errors. Tiny preset, synthetic data, a few steps."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from shared_model.checkpoint import save_model_checkpoint
from shared_model.config import get_preset
from shared_model.data.synthetic import generate_dataset
from shared_model.modeling.prompt_sam import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt_cli")
    generate_dataset(root / "data", centres=["support", "query"], per_centre=5, image_size=64, seed=7)
    save_model_checkpoint(root / "base.pt", build_model("tiny"))
    save_model_checkpoint(root / "other.pt", build_model(get_preset("tiny", {"init_seed": 3})))
    return root


@pytest.fixture(scope="module")
def adapter(files):
    out = files / "adapters" / "lesion.pt"
    code = main(["adapt", "--checkpoint", str(files / "base.pt"), "--support", str(files / "data" / "support"),
                 "--shots", "3", "--name", "skin lesion", "--out", str(out), "--steps", "2", "--batch-size", "2"])
    assert code == 0 and out.is_file()
    return out


def test_adapt_reports_the_adapter_size(files, adapter, capsys):
    out = files / "adapters" / "second.pt"  # a second adapter beside the same base model
    code = main(["adapt", "--checkpoint", str(files / "base.pt"), "--support", str(files / "data" / "support"),
                 "--shots", "2", "--name", "polyp", "--out", str(out), "--steps", "1", "--json"])
    text = capsys.readouterr().out
    assert code == 0 and "B on disk" in text and "support: 2 of 5 pair(s)" in text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["file_bytes"] == out.stat().st_size > 0 and adapter.is_file()


def test_predict_and_evaluate_with_an_adapter(files, adapter, tmp_path, capsys):
    code = main(["predict", str(files / "data" / "query" / "images"), "--checkpoint", str(files / "base.pt"),
                 "--adapter", str(adapter), "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert code == 0
    index = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert index["prompt"] == "skin lesion" and index["task"]["adapter"] == str(adapter)
    code = main(["evaluate", "--checkpoint", str(files / "base.pt"), "--adapter", str(adapter), "--data",
                 str(files / "data" / "query"), "--split", "all", "--out", str(tmp_path / "ev.json"), "--device", "cpu"])
    assert code == 0 and json.loads((tmp_path / "ev.json").read_text())["aggregate"]["n"] == 5
    assert 'task adapter' in capsys.readouterr().out


def test_in_context_predict_and_evaluate(files, tmp_path, capsys):
    code = main(["predict", str(files / "data" / "query" / "images"), "--checkpoint", str(files / "base.pt"),
                 "--support", str(files / "data" / "support"), "--shots", "2", "--name", "polyp",
                 "--out", str(tmp_path / "pred"), "--device", "cpu"])
    assert code == 0
    index = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert index["task"]["shots"] == 2 and index["count"] == 5
    code = main(["evaluate", "--checkpoint", str(files / "base.pt"), "--support", str(files / "data" / "support"),
                 "--shots", "2", "--name", "polyp", "--data", str(files / "data" / "query"), "--split", "all",
                 "--device", "cpu"])
    assert code == 0 and "in-context: 2 support pair(s)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no_name", "too_many", "other_base", "no_masks", "empty_mask", "shots_alone"])
def test_bad_input_is_a_one_line_error(files, adapter, tmp_path, capsys, case):
    support = str(files / "data" / "support")
    adapt = ["adapt", "--checkpoint", str(files / "base.pt"), "--support", support, "--shots", "2",
             "--name", "lesion", "--out", str(tmp_path / "a.pt"), "--steps", "1"]
    if case == "no_name":
        argv, expect = [*adapt[:7], "--name", " ", *adapt[9:]], "--name"
    elif case == "too_many":
        argv, expect = [*adapt[:5], "--shots", "9", *adapt[7:]], "--shots 9"
    elif case == "other_base":
        argv = ["evaluate", "--checkpoint", str(files / "other.pt"), "--adapter", str(adapter), "--data",
                str(files / "data" / "query"), "--device", "cpu"]
        expect = "made for another base model"
    elif case in ("no_masks", "empty_mask"):
        generate_dataset(tmp_path / "s", centres=["site"], per_centre=2, image_size=32, seed=1)
        mask = tmp_path / "s" / "site" / "masks" / "site_0000.png"
        if case == "no_masks":
            mask.unlink()
        else:
            from PIL import Image
            import numpy as np

            Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask)
        argv, expect = [*adapt[:3], "--support", str(tmp_path / "s" / "site"), *adapt[5:]], "site_0000.png"
    else:
        argv = ["predict", str(files / "data" / "query" / "images"), "--checkpoint", str(files / "base.pt"),
                "--shots", "2", "--out", str(tmp_path / "p")]
        expect = "--shots"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
