"""The step benchmark runs on the tiny preset and its two SAM paths compute the same masks."""

import json

import torch

from shared_model.bench import plain_forward, plain_recipe, sam_path_forward
from shared_model.cli import main
from shared_model.config import get_preset
from shared_model.sam import build_sam_parts


def test_optimised_sam_path_matches_plain_recipe():
    cfg = get_preset("tiny").sam
    torch.manual_seed(0)
    plain = plain_recipe(cfg)
    ours = build_sam_parts(cfg)
    missing, unexpected = ours.load_state_dict(plain.state_dict(), strict=False)
    assert not missing and not unexpected
    with torch.no_grad():  # give LoRA a non-zero effect so both paths use it
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        ours.load_state_dict(plain.state_dict())
    images = torch.rand(3, 3, 128, 128)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 100.0]]]).repeat(3, 1, 1)
    with torch.no_grad():
        a = plain_forward(plain, images, boxes)
        b = sam_path_forward(ours, images, boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = sam_path_forward(ours, images, boxes).float()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() < 0.1 * a.abs().max()  # bf16 tolerance


def test_bench_step_cli_prints_ratios(capsys):
    assert main(["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("plain", "sam_path", "full"):
        assert out[key]["images_per_s"] > 0 and out[key]["gflop_per_step"] > 0
    assert out["sam_path_vs_plain"] > 0 and out["full_vs_sam_path"] > 0
    assert out["max_abs_diff_sam_paths"] < 1e-3


def test_saved_activation_bytes_scale_with_batch_and_drop_with_checkpointing(capsys):
    from shared_model.bench import saved_activation_bytes
    from shared_model.cli import main

    one = saved_activation_bytes("tiny", batch_size=1)
    two = saved_activation_bytes("tiny", batch_size=2)
    # Per-image activations double; a few batch-independent tensors (positional encodings) do not.
    assert 1.8 * one["sam_path_gib"] < two["sam_path_gib"] <= 2 * one["sam_path_gib"]
    assert one["full_gib"] > one["sam_path_gib"] > 0
    ckpt = saved_activation_bytes("tiny", batch_size=2, activation_checkpointing=True)
    assert ckpt["sam_path_gib"] < 0.5 * two["sam_path_gib"]
    half = saved_activation_bytes("tiny", batch_size=2, dtype=torch.bfloat16)
    assert half["sam_path_gib"] < two["sam_path_gib"]  # matmul inputs kept in bf16 (norms stay fp32)
    assert main(["bench", "memory", "--batch", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["activation_checkpointing"] for r in lines] == [False, True]
