"""A federated run whose exchanged state is only a task adapter (``adapter.enabled``).

One round of two hospitals in one process (no Ray) on synthetic data, tiny preset: every reply
carries exactly the adapter's tensors (peft LoRA named "task" and the task embedding), nothing of
the base's own trainable set; the reported bytes per round are the adapter's; the run writes
``base_model.pt`` + ``final_adapter.pt``, which ``load_adapted_model`` accepts.
"""

import json

import pytest
import torch

from cli.simulation import cmd_simulate, register  # noqa: F401 - the flag is wired (checked below)
from shared_model.config import AdapterConfig, get_preset
from shared_model.exchange import state_nbytes, state_shapes
from shared_model.fewshot.adapter import attach_adapter, load_adapted_model
from shared_model.modeling.prompt_sam import build_model
from simulation.experiment import PROJECT_ROOT
from simulation.inprocess import run_inprocess

DEMO = PROJECT_ROOT / "simulation" / "configs" / "demo.yaml"
SETTINGS = {
    "federation.num_server_rounds": 1,
    "federation.local_steps": 2,
    "federation.min_nodes": 2,
    "synthetic.per_centre": 8,
    "synthetic.centres": 2,
    "simulation.num_supernodes": 2,
    "adapter.enabled": True,
    "adapter.name": "polyp",
}


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adapter_fl") / "run"
    run_inprocess(DEMO, SETTINGS, run_dir)
    return run_dir


def _adapter_shapes():
    model = build_model(get_preset("tiny", {"sam": {"lora_rank": 4}}))
    base = set(state_shapes(model))
    attach_adapter(model, AdapterConfig(enabled=True, name="polyp"))
    return base, state_shapes(model)


def test_replies_carry_only_the_adapter(adapter_run):
    base, adapter = _adapter_shapes()
    audit = [json.loads(line) for line in (adapter_run / "messages.jsonl").read_text().splitlines()]
    train = [m for m in audit if m["phase"] == "train"]
    assert len(train) == 2
    for msg in train:
        assert "error" not in msg, msg
        keys = set(msg["array-records"]["arrays"])
        assert keys == set(adapter)
        assert not keys & {k for k in base if "lora_" in k}  # the base's own LoRA never travels
        assert all(".lora_A.task." in k or ".lora_B.task." in k or "lora_" not in k for k in keys)
        assert not any(k.startswith(("sam.image_encoder.", "clip_vision.", "bottleneck.")) for k in keys)


def test_bytes_per_round_are_the_adapters(adapter_run):
    _, adapter = _adapter_shapes()
    raw = state_nbytes({k: torch.empty(v) for k, v in adapter.items()})
    rows = [json.loads(line) for line in (adapter_run / "metrics.jsonl").read_text().splitlines()]
    ups = [r["bytes-up"] for r in rows if r.get("kind") == "train" and r.get("accepted")]
    assert ups, rows[:3]
    for up in ups:
        assert raw <= up < raw + 200 * len(adapter)  # the adapter's values plus the arrays' headers
    assert raw < 0.2 * state_nbytes({k: torch.empty(v) for k, v in state_shapes(build_model("tiny")).items()})


def test_run_writes_a_base_and_an_adapter_that_load(adapter_run):
    assert not (adapter_run / "final_model.pt").exists()
    model, _, payload = load_adapted_model(adapter_run / "base_model.pt", adapter_run / "final_adapter.pt")
    assert payload["name"] == "polyp" and payload["extra"]["federated"]
    assert set(state_shapes(model)) == set(_adapter_shapes()[1])


def test_cli_flag_sets_the_config_key(monkeypatch):
    import argparse

    seen = {}
    monkeypatch.setattr("cli.simulation.simulate", lambda config, overrides, run_dir, resume: seen.update(overrides))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", "--adapter-only", "--set", "federation.num_server_rounds=1"])
    args.func(args)
    assert seen == {"adapter.enabled": "true", "federation.num_server_rounds": "1"}


def test_server_log_line_gives_the_adapters_bytes():
    from server.adapter import describe_adapter
    from shared_model.config import DataConfig, FederationConfig, PartitionConfig, RunSettings, TrainConfig
    from shared_model.fewshot.federated import build_run_model

    settings = RunSettings(FederationConfig(), PartitionConfig(), get_preset("tiny"), TrainConfig(), DataConfig(),
                           adapter=AdapterConfig(enabled=True, name="lesion"))
    model = build_run_model(settings)
    raw = state_nbytes({k: torch.empty(v) for k, v in state_shapes(model).items()})
    line = describe_adapter(model, "float32")
    assert f"{raw:,} B raw" in line and "'lesion'" in line and model.base_record["fingerprint"] in line
