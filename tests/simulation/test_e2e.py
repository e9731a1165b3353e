"""End to end on Flower's simulation engine (``flwr run`` + Ray): 3 hospitals, tiny model, synthetic data.

One uninterrupted run checks that the global Dice improves, that every client reply carries only
the exchanged keys (from the server's audit of the messages as received), and that the SuperLink
is gone afterwards; a second run resumes from the first run's round-1 checkpoint and must
reproduce its round-2 global state exactly.
"""

import json
import shutil

import pytest
import torch
from sim_helpers import processes_mentioning

from client.task import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS
from server.checkpoint import load_checkpoint
from shared_model.config import model_config_from_dict
from shared_model.exchange import state_shapes
from shared_model.modeling.prompt_sam import build_model
from simulation.runner import simulate
from shared_model.config.experiment import load_experiment
from simulation.experiment import PROJECT_ROOT

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
SETTINGS = {
    "federation.num_server_rounds": 3,
    "federation.keep_round_checkpoints": True,
    "simulation.timeout": 400,
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "full"
    report = simulate(DEMO, SETTINGS, run_dir, echo=False)
    return run_dir, report


def test_global_dice_improves_and_report_is_written(full_run, capsys):
    run_dir, report = full_run
    assert report == run_dir / "report.md" and report.is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    dice = summary["global"]["dice"]
    assert list(dice) == ["0", "1", "2", "3"]
    assert dice["3"] > dice["0"] + 0.02, dice
    assert summary["dropped_replies"] == 0
    assert not processes_mentioning(str(run_dir)), "the SuperLink or its children outlived the run"


def test_replies_carry_only_the_exchanged_keys(full_run):
    run_dir, _ = full_run
    exchanged = set(state_shapes(build_model(model_config_from_dict(load_experiment(DEMO).model))))
    audit = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
    assert {(m["round"], m["phase"]) for m in audit} == {(r, p) for r in (1, 2, 3) for p in ("train", "evaluate")}
    assert len({m["node-id"] for m in audit}) == 3 and len(audit) == 18
    for msg in audit:
        assert "error" not in msg, msg
        assert msg["config-records"] == {}
        if msg["phase"] == "train":
            assert list(msg["array-records"]) == ["arrays"]
            assert set(msg["array-records"]["arrays"]) == exchanged
            assert msg["metric-records"] == {"metrics": sorted(TRAIN_METRIC_KEYS)}
        else:
            assert msg["array-records"] == {}
            assert msg["metric-records"] == {"metrics": sorted(EVAL_METRIC_KEYS)}


def test_resume_after_round_1_reproduces_rounds_2_and_3(full_run):
    run_dir, _ = full_run
    resumed = run_dir.parent / "resumed"
    resumed.mkdir()
    shutil.copytree(run_dir / "data", resumed / "data")
    shutil.copy(run_dir / "checkpoints" / "round-001.pt", resumed / "checkpoint.pt")
    # The same number of rounds: it is part of the recipe (one learning-rate schedule over the run).
    simulate(DEMO, SETTINGS, resumed, resume=True, echo=False)
    for name in ("round-002.pt", "round-003.pt"):
        mine, reference = (load_checkpoint(folder / "checkpoints" / name) for folder in (resumed, run_dir))
        assert mine.round == reference.round
        assert mine.state.keys() == reference.state.keys()
        for key, value in reference.state.items():
            assert torch.equal(mine.state[key], value), (name, key)
