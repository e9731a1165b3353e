"""``promptsam experiment`` in ablation mode: every row, same steps, tables, resume, config errors."""

from __future__ import annotations

import json

import pytest
import yaml

from shared_model.config import ConfigError
from simulation.ablation import ROWS, load_ablation, row_model, run_ablation


def _config(tmp_path, root, **ablation):
    data = {
        "name": "abl_test",
        "model": {"preset": "tiny"},
        "federation": {"device": "cpu", "eval_batch_size": 8},
        "train": {"batch_size": 2, "lr": 0.003, "warmup_steps": 0, "amp": False},
        "data": {"root": str(root), "val_fraction": 0.2, "test_fraction": 0.3, "augment": True},
        "partition": {"mode": "centre"},
        "simulation": {"num_supernodes": 3},
        "ablation": {"steps": 2, "seeds": [0], "workers": 1, **ablation},
    }
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_rows_switch_one_part_at_a_time(tmp_path, synthetic_root):
    exp, cfg, _ = load_ablation(_config(tmp_path, synthetic_root))
    models = {row: row_model(exp, row) for row in ROWS}
    assert models["samed"]["prompts"]["text_tokens"] == 0 and not models["samed"]["prompts"]["use_boxes"]
    assert models["text"]["prompts"]["text_tokens"] > 0 and not models["text"]["prompts"]["dense_saliency"]
    assert models["saliency-dense"]["prompts"]["dense_saliency"] and not models["saliency-dense"]["prompts"]["use_boxes"]
    assert models["saliency-boxes"]["prompts"]["use_boxes"] and not models["saliency-boxes"]["crf"]["enabled"]
    assert models["full"]["crf"]["enabled"] and models["full"]["prompts"]["box_source"] == "saliency"
    assert models["user-boxes"]["prompts"]["box_source"] == "ground-truth"
    assert models["mask-boxes"]["prompts"]["box_source"] == "mask" and models["mask-boxes"]["crf"]["enabled"]


def test_ablation_trains_every_row_writes_tables_and_resumes(tmp_path, synthetic_root):
    config = _config(tmp_path, synthetic_root, rows=["samed", "saliency-boxes", "user-boxes"])
    out = tmp_path / "out"
    lines: list[str] = []
    results = run_ablation(config, out, echo=lines.append)
    jobs = results["jobs"]
    assert sorted(jobs) == ["saliency-boxes/seed-0", "samed/seed-0", "user-boxes/seed-0"]
    assert {j["steps"] for j in jobs.values()} == {2}
    assert jobs["samed/seed-0"]["trainable"] < jobs["saliency-boxes/seed-0"]["trainable"]
    # Box agreement only where the boxes come from the saliency.
    assert all("box_hit" in r for r in jobs["saliency-boxes/seed-0"]["per_image"])
    assert not any("box_hit" in r for r in jobs["user-boxes/seed-0"]["per_image"])
    table = (out / "ablation.md").read_text()
    for label in ("SAMed-style", "+ boxes from saliency", "ground-truth boxes", "constant mask",
                  "Do the model's own boxes (saliency or first mask) find the polyp?"):
        assert label in table
    assert "step time" in table and (out / "ablation.csv").is_file()
    timing = results["step_time"]
    assert set(timing["rows"]) == {"samed", "saliency-boxes", "user-boxes"} and timing["reference"] == "samed"
    assert timing["rows"]["samed"]["ratio"]["median"] == 1.0 and timing["rows"]["samed"]["wall"]["repeats"] == 7
    stamp = (out / "results.json").stat().st_mtime_ns
    again = run_ablation(config, out, echo=lines.append)  # resumes: nothing left to train
    assert again["jobs"] == json.loads((out / "results.json").read_text())["jobs"]
    assert any("0 job(s) to train" in line for line in lines)
    assert (out / "results.json").stat().st_mtime_ns >= stamp


def test_bad_ablation_sections_name_the_field(tmp_path, synthetic_root):
    with pytest.raises(ConfigError, match="ablation.rows"):
        load_ablation(_config(tmp_path, synthetic_root, rows=["samed", "magic"]))
    with pytest.raises(ConfigError, match="ablation.steps"):
        load_ablation(_config(tmp_path, synthetic_root, steps=0))
    with pytest.raises(ConfigError, match="ablation.seeds"):
        load_ablation(_config(tmp_path, synthetic_root, seeds=[]))
