"""Server checkpoints: round trip, atomic replacement, resume checks."""

import os

import pytest
import torch

import shared_model.checkpoint as model_checkpoint
from server.checkpoint import (
    ResumeError,
    ServerCheckpoint,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from shared_model.config import get_preset, to_dict


def _ckpt(round_: int) -> ServerCheckpoint:
    state = {"w": torch.full((2, 3), float(round_))}
    return ServerCheckpoint(
        round=round_, state=state, strategy={"m_t": {"w": torch.ones(2, 3)}, "v_t": None},
        history=[{"round": 0, "kind": "global", "dice": 0.1}, {"round": 1, "kind": "global", "dice": float("nan")}],
        best_round=0, best_dice=0.1, best_state=state, model_config=to_dict(get_preset("tiny")),
        run_config={"num-server-rounds": 3, "strategy": "fedavg"},
    )


def test_roundtrip(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", _ckpt(2))
    back = load_checkpoint(path)
    assert back.round == 2 and back.best_round == 0 and back.run_config["strategy"] == "fedavg"
    assert torch.equal(back.state["w"], torch.full((2, 3), 2.0))
    assert torch.equal(back.strategy["m_t"]["w"], torch.ones(2, 3)) and back.strategy["v_t"] is None
    assert back.history[0]["dice"] == 0.1 and back.history[1]["dice"] != back.history[1]["dice"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _ckpt(1))

    def torn_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(model_checkpoint.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _ckpt(2))
    monkeypatch.undo()
    assert load_checkpoint(path).round == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ResumeError, match="junk.pt: cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ResumeError, match="other.pt: not a promptsam-fl-checkpoint/1 file"):
        load_checkpoint(tmp_path / "other.pt")


def test_resume_needs_the_same_model_config(tmp_path):
    ckpt = _ckpt(1)
    check_resumable(ckpt, get_preset("tiny"), "ck.pt")
    with pytest.raises(ResumeError, match=r"differs at model.sam.lora_rank \(4 != 8\)"):
        check_resumable(ckpt, get_preset("tiny", {"sam": {"lora_rank": 8}}), "ck.pt")
