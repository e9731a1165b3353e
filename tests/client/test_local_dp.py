"""Local DP in the ClientApp: cumulative accounting in context.state, the decline, per-node budgets."""

from __future__ import annotations

import json

import pytest

from client.app import BUDGET_EXHAUSTED, app as client_app
from client.task import hospital_privacy, parse_node_config, read_ledger
from server.loop import FederatedServer
from shared_model.config import ConfigError, from_run_config
from shared_model.training.privacy import epsilon_after
from simulation.experiment import prepare_run
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import InProcessGrid

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"



def test_epsilon_accumulates_across_rounds_and_a_spent_hospital_declines(tmp_path, one_thread):
    budget, delta = 6.0, 1e-3
    exp, run_dir = prepare_run(DEMO, {
        "federation.num_server_rounds": 4,
        "federation.local_steps": 1,
        "federation.fraction_evaluate": 0.0,
        "federation.global_eval": "none",
        "train.batch_size": 2,
        "synthetic.per_centre": 8,
        "synthetic.image_size": 64,
        "model.loss": {"nce": 0.0},
        # The budget is spread over 2 steps: rounds 1 and 2 train, round 3 would exceed it.
        "privacy": {"local_dp": True, "epsilon": budget, "delta": delta, "planned_steps": 2},
    }, tmp_path)
    run_config = exp.run_config()
    ledgers = [tmp_path / f"ledger-{i}.json" for i in range(3)]
    nodes = [{"partition-id": i, "num-partitions": 3, "privacy-ledger": str(ledgers[i])} for i in range(3)]
    grid = InProcessGrid(client_app, run_config, 3, node_configs=nodes)
    seen = []
    grid.reply_hook = lambda reply: seen.append(reply) or reply
    FederatedServer(from_run_config(run_config), run_config).run(grid)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {(r["round"], r["node-id"]): r for r in rows if r["kind"] == "train"}
    assert max(r for r, _ in train) == 3  # every hospital declined round 3: the run stopped there
    for node, context in grid.contexts.items():
        record = context.state["privacy-accountant"]
        assert list(record["steps"]) == [2] and "past the budget 6.0" in record["exhausted"]
        sigma, rate = record["noise_multiplier"][0], record["sample_rate"][0]
        eps = [train[(r, node)]["epsilon"] for r in (1, 2)]
        assert eps[0] == pytest.approx(epsilon_after(None, delta, sigma, rate, 1))
        assert eps[1] == pytest.approx(epsilon_after(None, delta, sigma, rate, 2))
        assert eps[0] < eps[1] <= budget and eps[1] > budget - 0.05  # calibrated to spend it all
        assert train[(1, node)]["train-loss"] is None and train[(1, node)]["val-dice"] is None  # NaN: not released
        third = train[(3, node)]
        assert not third["accepted"] and "declined: privacy budget" in third["reason"]
    declines = [r for r in seen if r.has_error()]
    assert len(declines) == 3 and {r.error.code for r in declines} == {BUDGET_EXHAUSTED}
    round3 = next(r for r in rows if r["kind"] == "round" and r["round"] == 3)
    assert round3["declined"] == 3 and round3["accepted"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())["privacy"]
    assert summary["local_dp"] and max(summary["local_epsilon_by_hospital"].values()) <= budget

    # A restarted SuperNode has an empty context.state: the ledger still knows the budget is spent.
    for ledger, context in zip(ledgers, grid.contexts.values()):
        history, exhausted, spent_at = read_ledger(ledger)
        assert history["steps"] == list(context.state["privacy-accountant"]["steps"]) and exhausted
        assert spent_at == [budget, delta]
    restarted = InProcessGrid(client_app, {**run_config, "run-dir": str(tmp_path / "again")}, 3, node_configs=nodes)
    again = []
    restarted.reply_hook = lambda reply: again.append(reply) or reply
    FederatedServer(from_run_config(restarted.contexts[1000].run_config), run_config).run(restarted)
    assert len(again) == 3 and all(r.has_error() and r.error.code == BUDGET_EXHAUSTED for r in again)


def test_node_config_sets_the_hospitals_own_budget():
    settings = from_run_config({"privacy-local-dp": True, "num-server-rounds": 5, "local-steps": 20,
                                "model-config": '{"loss": {"nce": 0.0}}'})
    node = parse_node_config({"data-path": "/data/a", "privacy-epsilon": 3.0, "privacy-delta": 1e-6})
    dp = hospital_privacy(settings, node)
    assert (dp.epsilon, dp.delta, dp.planned_steps) == (3.0, 1e-6, 100)
    assert hospital_privacy(settings, parse_node_config({})).epsilon == settings.privacy.epsilon
    with pytest.raises(ConfigError, match="privacy-epsilon"):
        hospital_privacy(settings, parse_node_config({"privacy-epsilon": -1.0}))
