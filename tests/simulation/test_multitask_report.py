"""``simulation.multitask_report``: multi-task against single-task models, per seed, per centre and task."""

from __future__ import annotations

import json

import pytest

from simulation.multitask_report import main, seed_means, table


def _results(per_seed: dict[int, list[tuple[str, float]]], base: float = 0.1) -> dict:
    jobs = {}
    for seed, rows in per_seed.items():
        per_image = [{"centre": c, "stem": f"{c}{i}", "dice": d} for i, (c, d) in enumerate(rows)]
        jobs[f"all/centralized/seed-{seed}"] = {
            "setting": "all", "method": "centralized", "seed": seed, "steps": 10, "per_image": per_image,
            "baseline_per_image": [{**r, "dice": base} for r in per_image]}
    return {"jobs": jobs}


def test_seed_means_average_images_within_a_seed_then_keep_one_value_per_seed():
    res = _results({1: [("a", 0.2), ("a", 0.4), ("b", 0.9)], 0: [("a", 0.6), ("b", 0.1)]})
    assert seed_means(res, ["a"]) == pytest.approx([0.6, 0.3])  # seed 0 first
    assert seed_means(res, ["a", "b"]) == pytest.approx([0.35, 0.5])
    assert seed_means(res, ["a"], "baseline_per_image") == pytest.approx([0.1, 0.1])


def test_table_compares_per_centre_and_per_task_with_each_tasks_constant_mask(tmp_path):
    multi = _results({0: [("a", 0.5), ("b", 0.7), ("t", 0.2)], 1: [("a", 0.3), ("b", 0.5), ("t", 0.4)]})
    polyp = _results({0: [("a", 0.6), ("b", 0.6)], 1: [("a", 0.4), ("b", 0.6)]}, base=0.25)
    other = _results({0: [("t", 0.1)], 1: [("t", 0.1)]}, base=0.05)
    text, rows = table(multi, {"polyp": polyp, "other": other})
    get = {(r["task"], r["test"]): r for r in rows}
    assert set(get) == {("polyp", "a"), ("polyp", "b"), ("polyp", "polyp (pooled)"), ("other", "t")}
    assert get[("polyp", "a")]["difference"] == pytest.approx(-0.1)
    assert get[("polyp", "polyp (pooled)")]["multi"] == pytest.approx([0.6, 0.4])
    assert get[("other", "t")]["difference"] == pytest.approx(0.2)
    assert "| other | t (1) | 0.300 ± 0.100 | 0.100 ± 0.000 | +0.200 | 0.050 ± 0.000 |" in text
    assert "seeds [0, 1]" in text

    for name, res in (("multi", multi), ("polyp", polyp), ("other", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    out = tmp_path / "table.md"
    assert main(["--multi", str(tmp_path / "multi"), "--single", f"polyp={tmp_path / 'polyp'}",
                 "--single", f"other={tmp_path / 'other'}", "--out", str(out)]) == 0
    assert out.read_text() == text and len(json.loads(out.with_suffix(".json").read_text())) == 4
    with pytest.raises(SystemExit, match="TASK=FOLDER"):
        main(["--multi", str(tmp_path / "multi"), "--single", str(tmp_path / "polyp")])
    with pytest.raises(SystemExit, match="missing/results.json: not found"):
        main(["--multi", str(tmp_path / "missing"), "--single", f"polyp={tmp_path / 'polyp'}"])
