"""This project's Flower app deployed for real on loopback: TLS, SuperNode authentication, 2 hospitals.

``flower-superlink`` (TLS, ``--enable-supernode-auth``, SQLite state) and registered ``flower-supernode``
processes, each with its own key and synthetic hospital folder, run ``flwr run .`` with the tiny preset:

* the run finishes, the global Dice on a held-out folder improves, checkpoint and models exist; a third
  hospital whose folder holds a non-binary mask is dropped every round with an error naming that file,
  and the rounds complete with the other two (the minimum, 2, is met);
* the server side (SuperLink, SuperExec, ServerApp) is killed after round 1 and restarted on the same
  state database; ``resume=true`` continues at round 2 and ends in the uninterrupted run's global state;
* a SuperNode killed during round 1 is reported by the SuperLink ("Node Unavailable"); with one valid
  reply, below ``min-nodes``, the round fails with a clear message keeping the global state; round 2
  waits for the restarted node and goes on;
* a malformed run config is refused (unknown key) or fails at once naming the field (wrong type).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.certs import CertBundle, generate_certs
from deploy.local import LocalFederation, RunResult, wait_for
from server.checkpoint import load_checkpoint
from shared_model.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[2]
GOOD = ("h1", "h2")
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Site:
    """The running federation and its files."""

    fed: LocalFederation
    certs: CertBundle
    data: Path
    bad: Path
    heldout: Path
    work: Path
    nodes: dict[str, Any]


def run_config(site: Site, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small deployment run: tiny preset, 2 rounds, global evaluation on the held-out folder."""
    rc: dict[str, Any] = {
        "num-server-rounds": 2,
        "min-nodes": 2,
        "fraction-evaluate": 0.0,
        "local-steps": 24,
        "seed": 0,
        "run-dir": str(run_dir),
        "global-eval": str(site.heldout),
        "model-config": json.dumps({"preset": "tiny"}),
        "train-config": json.dumps({"batch_size": 4, "lr": 0.003, "warmup_steps": 0, "amp": False,
                                    "progress": False}),
        "data-config": json.dumps({"val_fraction": 0.2, "test_fraction": 0.0, "augment": False}),
    }
    rc.update(overrides)
    return rc


def metrics(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def start_node(site: Site, name: str, folder: Path, partition: int):
    proc = site.fed.start_supernode(name, {"data-path": str(folder), "partition-id": partition})
    site.nodes[name] = proc
    return proc


def wait_nodes_online(fed: LocalFederation, count: int, timeout: float = 120.0) -> None:
    wait_for(lambda: sum(n["status"] == "online" for n in fed.supernodes()) >= count, timeout,
             f"{count} SuperNodes online", interval=2.0, proc=fed.superlink)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("project")
    certs = generate_certs(work / "certs", ["IP:127.0.0.1", "DNS:localhost"], [*GOOD, "h3"])
    data = generate_dataset(work / "data", list(GOOD), per_centre=10, image_size=64, seed=0)
    heldout = generate_dataset(work / "heldout", ["heldout"], per_centre=8, image_size=64, seed=1) / "heldout"
    bad = work / "bad" / "h3"
    shutil.copytree(data / "h1", bad)
    mask_path = sorted((bad / "masks").iterdir())[3]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0], mask[0, 1] = 128, 255  # three values: 0, 128, 255
    Image.fromarray(mask).save(mask_path)
    # One torch thread per process: 2 cores shared by the SuperLink, the ServerApp and every ClientApp.
    fed = LocalFederation(work / "fed", certs, database=work / "state.db", env_extra=dict(SINGLE_THREAD))
    s = Site(fed, certs, data, bad, heldout, work, {})
    try:
        fed.start_superlink()
        for name in (*GOOD, "h3"):
            fed.register(certs.hospitals[name][1])
        for i, name in enumerate(GOOD):
            start_node(s, name, data / name, i)
        for name in GOOD:
            fed.wait_online(s.nodes[name])
        yield s
    finally:
        fed.close()


