"""Single-site training and evaluation on synthetic data, and the train/evaluate/predict CLI."""

import json

import numpy as np
import torch
from PIL import Image

from shared_model.checkpoint import CheckpointError, load_model_checkpoint, save_model_checkpoint
from cli.main import main
from shared_model.config import DataConfig, TrainConfig
from shared_model.data import build_datasets
from shared_model.training.evaluate import evaluate_model
from shared_model.exchange import get_exchanged_state
from shared_model.modeling.prompt_sam import build_model
from shared_model.training.loop import LRSchedule, add_proximal_gradient, train_model, warmup_cosine

import pytest


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_evaluation_reports_metrics(synthetic_root):
    splits = build_datasets(DataConfig(root=str(synthetic_root), val_fraction=0.0, test_fraction=0.25), 128)
    model = build_model("tiny")
    cfg = TrainConfig(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, progress=False)
    before = get_exchanged_state(model)
    result = train_model(model, splits["train"], cfg)
    assert result.steps == 12 and result.num_examples == 48
    first = np.mean([h["total"] for h in result.history[:3]])
    last = np.mean([h["total"] for h in result.history[-3:]])
    assert last < first
    after = get_exchanged_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ev = evaluate_model(model, splits["test"], batch_size=4)
    assert ev.aggregate["n"] == len(splits["test"]) == len(ev.per_image)
    for key in ("dice", "iou", "precision", "recall", "hd95"):
        assert key in ev.aggregate and np.isfinite(ev.aggregate[key])
    assert {"stem", "centre", "dice"} <= set(ev.per_image[0])


def test_proximal_term_keeps_weights_closer(synthetic_root):
    splits = build_datasets(DataConfig(root=str(synthetic_root), val_fraction=0.0, test_fraction=0.0), 128)
    drift = {}
    for mu in (0.0, 50.0):
        model = build_model("tiny")
        ref = get_exchanged_state(model)
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, proximal_mu=mu)
        train_model(model, splits["train"], cfg, proximal_reference=ref)
        now = get_exchanged_state(model)
        drift[mu] = sum(float((now[k] - ref[k]).pow(2).sum()) for k in ref)
    assert drift[50.0] < drift[0.0]


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = save_model_checkpoint(tmp_path / "m.pt", model, extra={"note": "x"})
    again, payload = load_model_checkpoint(path, expect_preset="tiny")
    assert payload["extra"] == {"note": "x"}
    for k, v in get_exchanged_state(model).items():
        assert torch.equal(v, get_exchanged_state(again)[k])
    with pytest.raises(CheckpointError, match="preset 'tiny', not 'base'"):
        load_model_checkpoint(path, expect_preset="base")
    with pytest.raises(CheckpointError, match="nope.pt: checkpoint file not found"):
        load_model_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_model_checkpoint(tmp_path / "junk.pt")


def test_cli_train_evaluate_predict(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(synthetic_root), "--steps", "2",
                 "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and "dice" in metrics["test"]
    ckpt = out / "model.pt"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(synthetic_root),
                 "--prompt", "polyp", "--out", str(tmp_path / "ev.json"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "ev.json").read_text())["aggregate"]["n"] > 0
    images = sorted((synthetic_root / "centre_0" / "images").iterdir())[:2]
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "odd.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"odd.png": [5, 5, 50, 30]}))
    pred = tmp_path / "pred"
    assert main(["predict", *map(str, images), str(tmp_path / "odd.png"), "--checkpoint", str(ckpt),
                 "--boxes", str(boxes), "--out", str(pred), "--device", "cpu"]) == 0
    summary = json.loads((pred / "masks" / "odd.json").read_text())
    assert summary["boxes"] == [[5.0, 5.0, 50.0, 30.0]]
    assert Image.open(pred / "masks" / "odd.png").size == (60, 40)
    assert Image.open(pred / "overlays" / f"{images[0].stem}.png").mode == "RGB"
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "missing"), "--checkpoint", str(ckpt)]) == 2
    assert "missing: no such image file or folder" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(ckpt), "--preset", "base", "--data", str(synthetic_root)]) == 2


