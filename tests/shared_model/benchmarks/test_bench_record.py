"""Benchmark records: spread of the repeats, ratio ranges, and the README wording they imply."""

import json

import pytest

from shared_model.benchmarks.record import bench_record, ratio_range, ratio_text, spread, write_bench_record


def test_spread_and_ratio_range():
    slow, fast = spread([3.0, 2.0, 4.0]), spread([1.0, 1.5, 2.0])
    assert (slow["median"], slow["min"], slow["max"], slow["repeats"]) == (3.0, 2.0, 4.0, 3)
    assert ratio_range(slow, fast) == [1.0, 4.0]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        spread([])


def test_ratio_text_says_no_measurable_difference_when_the_range_includes_one():
    assert ratio_text(1.5, 1.2, 1.8) == "1.50x (1.20-1.80 over the repeats)"
    assert ratio_text(1.5, 0.9, 1.8).endswith(", no measurable difference")
    assert ratio_text(0.8, 0.7, 1.0).endswith(", no measurable difference")


def test_record_round_trips_and_needs_a_json_path(tmp_path):
    record = bench_record(["bench", "dp", "--out", "a b.json"], 2, [{"x": 1}], [1.0, 2.0, 3.0])
    assert record["command"] == "promptsam bench dp --out 'a b.json'"
    assert record["warmup"] == 2 and record["machine"]["cpu_cores"] >= 1
    path = write_bench_record(tmp_path / "sub" / "r.json", record)
    assert json.loads(path.read_text()) == record
    with pytest.raises(ValueError, match=r"--out .*r\.txt: expected a \.json file"):
        write_bench_record(tmp_path / "r.txt", record)