def test_malformed_run_config_is_refused_naming_the_field(site: Site) -> None:
    run_dir = site.work / "run-bad-config"
    # An unknown key: the flwr CLI refuses it before anything is submitted.
    result = site.fed.run(REPO, run_config(site, run_dir, **{"local-stepz": 3}), timeout=120)
    assert result.run_id is None and "Invalid run configuration" in result.output, result.output
    # A value of the wrong type: the ServerApp fails at once with the field's name; nothing is written.
    result = site.fed.run(REPO, run_config(site, run_dir, **{"local-steps": "ten"}), timeout=300)
    assert result.status == "finished:failed", result.status
    assert "local-steps" in result.details and "integer" in result.details, result.details
    assert not (run_dir / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def reference(site: Site) -> tuple[RunResult, Path]:
    """The uninterrupted 2-round run of h1 and h2, with h3 (a non-binary mask in its folder) online too."""
    bad_node = start_node(site, "h3", site.bad, 2)
    site.fed.wait_online(bad_node)
    run_dir = site.work / "run-reference"
    try:
        result = site.fed.run(REPO, run_config(site, run_dir), timeout=600)
    finally:
        bad_node.stop()
    wait_nodes_online(site.fed, 2)
    return result, run_dir


def test_two_round_run_finishes_improves_and_checkpoints(reference) -> None:
    result, run_dir = reference
    assert result.ok, f"{result.status}: {result.details}\n{result.output[-5000:]}"
    rounds = metrics(run_dir, "round")
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["accepted"] for r in rounds] == [2, 2]
    dice = {r["round"]: r["dice"] for r in metrics(run_dir, "global")}
    assert set(dice) == {0, 1, 2}
    assert dice[2] > dice[0] + 0.02, dice
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt.round == 2
    assert (run_dir / "final_model.pt").is_file() and (run_dir / "report.md").is_file()
    from shared_model.checkpoint import load_model_checkpoint

    model, _ = load_model_checkpoint(run_dir / "final_model.pt", expect_preset="tiny")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def _wait_checkpoint_round(path: Path, rnd: int, timeout: float, proc) -> None:
    def done() -> bool:
        try:
            return path.is_file() and load_checkpoint(path).round >= rnd
        except Exception:  # noqa: BLE001 - a checkpoint being replaced; try again
            return False

    wait_for(done, timeout, f"checkpoint of round {rnd}", interval=0.5, proc=proc)


def test_server_killed_after_round_1_resumes_at_round_2(site: Site, reference) -> None:
    _, ref_dir = reference
    run_dir = site.work / "run-resume"
    rc = run_config(site, run_dir)
    first = site.fed.start_run(REPO, rc)
    try:
        _wait_checkpoint_round(run_dir / "checkpoint.pt", 1, 300, first)
        site.fed.superlink.kill()  # SuperLink, its SuperExec and the ServerApp: the site is gone
    finally:
        first.stop()
    time.sleep(1)
    assert load_checkpoint(run_dir / "checkpoint.pt").round == 1, "round 2 must not have completed"
    site.fed.start_superlink()  # same port, same state database: registered nodes come back by themselves
    wait_nodes_online(site.fed, 2)
    result = site.fed.run(REPO, {**rc, "resume": True}, timeout=600)
    assert result.ok, f"{result.status}: {result.details}\n{result.output[-5000:]}"
    assert "resuming after round 1" in result.output
    ours, ref = load_checkpoint(run_dir / "checkpoint.pt"), load_checkpoint(ref_dir / "checkpoint.pt")
    assert ours.round == ref.round == 2
    assert ours.state.keys() == ref.state.keys()
    for key in ref.state:
        torch.testing.assert_close(ours.state[key], ref.state[key], rtol=0, atol=1e-6, msg=key)
    assert [r["round"] for r in metrics(run_dir, "round")] == [1, 2]


def test_hospital_with_a_bad_mask_is_dropped_naming_the_file(site: Site, reference) -> None:
    _, run_dir = reference
    bad_mask = sorted((site.bad / "masks").iterdir())[3].name
    dropped = [r for r in metrics(run_dir, "train") if not r["accepted"]]
    assert [r["round"] for r in dropped] == [1, 2]
    for row in dropped:
        assert bad_mask in row["reason"] and "not binary" in row["reason"], row
    # The minimum (2) is still met: both rounds completed with h1 and h2 (see the test above).
    assert bad_mask in site.nodes["h3"].text()  # the hospital's own log names the file too


def test_supernode_killed_mid_round(site: Site) -> None:
    run_dir = site.work / "run-kill"
    victim = site.nodes["h2"]
    mark = len(victim.text())
    run = site.fed.start_run(REPO, run_config(site, run_dir, **{"local-steps": 2}))
    try:
        wait_for(lambda: "Start `flwr-clientapp`" in victim.text()[mark:], 240, "h2 training", proc=run)
        victim.kill()
        # Round 1 ends once the SuperLink declares h2 unavailable (2 missed 30 s heartbeats).
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and metrics(run_dir, "round"), 240,
                 "round 1 to end", interval=1.0, proc=run)
        # Round 2 waits for min-nodes (2) available nodes: h2 comes back.
        start_node(site, "h2", site.data / "h2", 1)
        run.popen.wait(timeout=400)
    finally:
        run.stop()
    result = site.fed.result(run.text(), run.popen.returncode)
    assert result.ok, f"{result.status}: {result.details}\n{result.output[-5000:]}"
    first, second = metrics(run_dir, "round")
    assert first["accepted"] == 1 and first["dropped"] == 1, first
    h2_row = next(r for r in metrics(run_dir, "train") if r["round"] == 1 and not r["accepted"])
    assert "unavailable" in h2_row["reason"].lower(), h2_row
    # 1 valid reply < min-nodes 2: the round fails with a clear message and keeps the global state.
    assert "round 1 failed: 1 valid train reply, fewer than min-nodes=2" in result.output
    dice = {r["round"]: r["dice"] for r in metrics(run_dir, "global")}
    assert dice[1] == dice[0]
    # The next round goes on with both hospitals.
    assert second["accepted"] == 2, second
    assert dice[2] != dice[1]