def test_inspect_json(capsys):
    assert main(["inspect", "--preset", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] * 4 == info["exchange_bytes_raw"]
    assert info["trainable_params"] * 2 == info["exchange_bytes_raw_fp16"] == info["exchange_bytes_wire_bf16"]
    from flwr.common.serde import array_record_from_proto, array_record_to_proto
    from flwr.proto.recorddict_pb2 import ArrayRecord as ProtoArrayRecord

    from client.wire import record_to_state, state_to_record
    from shared_model.exchange import get_exchanged_state
    from shared_model.modeling.prompt_sam import build_model

    state = get_exchanged_state(build_model("tiny"))
    proto = array_record_to_proto(state_to_record(state)).SerializeToString()
    assert len(proto) == info["exchange_bytes_protobuf"]
    decoded = array_record_from_proto(ProtoArrayRecord.FromString(proto))
    assert sum(len(a.data) for a in decoded.values()) == info["exchange_bytes_wire"]  # what the run counts
    assert info["exchange_bytes_raw"] < info["exchange_bytes_wire"] < info["exchange_bytes_protobuf"]
    assert all(torch.equal(a, b) for a, b in zip(record_to_state(decoded).values(), state.values()))
    assert info["total_params"] > info["trainable_params"] > 0
    assert set(info["components"]) >= {"sam", "clip_vision", "clip_text", "bottleneck", "prompts"}


def test_constant_mask_baseline_hand_computed():
    from shared_model.training.evaluate import constant_mask_baseline

    def item(mask):
        return {"mask": mask[None].float()}

    left = torch.zeros(8, 8)
    left[:, :4] = 1
    top_left = torch.zeros(8, 8)
    top_left[:4, :4] = 1
    train = [item(left), item(left), item(top_left)]  # mean: 1 on top-left, 2/3 on bottom-left
    out = constant_mask_baseline(train, [item(left)], thresholds=(0.5, 0.9))
    assert out["threshold"] == 0.5  # the left half: train dice (1 + 1 + 2*16/(32+16)) / 3
    assert out["train_dice"] == pytest.approx((2 + 2 / 3) / 3)
    assert out["dice"] == pytest.approx(1.0) and out["n"] == 1


def test_federated_schedule_is_one_schedule_over_the_run():
    rounds, local, warmup = 4, 5, 3
    whole = [LRSchedule().multiplier(s, warmup, rounds * local) for s in range(rounds * local)]
    pieced = [LRSchedule.federated(r, local, rounds).multiplier(s, warmup, local)
              for r in range(1, rounds + 1) for s in range(local)]
    assert pieced == pytest.approx(whole)
    # The warm-up happens once: no round after the first starts below the previous round's end.
    starts = [LRSchedule.federated(r, local, rounds).multiplier(0, warmup, local) for r in range(1, rounds + 1)]
    assert starts[0] < starts[1] and starts[1:] == sorted(starts[1:], reverse=True)
    # A resumed run past the planned rounds stays at the floor instead of failing.
    assert LRSchedule.federated(rounds + 2, local, rounds).multiplier(0, warmup, local) == pytest.approx(0.1)


def test_train_model_follows_the_given_schedule(synthetic_root):
    splits = build_datasets(DataConfig(root=str(synthetic_root), val_fraction=0.0, test_fraction=0.0), 128)
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=4, progress=False)
    schedule = LRSchedule.federated(2, 3, 3)  # global steps 3..5 of 9
    result = train_model(build_model("tiny"), splits["train"], cfg, schedule=schedule)
    expected = [1e-3 * warmup_cosine(3 + s, 4, 9) for s in range(3)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


def test_add_proximal_gradient_adds_mu_times_drift_and_returns_the_term():
    model = torch.nn.Linear(2, 1)
    reference = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, -2.0]]))
    model.weight.grad = torch.ones_like(model.weight)
    value = add_proximal_gradient(model, reference, mu=0.5)
    assert value == pytest.approx(0.5 * 0.5 * 5.0)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(model.bias.grad, torch.zeros(1))
