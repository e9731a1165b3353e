"""``promptsam fewshot``: the leave-one-task-out evaluation, run tiny on synthetic data (random-init
base, 2 steps per training) for its outputs, resumption and config errors; and the committed YAML."""

import json

import pytest
import yaml

from cli.main import main
from shared_model.config import ConfigError
from shared_model.data.synthetic import generate_dataset
from simulation.experiment import PROJECT_ROOT
from simulation.fewshot import check_held_out, load_fewshot, run_fewshot

TWO_STEPS = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot_eval")
    generate_dataset(root / "data", centres=["a", "b"], per_centre=8, image_size=64, seed=2)
    cfg = {"name": "tiny_fewshot", "model": {"preset": "tiny"},
           "data": {"root": str(root / "data"), "test_fraction": 0.25, "val_fraction": 0.0},
           "fewshot": {"task_name": "lesion", "shots": [1, 2], "draws": 2, "max_test_images": 3,
                       "adapter_train": TWO_STEPS, "finetune_train": TWO_STEPS,
                       "upper_bound": {"train": TWO_STEPS}}}
    path = root / "fewshot.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_outputs_and_resume(config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["fewshot", "--config", str(config), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"upper-bound"} | {f"{m}/K={k}/draw={d}" for m in ("in-context", "adapter", "fine-tune")
                                              for k in (1, 2) for d in (0, 1)}
    assert all(0 <= r["dice"] <= 1 and r["n"] == 3 for r in results.values())
    assert results["adapter/K=2/draw=0"]["adapter_file_bytes"] > 0
    assert results["adapter/K=2/draw=0"]["support"] != results["adapter/K=2/draw=1"]["support"]
    for key in ("adapter/K=1/draw=0", "fine-tune/K=1/draw=0", "in-context/K=1/draw=0"):
        assert len(results[key]["support"]) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice"]["adapter"]["2"]["draws"] == 2 and "not measured" in summary["targets"]
    table = (out / "table.md").read_text()
    assert "| task adapter" in table and "upper bound" in table and "K = 2" in table
    assert (out / "dice_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapters" / "K1_draw0.pt").is_file()
    capsys.readouterr()
    assert main(["fewshot", "--config", str(config), "--out", str(out)]) == 0  # resumes: nothing re-run
    rerun = capsys.readouterr().out.splitlines()
    assert not [line for line in rerun if line.startswith(("in-context/", "adapter/", "fine-tune/", "upper-bound:"))]
    assert json.loads((out / "results.json").read_text()) == results


def test_bad_settings_name_the_field(config):
    with pytest.raises(ConfigError, match="fewshot.methods"):
        load_fewshot(config, {"fewshot.methods": "[nope]"})
    with pytest.raises(ConfigError, match="fewshot.shots"):
        load_fewshot(config, {"fewshot.shots": "[0]"})
    with pytest.raises(ConfigError, match="fewshot.shots: 50"):
        run_fewshot(config, config.parent / "too_many", {"fewshot.shots": "[50]", "fewshot.methods": "[in-context]"})


def test_committed_config_holds_polyps_out_of_the_foundation():
    exp = load_fewshot(PROJECT_ROOT / "simulation" / "configs" / "fewshot_polyp_tiny.yaml")
    assert exp.fewshot.shots == [1, 5, 10, 20] and exp.fewshot.draws == 3
    assert check_held_out(exp).startswith("held out")
    busi = load_fewshot(PROJECT_ROOT / "simulation" / "configs" / "fewshot_polyp_tiny.yaml",
                        {"data.root": "../shared/data/tasks", "data.centres": "[busi]"})
    with pytest.raises(ConfigError, match="pre-training data"):
        check_held_out(busi)
