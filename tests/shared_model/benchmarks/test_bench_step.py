"""The step benchmark runs on the tiny preset and its two SAM paths compute the same masks."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from shared_model.benchmarks.step import copy_adapters, paired_sam_paths, plain_forward, plain_recipe, sam_path_forward
from shared_model.benchmarks.record import SUMMARIES, summary
from shared_model.benchmarks.timing import NO_DIFFERENCE
from cli.main import main
from shared_model.config import get_preset
from shared_model.modeling.sam import build_sam_parts

REPO = Path(__file__).resolve().parents[3]


def _randomise_lora_b(parts, std: float = 0.05) -> None:
    """Give LoRA a non-zero effect so both paths use it."""
    with torch.no_grad():
        for name, p in parts.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


def test_optimised_sam_path_matches_plain_recipe():
    cfg = get_preset("tiny").sam
    torch.manual_seed(0)
    plain, ours = paired_sam_paths(cfg)
    _randomise_lora_b(plain)
    copy_adapters(plain, ours)
    images = torch.rand(3, 3, 128, 128)
    boxes = torch.tensor([[[10.0, 20.0, 90.0, 100.0]]]).repeat(3, 1, 1)
    with torch.no_grad():
        a = plain_forward(plain, images, boxes)
        b = sam_path_forward(ours, images, boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = sam_path_forward(ours, images, boxes).float()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() < 0.1 * a.abs().max()  # bf16 tolerance


def test_paths_agree_at_base_size_where_the_decoder_carries_lora():
    """Base widths (one encoder block, the whole decoder): ours has LoRA on the decoder's q/v
    projections, whose weights peft renames to ``...base_layer...``; they must be copied too."""
    cfg = replace(get_preset("base").sam, depth=1, global_attn_indexes=[0], image_size=256)
    assert cfg.decoder_mode == "lora"
    torch.manual_seed(0)
    plain, ours = paired_sam_paths(cfg)
    renamed = [k for k in ours.state_dict() if k.startswith("mask_decoder.") and ".base_layer." in k]
    assert len(renamed) == 28  # weight and bias of the 14 q_proj / v_proj
    theirs = plain.state_dict()
    for key in renamed:
        assert torch.equal(ours.state_dict()[key], theirs[key.replace(".base_layer.", ".")]), key
    _randomise_lora_b(plain)
    copy_adapters(plain, ours)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[[40.0, 60.0, 200.0, 180.0]]])
    with torch.no_grad():
        a = plain_forward(plain, images, boxes)
        b = sam_path_forward(ours, images, boxes)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_copy_adapters_names_what_the_target_lacks():
    cfg = get_preset("tiny").sam
    plain = plain_recipe(cfg)
    bare = build_sam_parts(replace(cfg, lora_rank=0))
    with pytest.raises(ValueError, match=r"missing from the target \['image_encoder\.blocks\.0\.attn\.qkv\.lora_A"):
        copy_adapters(plain, bare)


def test_bench_step_cli_prints_ratios(capsys):
    assert main(["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("plain", "sam_path", "full"):
        assert out[key]["images_per_s"] > 0 and out[key]["gflop_per_step"] > 0
    for key in ("sam_path_vs_plain", "full_vs_sam_path", "sam_path_vs_plain_cpu"):
        assert out[key]["median"] > 0 and out[key]["verdict"] in ("faster", "slower", NO_DIFFERENCE)
    assert out["max_abs_diff_sam_paths"] < 1e-3
    assert out["attention"] == "auto" and out["threads"] == 1 and out["interleaved"]


def test_bench_step_out_records_command_machine_load_and_spread(tmp_path, capsys):
    path = tmp_path / "step.json"
    argv = ["bench", "step", "--preset", "tiny", "--batch", "1", "--steps", "2", "--warmup", "1", "--device", "cpu",
            "--out", str(path)]
    assert main(argv) == 0
    record = json.loads(path.read_text())
    assert record["command"] == "promptsam " + " ".join(argv)
    assert record["warmup"] == 1 and record["machine"]["torch"] == torch.__version__
    assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["torch_threads"] >= 1
    assert len(record["load_average_start"]) == len(record["load_average_end"]) == 3
    (result,) = record["results"]
    for key in ("plain", "sam_path", "full"):
        t = result[key]["step_seconds"]
        assert t["repeats"] == 2 and t["min"] <= t["median"] <= t["max"] and len(t["all"]) == 2
    ratio = result["sam_path_vs_plain"]
    assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"] and ratio["repeats"] == 2
    # images/s ratio of each repeat = plain's step time / ours, same repeat
    t_plain, t_ours = result["plain"]["step_seconds"]["all"], result["sam_path"]["step_seconds"]["all"]
    assert sorted(ratio["all"]) == pytest.approx(sorted(a / b for a, b in zip(t_plain, t_ours)))
    assert main(["bench", "step", "--steps", "1", "--out", str(tmp_path / "step.txt")]) == 2
    assert "--out" in capsys.readouterr().err


# Records of benchmarks that have a README line (shared_model.benchmarks.record.SUMMARIES).
RECORDS = [p for p in sorted((REPO / "docs" / "bench").glob("*.json"))
           if json.loads(p.read_text())["command"].split()[2] in SUMMARIES]


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_readme_quotes_the_committed_benchmark_records(path):
    record = json.loads(path.read_text())
    if not record["command"].startswith("promptsam bench memory"):  # byte counts are not timed
        assert record["warmup"] >= 1
        assert all(r.get("repeats", r.get("steps")) >= 5 for r in record["results"])
    line = summary(record)
    docs = (REPO / "README.md").read_text() + (REPO / "deploy" / "PRIVACY.md").read_text()
    assert line in docs, f"neither README.md nor deploy/PRIVACY.md quotes docs/bench/{path.name}: {line}"


def test_bench_all_script_regenerates_every_committed_record():
    script = (REPO / "scripts" / "bench_all.sh").read_text()
    assert RECORDS and all(f"docs/bench/{p.name}" in script for p in RECORDS)


def test_saved_activation_bytes_scale_with_batch_and_drop_with_checkpointing(capsys):
    from shared_model.benchmarks.step import saved_activation_bytes
    from cli.main import main

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
