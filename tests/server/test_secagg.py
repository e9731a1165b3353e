"""SecAgg+: the server receives only masked vectors, and unmasks their weighted average."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.client import ClientApp as LegacyClientApp
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import bytes_to_ndarray

from server.checkpoint import load_checkpoint
from server.secagg import secagg_train_round
from shared_model.config import ModelConfig, from_dict, from_run_config
from shared_model.exchange import get_exchanged_state
from shared_model.modeling.prompt_sam import build_model
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import InProcessGrid, run_inprocess, wire_copy

CLIP, LEVELS, MAX_WEIGHT = 0.5, 2**22, 100.0
WEIGHTS = {0: 10, 1: 30, 2: 60}
SHAPES = [(40, 50), (7,)]


def deltas(pid: int) -> list[np.ndarray]:
    rng = np.random.default_rng(pid)
    return [rng.normal(0.0, 0.01, shape).astype(np.float32) for shape in SHAPES]


class KnownDelta(NumPyClient):
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):
        assert [p.shape for p in parameters] == SHAPES and config["server-round"] == 1
        return deltas(self.pid), WEIGHTS[self.pid], {"num-examples": WEIGHTS[self.pid], "partition-id": self.pid,
                                                     "train-loss": 0.5, "train-steps": 1, "train-seconds": 0.1,
                                                     "val-dice": 0.3}


def known_app() -> LegacyClientApp:
    return LegacyClientApp(client_fn=lambda ctx: KnownDelta(int(ctx.node_config["partition-id"])).to_client(),
                           mods=[secaggplus_mod])


def test_server_sees_masked_vectors_and_unmasks_the_weighted_average():
    settings = from_run_config({"min-nodes": 3, "privacy-secagg": True, "privacy-secagg-clipping-range": CLIP,
                                "privacy-secagg-max-weight": MAX_WEIGHT})
    grid = InProcessGrid(known_app(), {}, 3)
    state = OrderedDict((f"t{i}", torch.zeros(shape)) for i, shape in enumerate(SHAPES))
    average, info = secagg_train_round(grid, settings, 1, state)

    plain = [sum(WEIGHTS[p] * deltas(p)[i] for p in WEIGHTS) / sum(WEIGHTS.values()) for i in range(len(SHAPES))]
    # Each hospital's values are scaled by w / max_weight and stochastically rounded to a step of
    # 2 clip / levels: after dividing by sum(w) / max_weight the error is below n * step * max_weight / sum(w).
    bound = 3 * (2 * CLIP / LEVELS) * MAX_WEIGHT / sum(WEIGHTS.values())
    for name, expected in zip(state, plain):
        error = float(np.abs(average[name].numpy() - expected).max())
        assert 0 < error <= bound  # quantised, and within the quantisation error
    assert [r["partition-id"] for r in sorted(info["records"], key=lambda r: r["partition-id"])] == [0, 1, 2]
    assert info["bytes-up"] > 0 and info["bytes-down"] > 0 and info["hospitals"] == 3

    masked = [r for r in info["replies"] if "masked_params" in r.content.config_records["secaggplus_configs"]]
    assert len(masked) == 3
    for reply in masked:
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())  # no plain arrays
        vectors = [bytes_to_ndarray(b) for b in reply.content.config_records["secaggplus_configs"]["masked_params"]]
        values = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)  # [0] is the weight factor
        assert values.size == sum(int(np.prod(s)) for s in SHAPES)
        # Uniform on [0, 2**32): nothing left of a delta whose quantised values sit near levels / 2.
        assert values.mean() == pytest.approx(2**31, rel=0.05)
        assert values.std() == pytest.approx(2**32 / np.sqrt(12), rel=0.05)


DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
ONE_ROUND = {
    "federation.num_server_rounds": 1,
    "federation.local_steps": 1,
    "federation.fraction_evaluate": 0.0,
    "federation.global_eval": "none",
    "train.batch_size": 2,
    "synthetic.per_centre": 8,
    "synthetic.image_size": 64,
}



def test_secagg_round_matches_the_plain_round_within_quantisation(tmp_path, one_thread):
    seen = []
    run_inprocess(DEMO, ONE_ROUND, tmp_path / "plain")
    run_inprocess(DEMO, {**ONE_ROUND, "privacy.secagg": True, "privacy.secagg_max_weight": 10.0},
                  tmp_path / "secagg", reply_hook=lambda r: seen.append(wire_copy(r)) or r)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    secure = load_checkpoint(tmp_path / "secagg" / "checkpoint.pt")
    weights = [r["num-examples"] for r in plain.history if r["kind"] == "train"]
    bound = len(weights) * (2 * 1.0 / LEVELS) * 10.0 / sum(weights)
    error = max(float((plain.state[k] - secure.state[k]).abs().max()) for k in plain.state)
    assert error <= bound
    initial = get_exchanged_state(build_model(from_dict(ModelConfig, plain.model_config, "model")))
    moved = max(float((plain.state[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 100 * bound  # the round did train: the comparison is not between two no-ops
    row = next(r for r in secure.history if r["kind"] == "round")
    assert row["accepted"] == 3 and row["secagg-seconds"] > 0 and row["bytes-up"] > 0
    # What the server received from the hospitals: protocol records, plain metrics, no arrays.
    stages = [set(r.content.config_records["secaggplus_configs"]) for r in seen]
    assert {"pk1", "pk2"} in stages and {"dsts", "ctxts"} in stages and {"masked_params"} in stages
    assert all(len(rec) == 0 for r in seen for rec in r.content.array_records.values())
