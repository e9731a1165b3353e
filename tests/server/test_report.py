"""Metrics log and the end-of-run report."""

import json

from server.report import (JsonLines, dice_sources, payload_arithmetic, privacy_text, summarize,
                           write_report)


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


def test_report_md_puts_the_constant_mask_baseline_next_to_each_test_row(tmp_path):
    extra = {"best_dice": 0.5, "eval_prompt": "oracle-caption",
             "best_round_test": {"dice": 0.42, "iou": 0.3, "hd95": 9.5, "n": 10.0},
             "best_round_test_by_centre": {"b": {"dice": 0.5, "iou": 0.3, "hd95": 9.0, "n": 4.0},
                                           "a": {"dice": 0.4, "iou": 0.3, "hd95": 9.0, "n": 6.0}},
             "constant_mask_baseline": {"fitted_on": "pooled training split (30 images)", "threshold": 0.3,
                                        "pooled": {"dice": 0.2, "iou": 0.1, "hd95": 30.0, "n": 10.0},
                                        "by_centre": {"a": {"dice": 0.25, "iou": 0.1, "hd95": 30.0, "n": 6.0},
                                                      "b": {"dice": 0.125, "iou": 0.1, "hd95": 30.0, "n": 4.0}}}}
    text = write_report(tmp_path, _rows(), best_round=2, extra=extra).read_text()
    lines = text.splitlines()
    head = lines.index("| test set | Dice | IoU | HD95 | images | constant-mask Dice |")
    assert lines[head + 2:head + 5] == ["| pooled | 0.4200 | 0.3000 | 9.50 | 10 | 0.2000 |",
                                        "| a | 0.4000 | 0.3000 | 9.00 | 6 | 0.2500 |",
                                        "| b | 0.5000 | 0.3000 | 9.00 | 4 | 0.1250 |"]
    assert "Evaluation prompt: oracle-caption (each image's caption is built from its ground-truth mask" in text
    assert "mean mask of the pooled training split (30 images), thresholded at 0.3" in text
    assert "- best_round_test" not in text and "- constant_mask_baseline" not in text  # a table, not a JSON line
    assert json.loads((tmp_path / "summary.json").read_text())["constant_mask_baseline"]["by_centre"]["b"]["dice"] == 0.125


def _same_data_rows():
    """_rows() where the hospitals' validation images are the server's evaluation set (as in the demo)."""
    rows = _rows()
    for row in rows:
        if row["kind"] == "evaluate":
            row["num-examples"] = 3
        if row["kind"] == "global":
            row["n"] = 6
    fed = {r["round"]: r["dice"] for r in rows if r["kind"] == "round"}
    for row in rows:
        if row["kind"] == "global" and row["round"] in fed:
            row["dice"] = fed[row["round"]] + 1e-9
    return rows


def test_payload_arithmetic_is_one_line_that_adds_up():
    assert payload_arithmetic(_rows()) == ("4,800 B in all = 2 clients x 2 rounds x (400 B up + 2 x 400 B down: "
                                           "train and evaluate)")
    rows = _rows()
    rows[-1]["bytes-down"] = 800  # last round: no evaluate messages
    assert payload_arithmetic(rows) == ("4,000 B in all = 1,600 B up = 4 messages x 400 B + 2,400 B down = 6 messages "
                                        "x 400 B")
    rows[-1]["bytes-down"] = 801
    assert payload_arithmetic(rows) == ("4,001 B in all = 1,600 B up = 4 messages x 400 B + 2,401 B down (sum of the "
                                        "rounds)")


def test_dice_sources_say_what_each_dice_is_and_when_they_are_the_same_images(tmp_path):
    different = dice_sources(_rows())
    assert not different["same"] and "Federated Dice: the mean of the hospitals' Dice" in different["note"]
    text = write_report(tmp_path, _rows(), best_round=2).read_text()
    assert "| round | global Dice | IoU | HD95 | federated Dice | a | b |" in text and "| 2 | 0.5000 |" in text

    same = dice_sources(_same_data_rows())
    assert same["same"] and (same["global_n"], same["federated_n"]) == (6, 6)
    assert "they are the same images" in same["note"] and "global-eval = val" in same["note"]
    text = write_report(tmp_path, _same_data_rows(), best_round=2).read_text()
    assert "| round | global Dice (= federated) | IoU | HD95 | a | b |" in text and same["note"] in text
    rows = _same_data_rows()
    next(r for r in rows if r["kind"] == "global" and r["round"] == 2)["n"] = 7  # other images, by chance equal
    assert not dice_sources(rows)["same"]


def test_privacy_reads_off_when_no_dp_and_no_secagg(tmp_path):
    off = {"local_dp": False, "local_epsilon_budget": None, "local_delta": None, "local_epsilon_by_hospital": {},
           "central_dp": "off", "central_epsilon": None, "central_delta": None, "secagg": False}
    assert privacy_text(off).startswith("off")
    text = write_report(tmp_path, _rows(), 2, {"privacy": off}).read_text()
    assert "- privacy: off (no local DP, no central DP, no secure aggregation)" in text and "epsilon" not in text
    local = {**off, "local_dp": True, "local_epsilon_budget": 8.0, "local_delta": 1e-5}
    assert json.loads(privacy_text(local)) == {"local_dp": True, "local_epsilon_budget": 8.0, "local_delta": 1e-5}
