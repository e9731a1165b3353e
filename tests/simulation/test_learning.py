"""The federated recipe learns: a short tiny run on synthetic data improves in every round.

Round 1 used to send the global model to an all-background prediction (Dice 0): BCE averaged over
the pixels of small polyps drove every pixel to background in the first steps, and a warm-up +
cosine schedule restarted every round. Asserted on several seeds, not one lucky one.
"""

import json

import pytest

from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import run_inprocess

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
# The deployment test's recipe: 2 hospitals, 2 rounds of 24 steps, lr 0.003 without warm-up.
TWO_ROUNDS = {
    "federation.num_server_rounds": 2,
    "federation.local_steps": 24,
    "train.lr": 0.003,
    "train.warmup_steps": 0,
    "synthetic.centres": 2,
    "synthetic.per_centre": 10,
    "synthetic.image_size": 64,
    "simulation.num_supernodes": 2,
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_round_run_improves_in_every_round(tmp_path, seed):
    run_inprocess(DEMO, {**TWO_ROUNDS, "federation.seed": seed, "synthetic.seed": seed}, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dice = [r["dice"] for r in sorted((r for r in rows if r["kind"] == "global"), key=lambda r: r["round"])]
    assert len(dice) == 3
    assert dice[1] > dice[0] + 0.005 and dice[2] > dice[1] + 0.005, f"global Dice per round: {dice}"
