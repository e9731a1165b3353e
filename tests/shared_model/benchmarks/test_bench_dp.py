"""The DP step benchmark: every mode timed against the non-DP step, interleaved."""

import json

import pytest

from shared_model.benchmarks.dp import bench_dp_step, format_bench


def test_bench_dp_step_reports_every_mode_with_paired_ratios():
    result = bench_dp_step("tiny", batch_size=1, steps=2, warmup=0)
    assert result["modes"] == ["microbatch", "batched", "vmap"]
    assert result["non_dp_s"] > 0 and result["dp_microbatch_s"] > 0 and result["dp_batched_s"] > 0
    assert result["seconds"]["non_dp"]["repeats"] == 2 and result["warmup"] == 0
    ratio = result["ratio_batched"]
    dp, base = result["seconds"]["dp_batched"]["all"], result["seconds"]["non_dp"]["all"]
    assert sorted(ratio["all"]) == pytest.approx(sorted(a / b for a, b in zip(dp, base)))
    assert ratio["min"] <= ratio["median"] <= ratio["max"] and "verdict" in result["ratio_microbatch_cpu"]
    assert "DP batched" in format_bench(result)
    with pytest.raises(ValueError, match="--modes"):
        bench_dp_step("tiny", batch_size=1, steps=1, modes=["vectorised"])


def test_bench_dp_cli_prints_json_with_the_ratio(tmp_path, capsys):
    from cli.main import main

    assert main(["bench", "dp", "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--modes", "microbatch", "--out", str(tmp_path / "dp.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["batch_size"] == 1 and result["ratio_microbatch"]["median"] > 0 and result["modes"] == ["microbatch"]
    record = json.loads((tmp_path / "dp.json").read_text())
    assert record["results"] == [result] and record["command"].startswith("promptsam bench dp --batch 1")
