"""One model for every task against one model per task: a table from comparison folders.

``scripts/multitask_vs_single.sh`` runs :mod:`simulation.comparison` (method ``centralized``) once
on every task of ``simulation/configs/multitask_tiny.yaml`` together and once per task alone, with
the same steps and seeds. This module reads those folders' ``results.json`` and writes, per test
centre (and per task, its centres pooled), the mean Dice of the multi-task models and of the
single-task models, as mean ± std over seeds (each seed's mean over the test images), next to the
constant-mask baseline of each single-task model's own training split.

    python -m simulation.multitask_report --multi runs/multitask/all \\
        --single polyp=runs/multitask/polyp --single busi=runs/multitask/busi ... --out table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def seed_means(results: dict[str, Any], centres: list[str], key: str = "per_image") -> list[float]:
    """Per seed (one centralized job each), the mean Dice over the test images of ``centres``."""
    out = []
    for job in sorted(results["jobs"].values(), key=lambda j: j["seed"]):
        if job["setting"] != "all" or job["method"] != "centralized":
            continue
        dice = [r["dice"] for r in job.get(key, []) if r["centre"] in centres]
        if dice:
            out.append(float(np.mean(dice)))
    return out


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(multi: dict[str, Any], singles: dict[str, dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The Markdown table and its rows.

    Args:
        multi: ``results.json`` of the multi-task comparison.
        singles: Task name -> ``results.json`` of that task's single-task comparison.
    """
    rows: list[dict[str, Any]] = []
    for task, single in singles.items():
        centres = sorted({r["centre"] for job in single["jobs"].values() for r in job["per_image"]})
        groups = [(c, [c]) for c in centres] + ([(f"{task} (pooled)", centres)] if len(centres) > 1 else [])
        for label, cs in groups:
            m, s = seed_means(multi, cs), seed_means(single, cs)
            rows.append({"task": task, "test": label, "multi": m, "single": s,
                         "difference": float(np.mean(m) - np.mean(s)) if m and s else None,
                         "constant": seed_means(single, cs, "baseline_per_image"),
                         "images": sum(1 for r in next(iter(single["jobs"].values()))["per_image"]
                                       if r["centre"] in cs)})
    steps = {job["steps"] for res in (multi, *singles.values()) for job in res["jobs"].values()}
    lines = ["| task | test split (images) | multi-task model | single-task model | multi - single | "
             "constant mask (task's own training masks) |", "|---|---|---|---|---|---|"]
    for r in rows:
        diff = "-" if r["difference"] is None else f"{r['difference']:+.3f}"
        lines.append(f"| {r['task']} | {r['test']} ({r['images']}) | {_cell(r['multi'])} | {_cell(r['single'])} | "
                     f"{diff} | {_cell(r['constant'])} |")
    seeds = sorted({job["seed"] for job in multi["jobs"].values()})
    head = (f"Test Dice, mean ± std over seeds {seeds} (each seed: the mean over the test images); "
            f"every model trained for {', '.join(map(str, sorted(steps)))} steps of the same batch size.\n\n")
    return head + "\n".join(lines) + "\n", rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--multi", required=True, help="comparison folder of the model trained on every task")
    ap.add_argument("--single", action="append", required=True, metavar="TASK=FOLDER",
                    help="comparison folder of a model trained on one task (repeat per task)")
    ap.add_argument("--out", help="write the table here (Markdown) and the rows beside it (.json)")
    a = ap.parse_args(argv)

    def read(folder: str) -> dict[str, Any]:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"error: {path}: not found (run the comparison first)")
        return json.loads(path.read_text())

    singles = {}
    for spec in a.single:
        task, sep, folder = spec.partition("=")
        if not sep or not task or not folder:
            raise SystemExit(f"error: --single {spec!r}: expected TASK=FOLDER")
        singles[task] = read(folder)
    text, rows = table(read(a.multi), singles)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
        Path(a.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
