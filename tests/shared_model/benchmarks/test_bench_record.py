"""Benchmark records: command, machine and load, and the README lines they give."""

import json

import pytest

from shared_model.benchmarks.record import bench_record, summary, write_bench_record


def test_record_round_trips_and_needs_a_json_path(tmp_path):
    record = bench_record(["bench", "dp", "--out", "a b.json"], 2, [{"x": 1}], [1.0, 2.0, 3.0])
    assert record["command"] == "promptsam bench dp --out 'a b.json'"
    assert record["warmup"] == 2 and record["machine"]["cpu_cores"] >= 1
    assert record["load_average_start"] == [1.0, 2.0, 3.0]
    path = write_bench_record(tmp_path / "sub" / "r.json", record)
    assert json.loads(path.read_text()) == record
    with pytest.raises(ValueError, match=r"--out .*r\.txt: expected a \.json file"):
        write_bench_record(tmp_path / "r.txt", record)


def test_summary_names_benchmarks_it_has_no_line_for():
    with pytest.raises(ValueError, match="no README line for `bench round`"):
        summary({"command": "promptsam bench round --json"})
