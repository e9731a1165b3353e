"""Dropped hospitals per round with the reason (deadline, error, failed validation) and min-nodes."""

import json
from pathlib import Path

import pytest
import torch

import client.app as client_app
from server.checkpoint import load_checkpoint
from shared_model.config import ConfigError
from shared_model.config.faults import FaultConfig, choose_fault
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import run_inprocess

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
HOSPITALS = 6
FAST = {
    "federation.num_server_rounds": 1,
    "federation.local_steps": 1,
    "federation.fraction_evaluate": 0.0,
    "federation.global_eval": "none",
    "federation.reply_timeout": 30.0,
    "train.batch_size": 2,
    "synthetic.centres": HOSPITALS,
    "synthetic.per_centre": 5,
    "synthetic.image_size": 64,
    "simulation.num_supernodes": HOSPITALS,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _faulty_seed(fractions: dict[str, float]) -> tuple[int, dict[int, str | None]]:
    """The first fault seed whose round 1 gives every hospital-0..5 fault kind at least once and
    leaves at least two healthy hospitals (a deterministic search, not a lucky seed)."""
    for seed in range(1000):
        cfg = FaultConfig(**fractions, sleep_seconds=100.0, seed=seed)
        faults = {p: choose_fault(cfg, 1, p) for p in range(HOSPITALS)}
        kinds = list(faults.values())
        if all(k in kinds for k in ("sleep", "error", "corrupt")) and kinds.count(None) >= 2:
            return seed, faults
    raise AssertionError("no seed gives every fault kind")


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that only the injected sleep advances: the deadline does not depend on timing."""
    now = [0.0]
    monkeypatch.setattr(client_app, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    return lambda: now[0]


def _initial_state() -> dict:
    """The server's initial global state for the demo's model (the build is deterministic)."""
    from shared_model.config import model_config_from_dict
    from shared_model.config.experiment import load_experiment
    from shared_model.exchange import get_exchanged_state
    from shared_model.modeling.prompt_sam import build_model

    return dict(get_exchanged_state(build_model(model_config_from_dict(load_experiment(DEMO).model))))


def _fault_overrides(seed: int) -> dict:
    return {"federation.keep_round_checkpoints": True, "faults.sleep_fraction": 0.2, "faults.error_fraction": 0.2, "faults.corrupt_fraction": 0.2,
            "faults.sleep_seconds": 100.0, "faults.seed": seed}


def test_every_dropped_hospital_is_recorded_with_its_reason(tmp_path, fake_clock):
    seed, faults = _faulty_seed({"sleep_fraction": 0.2, "error_fraction": 0.2, "corrupt_fraction": 0.2})
    run_inprocess(DEMO, {**FAST, **_fault_overrides(seed), "federation.min_nodes": 2}, tmp_path, clock=fake_clock)
    rows = _rows(tmp_path)
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == HOSPITALS  # every sampled node has a row, replied or not
    by_partition = {int(r["node-id"]) - 1000: r for r in train}  # InProcessGrid: node 1000 + i is partition i
    expected_drop = {"sleep": "timeout", "error": "error", "corrupt": "invalid", None: None}
    for partition, fault in faults.items():
        row = by_partition[partition]
        assert row["accepted"] == (fault is None), (partition, fault, row)
        assert row.get("drop") == expected_drop[fault], (partition, fault, row)
    reasons = {r["drop"]: r["reason"] for r in train if not r["accepted"]}
    assert reasons["timeout"] == "no reply before the deadline (reply-timeout 30 s)"
    assert "InjectedFault" in reasons["error"] and "injected fault in round 1" in reasons["error"]
    assert "non-finite" in reasons["invalid"]
    round_row = next(r for r in rows if r["kind"] == "round")
    counts = {k: list(faults.values()).count(f) for k, f in (("timeout", "sleep"), ("error", "error"),
                                                            ("invalid", "corrupt"))}
    assert {k: round_row[f"dropped-{k}"] for k in counts} == counts
    assert round_row["accepted"] == list(faults.values()).count(None)
    assert round_row["sampled"] == HOSPITALS and round_row["status"] == "aggregated"


def test_round_below_min_nodes_keeps_the_global_state_and_the_run_goes_on(tmp_path, fake_clock):
    seed, faults = _faulty_seed({"sleep_fraction": 0.2, "error_fraction": 0.2, "corrupt_fraction": 0.2})
    healthy = list(faults.values()).count(None)
    overrides = {**FAST, **_fault_overrides(seed), "federation.min_nodes": healthy + 1,
                 "federation.num_server_rounds": 2}
    run_inprocess(DEMO, overrides, tmp_path, clock=fake_clock)
    first = next(r for r in _rows(tmp_path) if r["kind"] == "round" and r["round"] == 1)
    assert first["accepted"] == healthy
    assert first["status"] == f"skipped: {healthy} valid replies < min-nodes {healthy + 1}"
    assert load_checkpoint(tmp_path / "checkpoint.pt").round == 2  # round 2 ran after the failed round 1
    after_round_1 = load_checkpoint(tmp_path / "checkpoints" / "round-001.pt").state
    assert all(torch.equal(v, _initial_state()[k]) for k, v in after_round_1.items())


def test_round_at_min_nodes_is_aggregated(tmp_path, fake_clock):
    seed, faults = _faulty_seed({"sleep_fraction": 0.2, "error_fraction": 0.2, "corrupt_fraction": 0.2})
    healthy = list(faults.values()).count(None)
    run_inprocess(DEMO, {**FAST, **_fault_overrides(seed), "federation.min_nodes": healthy}, tmp_path,
                  clock=fake_clock)
    first = next(r for r in _rows(tmp_path) if r["kind"] == "round")
    assert first["status"] == "aggregated" and first["accepted"] == healthy
    state = load_checkpoint(tmp_path / "checkpoint.pt").state
    assert any(not torch.equal(v, _initial_state()[k]) for k, v in state.items())


def test_a_deployed_hospital_refuses_fault_injection():
    from flwr.app import Context, RecordDict

    from shared_model.config import FederationConfig, PartitionConfig, TrainConfig, DataConfig, to_run_config
    from shared_model.config import from_run_config

    rc = to_run_config(FederationConfig(), PartitionConfig(), {"preset": "tiny"}, TrainConfig(), DataConfig(),
                       faults=FaultConfig(error_fraction=0.5))
    settings = from_run_config(rc)
    deployed = Context(run_id=1, node_id=1, node_config={"data-path": "/data/site"}, state=RecordDict(),
                       run_config=rc)
    with pytest.raises(ConfigError, match="fault injection is for simulations only"):
        client_app.injected_fault(settings, deployed, 1)
    simulated = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
                        state=RecordDict(), run_config=rc)
    assert client_app.injected_fault(settings, simulated, 1) == choose_fault(settings.faults, 1, 0)
