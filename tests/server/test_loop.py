"""The server loop with real clients in one process (InProcessGrid): resume, dropped replies, state."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from client.task import EVAL_METRIC_KEYS, TRAIN_METRIC_KEYS
from client.wire import state_to_record
from server.checkpoint import ResumeError, load_checkpoint
from shared_model.config import ConfigError
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import run_inprocess

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
FAST = {
    "federation.num_server_rounds": 2,
    "federation.local_steps": 2,
    "federation.keep_round_checkpoints": True,
    "train.batch_size": 2,
    "synthetic.per_centre": 8,
    "synthetic.image_size": 64,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("full")
    run_inprocess(DEMO, FAST, run_dir)
    return run_dir


def test_run_writes_checkpoints_metrics_audit_and_report(uninterrupted):
    ckpt = load_checkpoint(uninterrupted / "checkpoint.pt")
    assert ckpt.round == 2 and ckpt.model_config["preset"] == "tiny"
    assert (uninterrupted / "checkpoints" / "round-001.pt").is_file()
    rows = _rows(uninterrupted)
    assert [r["round"] for r in rows if r["kind"] == "global"] == [0, 1, 2]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 6 and all(r["accepted"] for r in train)
    assert {r["hospital"] for r in train} == {"centre_0", "centre_1", "centre_2"}
    assert ckpt.history == [json.loads(json.dumps(r)) for r in ckpt.history]
    for name in ("report.md", "summary.json", "dice.png", "bytes.png", "best_model.pt", "final_model.pt"):
        assert (uninterrupted / name).is_file(), name
    keys = set(ckpt.state)
    for msg in _rows(uninterrupted, "messages.jsonl"):
        if msg["phase"] == "train":
            assert set(msg["array-records"]) == {"arrays"} and set(msg["array-records"]["arrays"]) == keys
            assert msg["metric-records"] == {"metrics": sorted(TRAIN_METRIC_KEYS)}
        else:
            assert msg["array-records"] == {} and msg["metric-records"] == {"metrics": sorted(EVAL_METRIC_KEYS)}
        assert msg["config-records"] == {}


def test_resume_after_round_1_reproduces_round_2(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "data", tmp_path / "data")
    shutil.copy(uninterrupted / "checkpoints" / "round-001.pt", tmp_path / "checkpoint.pt")
    run_inprocess(DEMO, FAST, tmp_path, resume=True)
    resumed, full = load_checkpoint(tmp_path / "checkpoint.pt"), load_checkpoint(uninterrupted / "checkpoint.pt")
    assert resumed.round == 2
    for k, v in full.state.items():
        assert torch.equal(resumed.state[k], v), k
    assert [r for r in resumed.history if r["kind"] == "global"] == [r for r in full.history if r["kind"] == "global"]
    assert _rows(tmp_path) == [json.loads(json.dumps(r).replace("NaN", "null")) for r in resumed.history]


def test_resume_guards(uninterrupted, tmp_path):
    with pytest.raises(ResumeError, match="checkpoint.pt exists: set resume=true"):
        run_inprocess(DEMO, FAST, uninterrupted)
    with pytest.raises(ConfigError, match="--resume: .* holds no checkpoint.pt"):
        run_inprocess(DEMO, FAST, tmp_path / "empty", resume=True)
    shutil.copy(uninterrupted / "checkpoint.pt", tmp_path / "checkpoint.pt")
    shutil.copytree(uninterrupted / "data", tmp_path / "data")
    with pytest.raises(ResumeError, match="differs at model.sam.lora_rank"):
        run_inprocess(DEMO, {**FAST, "model.sam.lora_rank": 2}, tmp_path, resume=True)


def test_tampered_reply_is_dropped_and_the_round_goes_on(tmp_path, caplog):
    def poison(reply: Message) -> Message:
        if reply.metadata.src_node_id == 1001 and reply.has_content() and reply.content.array_records:
            arrays = reply.content["arrays"]
            bad = {k: torch.full(tuple(a.shape), float("nan")) for k, a in arrays.items()}
            reply.content = RecordDict({"arrays": state_to_record(bad), "metrics": reply.content["metrics"]})
        return reply

    run_inprocess(DEMO, {**FAST, "federation.num_server_rounds": 1}, tmp_path, reply_hook=poison)
    train = [r for r in _rows(tmp_path) if r["kind"] == "train"]
    dropped = [r for r in train if not r["accepted"]]
    assert [r["node-id"] for r in dropped] == [1001] and "non-finite" in dropped[0]["reason"]
    assert sum(r["accepted"] for r in train) == 2
    round_row = next(r for r in _rows(tmp_path) if r["kind"] == "round")
    assert round_row["dropped"] == 1 and round_row["accepted"] == 2


def test_fedprox_float16_wire_and_optimizer_state_in_context(tmp_path, monkeypatch):
    import client.update as client_update

    seen = {}
    original = client_update.train_round

    def spy(*args, **kwargs):
        seen.setdefault("mu", []).append(kwargs["proximal_mu"])
        seen.setdefault("opt", []).append(kwargs["optimizer_state"] is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(client_update, "train_round", spy)
    run_inprocess(DEMO, {**FAST, "federation.strategy": "fedprox", "federation.proximal_mu": 0.05,
                         "federation.keep_optimizer_state": True, "federation.wire_dtype": "float16",
                         "synthetic.per_centre": 6}, tmp_path)
    assert seen["mu"] == [0.05] * 6
    assert seen["opt"] == [False] * 3 + [True] * 3  # round 2 continues from context.state
    numel = sum(v.numel() for v in load_checkpoint(tmp_path / "checkpoint.pt").state.values())
    train = [r for r in _rows(tmp_path) if r["kind"] == "train"]
    for row in train:  # float16 both ways: 2 bytes per value plus one small .npy header per tensor
        assert 2 * numel < row["bytes-up"] < 2 * numel + 200 * 200
        assert row["bytes-down"] == row["bytes-up"]


def test_server_config_errors_name_the_key(tmp_path):
    from server.loop import FederatedServer
    from shared_model.config import (DataConfig, FederationConfig, PartitionConfig, TrainConfig, from_run_config,
                                     to_run_config)

    def server(**fed):
        rc = to_run_config(FederationConfig(**fed), PartitionConfig(), {"preset": "tiny"}, TrainConfig(),
                           DataConfig(root=str(tmp_path / "nowhere")))
        return FederatedServer(from_run_config(rc), rc)

    with pytest.raises(ConfigError, match="run-dir: the server needs a folder"):
        server()
    with pytest.raises(ConfigError, match="global-eval='val': .*nowhere: dataset root folder not found"):
        server(run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="global-eval: 'elsewhere' is neither"):
        server(run_dir=str(tmp_path / "run"), global_eval="elsewhere")
    assert server(run_dir=str(tmp_path / "run"), global_eval="none").eval_set is None


def test_test_report_baseline_is_fitted_on_the_training_split_per_centre(synthetic_root, tmp_path, monkeypatch):
    from server.loop import FederatedServer, pooled_splits
    from shared_model.config import (DataConfig, FederationConfig, PartitionConfig, TrainConfig, from_run_config,
                                     to_run_config)
    from shared_model.data.dataset import PolypDataset
    from shared_model.exchange import get_exchanged_state
    from shared_model.modeling.prompt_sam import build_model
    from shared_model.training import evaluate

    data = DataConfig(root=str(synthetic_root), val_fraction=0.25, test_fraction=0.25)
    rc = to_run_config(FederationConfig(run_dir=str(tmp_path / "run"), global_eval="val"), PartitionConfig(),
                       {"preset": "tiny"}, TrainConfig(), data)
    server = FederatedServer(from_run_config(rc), rc)
    fitted: list[list[str]] = []
    original = evaluate.fit_constant_mask
    monkeypatch.setattr(evaluate, "fit_constant_mask",
                        lambda train, *a: (fitted.append([s.stem for s in train.samples]), original(train, *a))[1])
    report = server.test_report(get_exchanged_state(build_model("tiny")))
    splits = pooled_splits(data)
    assert fitted == [[s.stem for s in splits["train"]]]  # the training split only, never a test image
    assert not set(fitted[0]) & {s.stem for s in server.test_set.samples}
    base = report["constant_mask_baseline"]
    assert set(base["by_centre"]) == set(report["best_round_test_by_centre"]) == {"centre_0", "centre_1", "centre_2"}
    assert all(base["by_centre"][c]["n"] == report["best_round_test_by_centre"][c]["n"] for c in base["by_centre"])
    fit = original(PolypDataset(splits["train"], server.test_set.image_size, prompt_mode="class"))
    expected = evaluate.score_constant_mask(fit["mask"], server.test_set)
    assert base["pooled"]["dice"] == pytest.approx(expected.aggregate["dice"])
    assert base["threshold"] == fit["threshold"] and base["fitted_on"] == f"pooled training split ({len(splits['train'])} images)"
    assert report["eval_prompt"] == "class"
