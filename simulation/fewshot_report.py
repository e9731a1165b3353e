"""Tables, summary and plot of ``promptsam fewshot`` (:mod:`simulation.fewshot`)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

LABELS = {"in-context": "in-context (support set as prompt, no training)",
          "adapter": "task adapter (LoRA decoder + prompt projections + task embedding)",
          "fine-tune": "fine-tune what hospitals normally train (same K, same steps)"}
TARGET_K, TARGET_RATIO, TARGET_SECONDS = 10, 0.8, 120.0


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "draws": len(values)}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Dice per method and K (mean, std over draws), the upper bound, adapter cost, the targets."""
    rows = [r for k, r in results.items() if k != "upper-bound"]
    shots = sorted({r["shots"] for r in rows})
    methods = [m for m in LABELS if any(r["method"] == m for r in rows)]
    dice = {m: {str(k): _stats([r["dice"] for r in rows if r["method"] == m and r["shots"] == k])
                for k in shots if any(r["method"] == m and r["shots"] == k for r in rows)} for m in methods}
    upper = results.get("upper-bound")
    adapter_rows = [r for r in rows if r["method"] == "adapter"]
    seconds = {str(k): max(r["train_seconds"] for r in adapter_rows if r["shots"] == k)
               for k in shots if any(r["shots"] == k for r in adapter_rows)}
    summary: dict[str, Any] = {"shots": shots, "dice": dice, "upper_bound": upper,
                               "adapter_train_seconds_max": seconds,
                               "adapter_file_bytes": max((r["adapter_file_bytes"] for r in adapter_rows), default=None)}
    at = dice.get("adapter", {}).get(str(TARGET_K))
    if at is None or upper is None:
        summary["targets"] = f"not measured (needs the adapter at K = {TARGET_K} and the upper bound)"
    else:
        ratio = at["mean"] / upper["dice"] if upper["dice"] > 0 else float("nan")
        fast = seconds[str(TARGET_K)] < TARGET_SECONDS
        summary["adapter_ratio_at_target_k"] = ratio
        summary["targets"] = (f"adapter at K = {TARGET_K}: {ratio:.0%} of the whole-split Dice "
                              f"({'met' if ratio >= TARGET_RATIO else 'not met'}: >= {TARGET_RATIO:.0%}); "
                              f"training {seconds[str(TARGET_K)]:.1f} s at most "
                              f"({'met' if fast else 'not met'}: < {TARGET_SECONDS:.0f} s CPU)")
    return summary


def table(summary: dict[str, Any], name: str, held_out: str, n_test: int) -> str:
    """Markdown: Dice (mean ± std over draws) per method and K, the upper bound, cost and targets."""
    shots = summary["shots"]
    lines = [f"# Few-shot \"{name}\": test Dice against K ({n_test} test images)", "", held_out, "",
             "| method | " + " | ".join(f"K = {k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for method, per_k in summary["dice"].items():
        cells = ["-" if str(k) not in per_k else f"{per_k[str(k)]['mean']:.3f}" if per_k[str(k)]["draws"] < 2
                 else f"{per_k[str(k)]['mean']:.3f} ± {per_k[str(k)]['std']:.3f}" for k in shots]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    upper = summary["upper_bound"]
    if upper:
        lines.append(f"| upper bound: trained on the whole training split ({upper['shots']} images) | "
                     + " | ".join(f"{upper['dice']:.3f}" for _ in shots) + " |")
    draws = max((v["draws"] for per_k in summary["dice"].values() for v in per_k.values()), default=0)
    spread = "mean ± standard deviation over" if draws > 1 else "one value per K:"
    lines += ["", f"Test Dice, {spread} {draws} support draw(s) per K, at each mask's own resolution; class "
              "prompt = the task name."]
    if summary["adapter_train_seconds_max"]:
        lines.append("Adapter training, longest of the draws: " + ", ".join(
            f"K = {k}: {v:.1f} s" for k, v in summary["adapter_train_seconds_max"].items())
            + f"; adapter file {summary['adapter_file_bytes']:,} B.")
    lines += [f"Targets: {summary['targets']}.", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, name: str) -> Path:
    """``dice_vs_k.png``: Dice (mean, error bar = std over draws) against K per method, the upper bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method, per_k in summary["dice"].items():
        ks = [k for k in summary["shots"] if str(k) in per_k]
        ax.errorbar(ks, [per_k[str(k)]["mean"] for k in ks], yerr=[per_k[str(k)]["std"] for k in ks],
                    marker="o", capsize=3, label=method)
    upper = summary["upper_bound"]
    if upper:
        ax.axhline(upper["dice"], color="black", linestyle="--", label=f"whole training split ({upper['shots']})")
        ax.axhline(TARGET_RATIO * upper["dice"], color="grey", linestyle=":", label=f"{TARGET_RATIO:.0%} of it")
    ax.set_xscale("log")
    ax.set_xticks(summary["shots"], [str(k) for k in summary["shots"]])
    ax.minorticks_off()
    ax.set_xlabel("K (support images)")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1)
    ax.set_title(f"\"{name}\" learned from K examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(out: Path, results: dict[str, Any], exp, name: str, held_out: str, n_test: int) -> dict[str, Any]:
    """Write ``summary.json``, ``table.md`` and ``dice_vs_k.png`` into ``out``; return the summary."""
    summary = {"name": exp.name, "task": name, "held_out": held_out, "test_images": n_test, **summarise(results)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "table.md").write_text(table(summary, name, held_out, n_test))
    plot(summary, out / "dice_vs_k.png", name)
    return summary
