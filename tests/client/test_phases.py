"""The ClientApp's phase profile (deploy load's breakdown): written only when asked, read back."""

import json

from client import phases
from deploy.load import format_breakdown, round_breakdown


def test_nothing_is_written_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(phases.PROFILE_ENV, raising=False)
    phases.reset()
    with phases.phase("data"):
        pass
    phases.write_profile("train", 1.0, 2.0)
    assert list(tmp_path.iterdir()) == []


def test_phases_add_up_per_call_and_reach_the_breakdown(monkeypatch, tmp_path):
    target = tmp_path / "profile.jsonl"
    monkeypatch.setenv(phases.PROFILE_ENV, str(target))
    for call in range(2):
        age = phases.reset()
        assert age is None or age > 0
        for _ in range(3):
            with phases.phase("training"):
                pass
        assert set(phases.phases()) == {"training"}
        phases.write_profile("train", 10.0 + call, 4.0, **{"app-imports": 1.5})
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["age-at-entry"] == 11.0 and lines[0]["phase-training"] >= 0
    breakdown = round_breakdown(target, round_s=20.0, nodes=2)
    assert breakdown["calls"] == 2 and breakdown["start-up"] == 10.5 and breakdown["handler"] == 4.0
    assert breakdown["data"] == 0.0
    table = format_breakdown([{"nodes": 2, "round_s": 20.0, "breakdown": breakdown}])
    assert table.splitlines()[2].startswith("| 2 | 20.0 | 10.50 | 1.50 |")
    assert round_breakdown(tmp_path / "missing.jsonl", 1.0, 2) == {}


def test_rounds_are_spans_from_the_first_start_to_the_last_reply(tmp_path):
    def call(end, handler, age):
        return json.dumps({"kind": "train", "ended-at": end, "handler": handler, "age-at-entry": age})

    # round 1: starts at 100 and 101, ends at 120 and 125; round 2: starts at 200 and 203, ends at 215 and 230
    lines = [call(120, 10, 10), call(125, 14, 10), call(215, 5, 10), call(230, 17, 10)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    breakdown = round_breakdown(tmp_path / "p.jsonl", round_s=40.0, nodes=2)
    assert breakdown["span"] == (25 + 30) / 2 and breakdown["outside"] == 40.0 - 27.5


def test_a_nested_phase_counts_once(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 10.0])  # data opens at 0, imports 1..3 inside it, data closes at 10
    monkeypatch.setattr(phases.time, "perf_counter", lambda: next(clock))
    phases.reset()
    with phases.phase("data"):
        with phases.phase("imports"):
            pass
    assert phases.phases() == {"data": 8.0, "imports": 2.0}
