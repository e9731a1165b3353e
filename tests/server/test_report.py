"""Metrics log and the end-of-run report."""

import json

from server.report import JsonLines, summarize, write_report


def _rows():
    rows = []
    for r, dice in ((0, 0.1), (1, 0.3), (2, 0.5)):
        rows.append({"round": r, "kind": "global", "dice": dice, "iou": dice / 2, "hd95": 10.0 - r})
    for r in (1, 2):
        for h, pid in (("a", 0), ("b", 1)):
            rows.append({"round": r, "kind": "train", "hospital": h, "accepted": True, "bytes-up": 400,
                         "bytes-down": 400, "partition-id": pid})
            rows.append({"round": r, "kind": "evaluate", "hospital": h, "accepted": True, "dice": 0.2 * r + pid * 0.1})
        rows.append({"round": r, "kind": "train", "hospital": "c", "accepted": False, "reason": "nan"})
        rows.append({"round": r, "kind": "round", "seconds": 2.0 * r, "bytes-up": 800, "bytes-down": 1600,
                     "dropped": 1, "accepted": 2, "dice": 0.25 * r})
    return rows


def test_jsonlines_append_rewrite_and_non_finite(tmp_path):
    log = JsonLines(tmp_path / "m.jsonl")
    log.append([{"round": 1, "x": float("nan")}, {"round": 2, "x": float("inf")}])
    log.append([{"round": 3, "x": 1.5}])
    assert [r["x"] for r in log.read()] == [None, None, 1.5]
    log.rewrite([{"round": 1, "x": 2.0}])
    assert log.read() == [{"round": 1, "x": 2.0}]


def test_summary_series_and_totals():
    s = summarize(_rows(), best_round=2)
    assert s["rounds"] == [1, 2]
    assert s["global"]["dice"] == {"0": 0.1, "1": 0.3, "2": 0.5}
    assert s["federated_dice"] == {"1": 0.25, "2": 0.5}
    assert s["hospital_dice"]["b"] == {"1": 0.30000000000000004, "2": 0.5}
    assert s["bytes_up_per_client_round"] == 400 and s["bytes_total"] == 2 * (800 + 1600)
    assert s["dropped_replies"] == 2 and s["mean_round_seconds"] == 3.0


def test_write_report_makes_plots_summary_and_markdown(tmp_path):
    path = write_report(tmp_path, _rows(), best_round=2, extra={"best_dice": 0.5})
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "| 2 | 0.5000 |" in text and "best round (global validation Dice): 2" in text
    for name in ("dice.png", "bytes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["best_dice"] == 0.5
