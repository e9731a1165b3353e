"""Tables of an ablation's ``results.json`` (see :mod:`simulation.ablation`).

A cell is the mean over seeds of each seed's mean over the test images, +- the standard deviation
over seeds (the spread a rerun would show); ``ablation.csv`` also gives the spread over images.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

POOLED = "pooled"


def _per_seed(jobs: list[dict[str, Any]], key: str, centre: str | None) -> list[float]:
    """Each job's mean of ``key`` over its test images (of ``centre``, or all)."""
    means = []
    for job in jobs:
        values = [r[key] for r in job["per_image"] if key in r and (centre is None or r["centre"] == centre)]
        if values:
            means.append(float(np.mean(values)))
    return means


def _images(jobs: list[dict[str, Any]], key: str, centre: str | None) -> list[float]:
    return [r[key] for job in jobs for r in job["per_image"] if key in r and (centre is None or r["centre"] == centre)]


def summary_rows(results: dict[str, Any], rows: list[str], centres: list[str]) -> list[dict[str, Any]]:
    """Long-format rows: one per (ablation row, test centre or pooled, metric)."""
    out = []
    for row in rows:
        jobs = [j for j in results["jobs"].values() if j["row"] == row]
        if not jobs:
            continue
        for centre in [*centres, None]:
            for key in ("dice", "iou", "hd95", "box_hit", "box_coverage", "box_iou"):
                seeds = _per_seed(jobs, key, centre)
                if not seeds:
                    continue
                images = _images(jobs, key, centre)
                out.append({"row": row, "test": centre or POOLED, "metric": key, "mean": float(np.mean(seeds)),
                            "seed_std": float(np.std(seeds)), "image_std": float(np.std(images)),
                            "seeds": len(seeds), "images": len(images) // len(seeds),
                            "seconds_per_step": float(np.mean([j["seconds_per_step"] for j in jobs])),
                            "trainable": jobs[0]["trainable"]})
    return out


def _cell(rows: list[dict[str, Any]], row: str, test: str, metric: str, digits: int = 3) -> str:
    for r in rows:
        if (r["row"], r["test"], r["metric"]) == (row, test, metric):
            return f"{r['mean']:.{digits}f} ± {r['seed_std']:.{digits}f}"
    return "-"


def _step_time(timing: dict[str, Any], row: str) -> str:
    entry = (timing.get("rows") or {}).get(row)
    if not entry:
        return "-"
    wall, ratio = entry["wall"], entry["ratio"]
    return (f"{wall['median']:.3f} s ({wall['min']:.3f}-{wall['max']:.3f}), "
            f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})")


def _baseline(results: dict[str, Any], centre: str | None, key: str) -> float:
    values = [r[key] for r in results["baseline"]["baseline_per_image"] if centre is None or r["centre"] == centre]
    return float(np.mean(values)) if values else math.nan


def markdown(results: dict[str, Any], rows: list[str], centres: list[str], cfg: Any, exp: Any,
             labels: dict[str, str]) -> str:
    """The ablation as Markdown: Dice and HD95 per row and test centre, then the box agreement."""
    summary = summary_rows(results, rows, centres)
    tests = [*centres, POOLED]
    env = results.get("environment", {})
    seeds = sorted({j["seed"] for j in results["jobs"].values()})
    lines = ["# Ablation: what each prompt path earns", "",
             f"Centralized training on the pooled training split of {', '.join(centres)}: {cfg.steps} steps of "
             f"batch {exp.train.batch_size} per row and seed (seeds {seeds}), lr {exp.train.lr}, augmentation "
             f"{'on' if exp.data.augment else 'off'}; tested on each centre's test split with the class prompt, "
             "metrics at each mask's own resolution. Cells: mean over seeds +- std over seeds. "
             f"Machine: {env.get('machine', '?')}, torch threads per job as recorded; commit {env.get('commit')}.",
             ""]
    timing = results.get("step_time") or {}
    if timing:
        start, end = timing["load_average"]
        lines += [f"Step time: one training step (batch {timing['batch_size']}) of every row on the same batch, "
                  f"interleaved, {timing['repeats']} repeats after {timing['warmup']} warm-up, "
                  f"{timing['threads']} thread; median (min-max) and the ratio to the "
                  f"{labels[timing['reference']]} row paired by repeat; load average {start} at start, {end} at end.", ""]
    for metric, title, digits in (("dice", "Test Dice", 3), ("hd95", "Test HD95 (image pixels, lower is better)", 1)):
        lines += [f"## {title}", "", "| row | " + " | ".join(tests) + " | step time | trainable |",
                  "|---|" + "---|" * (len(tests) + 2)]
        for row in rows:
            first = next((r for r in summary if r["row"] == row), None)
            if first is None:
                continue
            cells = [_cell(summary, row, t, metric, digits) for t in tests]
            lines.append(f"| {labels[row]} | " + " | ".join(cells) +
                         f" | {_step_time(timing, row)} | {first['trainable']:,} |")
        base = [f"{_baseline(results, None if t == POOLED else t, metric):.{digits}f}" for t in tests]
        lines += ["| constant mask (mean training mask) | " + " | ".join(base) + " | - | 0 |", ""]
    box_rows = [r for r in rows if any(s["row"] == r and s["metric"] == "box_hit" for s in summary)]
    if box_rows:
        lines += ["## Do the model's own boxes (saliency or first mask) find the polyp?", "",
                  "Hit rate: box IoU >= 0.5 with the ground-truth box; coverage: fraction of polyp pixels "
                  "inside the boxes (at the model's input size).", "",
                  "| row | " + " | ".join(f"{t} hit / coverage" for t in tests) + " |",
                  "|---|" + "---|" * len(tests)]
        for row in box_rows:
            cells = [f"{_cell(summary, row, t, 'box_hit', 2)} / {_cell(summary, row, t, 'box_coverage', 2)}"
                     for t in tests]
            lines.append(f"| {labels[row]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_tables(out: Path, results: dict[str, Any], cfg: Any, centres: list[str], exp: Any,
                 labels: dict[str, str]) -> list[Path]:
    """Write ``ablation.md`` and ``ablation.csv`` into ``out``; return their paths.

    ``labels`` maps a row name to the label its table row shows."""
    rows = [r for r in cfg.rows if any(j["row"] == r for j in results["jobs"].values())]
    md = out / "ablation.md"
    md.write_text(markdown(results, rows, centres, cfg, exp, labels))
    table = summary_rows(results, rows, centres)
    path = out / "ablation.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["row"])
        writer.writeheader()
        writer.writerows(table)
    return [md, path]
