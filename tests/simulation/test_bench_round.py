"""``promptsam bench round`` end to end with tiny sizes: 2 hospitals, 2 updates, 1 round, tiny preset."""

import json

import pytest

from cli.main import main
from shared_model.config import get_preset
from shared_model.exchange import state_numel, get_exchanged_state
from shared_model.modeling.prompt_sam import build_model



def test_bench_round_prints_costs_as_json(one_thread, capsys):
    argv = ["bench", "round", "--hospitals", "2", "--updates", "2", "3", "--rounds", "1", "--agg-preset", "tiny",
            "--local-steps", "1", "--repeats", "2", "--warmup", "0", "--strategies", "fedavg", "fedmedian", "--memory-updates", "4",
            "--memory-cap-gb", "0.001", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"payload", "aggregation_seconds", "flower_overhead", "definitions"} <= set(result)

    numel = state_numel(get_exchanged_state(build_model(get_preset("tiny"))))
    payload = result["payload"]["per_client_per_round"]
    assert result["payload"]["aggregation_preset_numel"] == numel
    assert set(payload) == {"float32", "float16", "bfloat16"}
    assert payload["bfloat16"]["up_bytes"] == 2 * numel
    assert 4 * numel < payload["float32"]["up_bytes"] < 4 * numel + 256 * 200
    assert payload["float16"]["up_bytes"] == payload["float32"]["up_bytes"] - 2 * numel  # same .npy headers
    for row in payload.values():
        assert row["down_bytes_per_round"] == 2 * row["down_bytes"]

    for by_k in result["aggregation_seconds"]["by_wire_dtype"].values():
        assert set(by_k) == {"2", "3"} and all(v["seconds"] > 0 for v in by_k.values())
    scaling = result["aggregation_scaling"]["by_updates"]
    assert set(scaling) == {"2", "3"}
    for row in scaling.values():
        assert row["limit"]["repeats"] == 2 and row["limit"]["median"] > 0
        assert set(row["strategies"]) == {"fedavg", "fedmedian"}
        for timing in row["strategies"].values():
            assert timing["min"] <= timing["median"] <= timing["max"] and timing["repeats"] == 2
            ratios = [a / b for a, b in zip(timing["all"], row["limit"]["all"])]  # paired within each repeat
            assert timing["ratio_to_limit"]["all"] == pytest.approx(ratios)
            assert timing["ratio_to_limit"]["min"] <= timing["ratio_to_limit"]["median"] <= timing["ratio_to_limit"]["max"]
        assert row["strategies"]["fedavg"]["streaming"] and not row["strategies"]["fedmedian"]["streaming"]
    memory = {(m["strategy"], m["variant"]): m for m in result["aggregation_memory"]}
    assert set(memory) == {("fedavg", "generator"), ("fedavg", "list"), ("fedavg", "hold-all"),
                           ("fedmedian", "generator")}
    assert "--memory-cap-gb 0.001" in memory["fedavg", "hold-all"]["skipped"]
    for key in [("fedavg", "generator"), ("fedavg", "list"), ("fedmedian", "generator")]:
        assert memory[key]["updates"] == 4 and memory[key]["peak_rss_above_base_bytes"] >= 0

    (rnd,) = result["flower_overhead"]["per_round"]
    assert rnd["accepted"] == 2
    apps = rnd["client_app_seconds"]
    assert set(apps) == {"train", "evaluate", "total"}
    assert apps["total"] == pytest.approx(apps["train"] + apps["evaluate"])
    assert 0 < rnd["client_train_seconds"] < apps["train"]
    assert rnd["round_seconds"] > apps["total"] + rnd["server_eval_seconds"]
    assert rnd["flower_overhead_seconds"] == pytest.approx(
        rnd["round_seconds"] - apps["total"] - rnd["server_eval_seconds"])
    assert rnd["flower_overhead_share"] == pytest.approx(rnd["flower_overhead_seconds"] / apps["total"])
    # The server's own metrics row agrees with the payload measured on wire records (float32, tiny).
    f32 = result["payload"]["simulated_preset_per_client_per_round"]["float32"]
    assert rnd["measured_bytes_up"] == 2 * f32["up_bytes"]
    assert rnd["measured_bytes_down"] == 2 * f32["down_bytes_per_round"]


def test_bench_round_strategy_choices_are_the_benchmarked_ones():
    from cli.bench import AGG_STRATEGIES
    from simulation.bench_aggregation import STRATEGIES

    assert AGG_STRATEGIES == STRATEGIES


def test_bench_round_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused by the flag's type, before anything runs
        main(["bench", "round", "--hospitals", "0", "--agg-preset", "tiny"])
    assert exit_info.value.code == 2
    assert "argument --hospitals: must be an integer >= 1, got 0" in capsys.readouterr().err
