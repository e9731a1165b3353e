"""Tables (Markdown + CSV) and plots of a comparison's ``results.json`` (see :mod:`simulation.comparison`).

Cells are over test images (and seeds, pooled): Dice / IoU / HD95 mean and standard deviation.
Rows of the main table: each method trained on all centres; ``local (<centre>)`` is the model
trained at that hospital alone, tested everywhere, and ``local (own centre)`` takes, for each
centre, that centre's own local model (what a hospital gets without federation);
``fedavg + local fine-tune (own centre)`` is personalised FedAvg, each hospital's fine-tuned copy of
the global model on that hospital's test images. Under each table,
``constant mask`` rows: the constant-mask baseline of each distinct training set (fitted on that
set's training split only, see :func:`simulation.comparison.constant_baseline`), per test centre.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from shared_model.config.site import EVAL_PROMPTS
from shared_model.data.folder import describe_eval_prompt

CSV_FIELDS = ("setting", "method", "trained_on", "test_centre", "n", "dice", "dice_std", "iou", "iou_std",
              "hd95", "hd95_std", "baseline_dice", "baseline_dice_std", "baseline_iou", "baseline_iou_std",
              "baseline_hd95", "baseline_hd95_std", "eval_prompt", "steps_per_run", "seeds")
POOLED = "pooled"
PERSONALISED_LABEL = "fedavg + local fine-tune (own centre)"
BASELINE = "baseline_"  # prefix of the constant-mask baseline's statistics in a row


def _stats(rows: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {} if prefix else {"n": len(rows)}
    for key in ("dice", "iou", "hd95"):
        values = np.asarray([r[key] for r in rows], dtype=np.float64)
        out[f"{prefix}{key}"] = float(values.mean()) if len(values) else math.nan
        out[f"{prefix}{key}_std"] = float(values.std()) if len(values) else math.nan
    return out


def _eval_prompts(jobs: Iterable[dict[str, Any]]) -> str:
    """The evaluation prompt(s) of jobs (``unknown`` for results written before it was recorded)."""
    return "+".join(sorted({job.get("eval_prompt", "unknown") for job in jobs}))


def table_rows(results: dict[str, Any], centres: list[str], methods: Iterable[str]) -> list[dict[str, Any]]:
    """Long-format rows: one per (setting, method, trained-on, test centre), seeds pooled."""
    jobs = list(results["jobs"].values())
    rows: list[dict[str, Any]] = []

    def add(setting: str, method: str, trained_on: str, picked: list[dict[str, Any]], test_centres: list[str],
            pooled: bool) -> None:
        if not picked:
            return
        per_image = [(r, job) for job in picked for r in job["per_image"]]
        # Each job's own constant-mask baseline (fitted on its training split); absent in old results.
        with_base = all("baseline_per_image" in job for job in picked)
        base_rows = [r for job in picked for r in job.get("baseline_per_image", [])]
        common = {"setting": setting, "method": method, "trained_on": trained_on,
                  "eval_prompt": _eval_prompts(picked),
                  "steps_per_run": sorted({job["steps"] for job in picked}),
                  "seeds": sorted({job["seed"] for job in picked})}

        def base(centre: str | None) -> dict[str, float]:
            sel = [r for r in base_rows if centre is None or r["centre"] == centre]
            return _stats(sel, BASELINE) if with_base and sel else {}

        for centre in test_centres:
            sel = [r for r, _ in per_image if r["centre"] == centre]
            if sel:
                rows.append({**common, "test_centre": centre, **_stats(sel), **base(centre)})
        if pooled:
            rows.append({**common, "test_centre": POOLED, **_stats([r for r, _ in per_image]), **base(None)})

    for method in methods:
        if method == "local":
            for centre in centres:
                picked = [j for j in jobs if j["setting"] == "all" and j["method"] == "local" and j["centres"] == [centre]]
                add("all", f"local ({centre})", centre, picked, centres, True)
            own = [{**j, **{key: [r for r in j[key] if r["centre"] == j["centres"][0]]
                            for key in ("per_image", "baseline_per_image") if key in j}}
                   for j in jobs if j["setting"] == "all" and j["method"] == "local"]
            add("all", "local (own centre)", "each centre", own, centres, True)
        elif method == "fedavg_ft":
            picked = [j for j in jobs if j["setting"] == "all" and j["method"] == method]
            add("all", PERSONALISED_LABEL, "each centre", picked, centres, True)
        else:
            picked = [j for j in jobs if j["setting"] == "all" and j["method"] == method]
            add("all", method, "all centres", picked, centres, True)
    for method in dict.fromkeys(j["method"] for j in jobs if j["setting"].startswith("loo-")):
        for centre in centres:
            picked = [j for j in jobs if j["setting"] == f"loo-{centre}" and j["method"] == method]
            add("leave-one-out", method, "+".join(c for c in centres if c != centre), picked, [centre], False)
    return rows


def _prompt_text(prompts: str) -> str:
    if prompts in EVAL_PROMPTS:
        return describe_eval_prompt(prompts)
    return f"{prompts} (results written before the evaluation prompt was recorded, or mixed prompts)"


def _cell(row: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    if row is None or key not in row:
        return "-"
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def _baseline_rows(rows: list[dict[str, Any]], names: list[str]) -> list[tuple[str, str]]:
    """``(label, method whose rows hold it)`` of each distinct constant-mask baseline of ``names``
    (one per training set: all centres, each local centre, ...), in table order."""
    seen: dict[str, tuple[str, str]] = {}
    for name in names:
        row = next((r for r in rows if r["method"] == name and BASELINE + "dice" in r), None)
        if row is not None and row["trained_on"] not in seen:
            label = f"constant mask (mean train mask of {row['trained_on']})"
            seen[row["trained_on"]] = (label, name)
    return list(seen.values())


def markdown(results: dict[str, Any], rows: list[dict[str, Any]], centres: list[str], cfg: Any,
             batch_size: int) -> str:
    """The comparison as Markdown: main tables (Dice, IoU, HD95), leave-one-out, prompt styles."""
    hospitals = len(centres)
    main = [r for r in rows if r["setting"] == "all"]
    names = list(dict.fromkeys(r["method"] for r in main))
    counts = {r["test_centre"]: r["n"] for r in main}
    lines = [
        "# Centralized vs local-only vs federated training",
        "",
        f"Same compute for every method: {cfg.total_steps} optimiser steps of batch {batch_size} summed over all "
        f"sites ({_compute_text(cfg, hospitals)}). Final models (no selection). "
        f"Seeds {cfg.seeds}; cells are mean ± std over test images (and seeds).",
        "",
        f"Evaluation prompt: {_prompt_text(_eval_prompts(results['jobs'].values()))}. "
        "Constant-mask rows: the baseline of the models above, the mean mask of each one's own training "
        "split thresholded at the threshold best on that split (fitted on training data only, never on "
        "the test masks), scored on the same test images.",
        "",
    ]
    header = ["method"] + [f"{c} (n={counts.get(c, 0)})" for c in centres] + [f"pooled (n={counts.get(POOLED, 0)})"]
    for key, title, digits in (("dice", "Dice", 3), ("iou", "IoU", 3), ("hd95", "HD95 (pixels of each image's own size, lower is better)", 1)):
        lines += [f"## Trained on all centres: {title}", "", "| " + " | ".join(header) + " |",
                  "|---" * len(header) + "|"]
        for name in names:
            cells = [_cell(_find(main, name, c), key, digits) for c in centres + [POOLED]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for label, name in _baseline_rows(main, names):
            cells = [_cell(_find(main, name, c), BASELINE + key, digits) for c in centres + [POOLED]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    loo = [r for r in rows if r["setting"] == "leave-one-out"]
    if loo:
        lines += ["## Leave one centre out: trained on the other centres, tested on the held-out centre",
                  "", "Same test images as above; Dice (IoU, HD95).", "",
                  "| method | " + " | ".join(f"held out: {c}" for c in centres) + " | mean Dice |",
                  "|---" * (len(centres) + 2) + "|"]
        for name in dict.fromkeys(r["method"] for r in loo):
            picked = [_find(loo, name, c) for c in centres]
            cells = [f"{_cell(r, 'dice')} ({r['iou']:.3f}, {r['hd95']:.1f})" if r else "-" for r in picked]
            means = [r["dice"] for r in picked if r]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(means):.3f} |")
        first = next(iter(dict.fromkeys(r["method"] for r in loo)))
        picked = [_find(loo, first, c) for c in centres]
        means = [r[BASELINE + "dice"] for r in picked if r is not None and BASELINE + "dice" in r]
        if means:
            lines.append("| constant mask (mean train mask of the other centres) | "
                         + " | ".join(_cell(r, BASELINE + "dice") for r in picked) + f" | {np.mean(means):.3f} |")
        lines.append("")
    styles = results.get("prompt_styles")
    if styles:
        lines += [f"## Text prompt styles (model {styles['model']}, pooled test split)", "",
                  "attribute-caption is the oracle: each image's caption is built from its ground-truth "
                  "mask (as in training), so its score is optimistic. Changes are against it: of the mean "
                  "Dice, and the mean absolute change per image.", "",
                  "| prompt style | prompt | Dice | IoU | HD95 | change of mean Dice | mean abs. change per image |",
                  "|---|---|---|---|---|---|---|"]
        for style, agg in styles["styles"].items():
            dice = _cell(agg, "dice", 4) if "dice_std" in agg else f"{agg['dice']:.4f}"
            delta, per_image = agg.get("delta_dice_vs_caption"), agg.get("mean_abs_image_delta_vs_caption")
            prompt = agg.get("prompt", "") or "(empty)"
            lines.append(f"| {style} | {prompt} | {dice} | {agg['iou']:.4f} | {agg['hd95']:.1f} | "
                         f"{'-' if delta is None else f'{delta:+.5f}'} | "
                         f"{'-' if per_image is None else f'{per_image:.5f}'} |")
        lines.append("")
    env = results.get("environment", {})
    lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), ""]
    return "\n".join(lines)


def _compute_text(cfg: Any, hospitals: int) -> str:
    """How each method of ``cfg.methods`` (and of leave-one-out) spends the steps."""
    methods = set(cfg.methods) | (set(getattr(cfg, "leave_one_out_methods", [])) if getattr(cfg, "leave_one_out", False)
                                  else set())
    parts = []
    if "centralized" in methods:
        parts.append(f"centralized: {cfg.total_steps} steps on the pooled images")
    if "local" in methods:
        parts.append(f"local: {cfg.total_steps // hospitals} steps at each hospital")
    federated = [name for key, name in (("fedavg", "FedAvg"), ("fedprox", "FedProx")) if key in methods]
    if federated:
        mu = f", mu {cfg.proximal_mu}" if "fedprox" in methods else ""
        parts.append(f"{'/'.join(federated)}: {cfg.rounds} rounds x {cfg.total_steps // (cfg.rounds * hospitals)} "
                     f"local steps x {hospitals} hospitals{mu}")
    if "fedavg_ft" in methods:
        ft = cfg.finetune_steps
        local = (cfg.total_steps - ft * hospitals) // (cfg.rounds * hospitals)
        lr = "" if cfg.finetune_lr is None else f" at peak learning rate {cfg.finetune_lr}"
        parts.append(f"{PERSONALISED_LABEL}: FedAvg {cfg.rounds} rounds x {local} local steps x {hospitals} "
                     f"hospitals, then {ft} steps{lr} at each hospital on its own images, each hospital's model "
                     "tested on its own test split")
    return "; ".join(parts)


def _find(rows: list[dict[str, Any]], method: str, centre: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["test_centre"] == centre), None)


def plot(results: dict[str, Any], rows: list[dict[str, Any]], centres: list[str], out: Path) -> list[Path]:
    """Bar charts (Dice with 95 % confidence intervals of the mean) and federated Dice by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for setting, columns, name, title in (
        ("all", centres + [POOLED], "dice_by_centre.png", "Trained on all centres: test Dice by centre"),
        ("leave-one-out", centres, "dice_leave_one_out.png", "Held-out centre: test Dice"),
    ):
        sel = [r for r in rows if r["setting"] == setting
               and (not r["method"].startswith("local (") or r["method"] == "local (own centre)")]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        if not methods:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            found = [_find(sel, method, c) for c in columns]
            means = [r["dice"] if r else 0.0 for r in found]
            ci = [1.96 * r["dice_std"] / math.sqrt(r["n"]) if r else 0.0 for r in found]
            ax.bar(np.arange(len(columns)) + (i - (len(methods) - 1) / 2) * width, means, width, yerr=ci,
                   capsize=2, label=method)
        ax.set_xticks(np.arange(len(columns)), columns)
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=2)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)
    curves = {key: job["global_val_dice_by_round"] for key, job in results["jobs"].items()
              if job["setting"] == "all" and "global_val_dice_by_round" in job}
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, series in curves.items():
            xs = [int(k) for k, v in series.items() if v is not None]
            ax.plot(xs, [series[str(x)] for x in xs], "-o", label=key)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("global Dice (pooled validation)")
        ax.set_title("Federated training by round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "federated_rounds.png", dpi=110)
        plt.close(fig)
        files.append(out / "federated_rounds.png")
    return files


def write_outputs(out: Path, results: dict[str, Any], cfg: Any, centres: list[str], batch_size: int) -> list[Path]:
    """Write ``table.md``, ``table.csv`` and the plots into ``out``; return their paths."""
    rows = table_rows(results, centres, cfg.methods)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    (out / "table.md").write_text(markdown(results, rows, centres, cfg, batch_size))
    return [out / "table.md", out / "table.csv"] + plot(results, rows, centres, out)
