"""Metrics log (JSON lines) and the end-of-run report (summary JSON, Markdown, plots).

Every row of ``metrics.jsonl`` has ``round`` and ``kind``:

* ``global``: server-side evaluation of the global state (``dice``, ``iou``, ``hd95``, ...,
  ``n``); round 0 is the initial state.
* ``train``: one per train reply (``hospital``, ``node-id``, ``partition-id``, ``accepted``,
  ``reason``, ``num-examples``, ``train-loss``, ``val-dice``, ``bytes-up``, ``bytes-down``,
  ``update-norm`` = L2 norm of the delta).
* ``evaluate``: one per federated-evaluation reply (``hospital``, ``dice``, ``iou``, ``hd95``, ...).
* ``round``: totals of the round (``seconds``, ``accepted``, ``dropped``, ``bytes-up``,
  ``bytes-down``, aggregated ``train-loss`` and federated ``dice``).

Non-finite numbers are written as ``null``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from shared_model.data.folder import describe_eval_prompt

METRICS_NAME = "metrics.jsonl"
AUDIT_NAME = "messages.jsonl"
SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonLines:
    """Append-only JSON-lines file that can be rewritten from a known history (for resume)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace the file's content with ``rows`` (atomically)."""
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(_clean(row), sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append ``rows``, one JSON object per line."""
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(_clean(row), sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All rows (empty if the file does not exist)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def summarize(rows: list[dict[str, Any]], best_round: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-round series from metrics rows: global Dice/IoU/HD95, per-hospital Dice, bytes, time."""
    global_rows = {r["round"]: r for r in rows if r["kind"] == "global"}
    round_rows = {r["round"]: r for r in rows if r["kind"] == "round"}
    hospitals: dict[str, dict[int, float | None]] = {}
    for r in rows:
        if r["kind"] == "evaluate" and r.get("accepted"):
            hospitals.setdefault(r["hospital"], {})[r["round"]] = r.get("dice")
    train = [r for r in rows if r["kind"] == "train" and r.get("accepted")]
    up = [r["bytes-up"] for r in train if r.get("bytes-up") is not None]
    seconds = [r["seconds"] for r in round_rows.values() if r.get("seconds") is not None]
    return {
        "rounds": sorted(round_rows),
        "global": {
            metric: {str(k): global_rows[k].get(metric) for k in sorted(global_rows)}
            for metric in ("dice", "iou", "hd95")
        },
        "federated_dice": {str(k): round_rows[k].get("dice") for k in sorted(round_rows)},
        "hospital_dice": {h: {str(k): v for k, v in sorted(d.items())} for h, d in sorted(hospitals.items())},
        "best_round": best_round,
        "bytes_up_per_client_round": max(up) if up else None,
        "bytes_down_per_client_round": max((r.get("bytes-down") or 0 for r in train), default=None),
        "bytes_total": sum((r.get("bytes-up") or 0) + (r.get("bytes-down") or 0) for r in round_rows.values()),
        "dropped_replies": sum(r.get("dropped", 0) for r in round_rows.values()),
        "mean_round_seconds": sum(seconds) / len(seconds) if seconds else None,
        "payload_arithmetic": payload_arithmetic(rows),
        **(extra or {}),
    }


def _plot(summary: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    g = summary["global"]["dice"]
    xs = [int(k) for k, v in g.items() if v is not None]
    if xs:
        ax.plot(xs, [g[str(x)] for x in xs], "k-o", lw=2, label="global (server-side)")
    for name, series in summary["hospital_dice"].items():
        hx = [int(k) for k, v in series.items() if v is not None]
        ax.plot(hx, [series[str(x)] for x in hx], "--.", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("Dice")
    ax.set_title("Dice by round")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "dice.png", dpi=110)
    plt.close(fig)
    files.append("dice.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r for r in rows if r["kind"] == "round"]
    rounds.sort(key=lambda r: r["round"])
    x = [r["round"] for r in rounds]
    down = [(r.get("bytes-down") or 0) / 1e6 for r in rounds]
    up = [(r.get("bytes-up") or 0) / 1e6 for r in rounds]
    ax.bar([v - 0.2 for v in x], down, width=0.4, label="server -> clients (train + evaluate)")
    ax.bar([v + 0.2 for v in x], up, width=0.4, label="clients -> server (deltas)")
    ax.set_ylim(0, 1.3 * max(down + up + [1e-6]))
    ax.set_xlabel("round")
    ax.set_ylabel("payload (MB)")
    ax.set_title("Exchanged-state payload by round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "bytes.png", dpi=110)
    plt.close(fig)
    files.append("bytes.png")
    return files


def payload_arithmetic(rows: list[dict[str, Any]]) -> str:
    """The run's total payload as one line of arithmetic from the metrics rows.

    Uniform runs (every round the same clients, every message the same size ``b``) read
    ``"<total> B in all = <c> clients x <r> rounds x (<b> B up + <k> x <b> B down: train and
    evaluate)"``; otherwise the up and down totals are split into message counts x sizes where
    they divide exactly, else given as the sums of the rounds.
    """
    rounds = sorted((r for r in rows if r["kind"] == "round"), key=lambda r: r["round"])
    up = sum(r.get("bytes-up") or 0 for r in rounds)
    down = sum(r.get("bytes-down") or 0 for r in rounds)
    train = [r for r in rows if r["kind"] == "train" and r.get("accepted") and r.get("bytes-up") is not None]
    up_sizes = {r["bytes-up"] for r in train}
    down_sizes = {r["bytes-down"] for r in train if r.get("bytes-down")}
    per_round = {r["round"]: sum(1 for t in train if t["round"] == r["round"]) for r in rounds}
    total = f"{up + down:,} B in all"
    if len(up_sizes) == 1 and len(down_sizes) == 1 and len(set(per_round.values())) == 1 and rounds:
        (b_up,), (b_down,), clients = up_sizes, down_sizes, next(iter(per_round.values()))
        cr = clients * len(rounds)
        if up == cr * b_up and cr and down % (cr * b_down) == 0:
            k = down // (cr * b_down)
            what = {1: "train", 2: "train and evaluate"}.get(k, "messages")
            return (f"{total} = {clients} clients x {len(rounds)} rounds x ({b_up:,} B up + {k} x {b_down:,} B "
                    f"down: {what})")
    parts = []
    for name, amount, sizes in (("up", up, up_sizes), ("down", down, down_sizes)):
        if len(sizes) == 1 and next(iter(sizes)) and amount % next(iter(sizes)) == 0:
            size = next(iter(sizes))
            parts.append(f"{amount:,} B {name} = {amount // size} messages x {size:,} B")
        else:
            parts.append(f"{amount:,} B {name} (sum of the rounds)")
    return f"{total} = " + " + ".join(parts)


def dice_sources(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What the global and the federated Dice were computed on, and whether that is the same data.

    Returns:
        ``{"global_n": images of the server's evaluation set (None without one), "federated_n":
        the hospitals' validation images of the last federated evaluation, "same": True when in
        every round both counts agree and both Dice agree (to 1e-6), i.e. the hospitals'
        validation splits together are the server's evaluation set, "note": one explanatory
        paragraph}``.
    """
    glob = {r["round"]: r for r in rows if r["kind"] == "global"}
    fed = {r["round"]: r for r in rows if r["kind"] == "round" and r.get("dice") is not None}
    counts: dict[int, float] = {}
    for r in rows:
        if r["kind"] == "evaluate" and r.get("accepted"):
            counts[r["round"]] = counts.get(r["round"], 0) + (r.get("num-examples") or 0)
    global_n = next((int(g["n"]) for g in glob.values() if g.get("n") is not None), None)
    federated_n = int(counts[max(counts)]) if counts else None
    both = [k for k in fed if k in glob and glob[k].get("dice") is not None]
    same = bool(both) and all(counts.get(k) == glob[k].get("n") and abs(fed[k]["dice"] - glob[k]["dice"]) < 1e-6
                              for k in both)
    def images(count: int | None) -> str:
        return f"{count:,} images" if count is not None else "no images"

    note = (f"Global Dice: the server's evaluation of the global state on its own evaluation set (global-eval; "
            f"{images(global_n)}; round 0 = the initial state). Federated Dice: the mean of the hospitals' Dice "
            f"on their own validation splits, evaluated by the clients and weighted by their image counts "
            f"({images(federated_n)}).")
    if same:
        note += (" In this run they are the same images: the hospitals' validation splits together are the "
                 "server's evaluation set (global-eval = val takes the same per-centre split of the same "
                 "folder), and both are per-image means, so the weighted mean equals the pooled one and the "
                 "two agree in every round; the table shows it once.")
    return {"global_n": global_n, "federated_n": federated_n, "same": same, "note": note}


def privacy_text(privacy: dict[str, Any] | None) -> str:
    """The report's privacy line: ``"off"`` when no DP and no secure aggregation, else the settings used."""
    privacy = privacy or {}
    on = {k: v for k, v in privacy.items() if v not in (None, False, "off", {}, [])}
    if not {"local_dp", "central_dp", "secagg"} & set(on):
        return "off (no local DP, no central DP, no secure aggregation)"
    return json.dumps(_clean(on))


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def privacy_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``round`` rows, sorted, when any carries an epsilon (DP was on); else ``[]``."""
    rounds = sorted((r for r in rows if r["kind"] == "round"), key=lambda r: r["round"])
    if not any(r.get("epsilon-central") is not None or r.get("epsilon-local-max") is not None for r in rounds):
        return []
    return rounds


def _privacy_table(rows: list[dict[str, Any]]) -> list[str]:
    """Epsilon by round (server-side central DP; largest cumulative hospital epsilon under local DP)."""
    rounds = privacy_rows(rows)
    if not rounds:
        return []
    lines = ["", "Privacy: cumulative epsilon after each round (server-side central DP at privacy-central-delta; "
             "largest hospital's local DP at its delta); declined = hospitals out of budget.", "",
             "| round | epsilon (central) | epsilon (local, max) | declined |", "|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {_fmt(r.get('epsilon-central'), 3)} | {_fmt(r.get('epsilon-local-max'), 3)} "
                     f"| {r.get('declined', 0)} |")
    return lines


TEST_KEYS = ("eval_prompt", "test_resolution", "best_round_test", "best_round_test_by_centre", "constant_mask_baseline")


def test_table_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[test set, Dice, IoU, HD95, images, constant-mask Dice]`` of the best round's test
    report: pooled, then one per centre (the baseline's Dice is None where it was not computed)."""
    test = summary.get("best_round_test") or {}
    if not test:
        return []
    base = summary.get("constant_mask_baseline") or {}
    base_by = base.get("by_centre") or {}
    rows = [["pooled", test, base.get("pooled")]]
    rows += [[c, m, base_by.get(c)] for c, m in sorted((summary.get("best_round_test_by_centre") or {}).items())]
    return [[name, m.get("dice"), m.get("iou"), m.get("hd95"), m.get("n"), (b or {}).get("dice")]
            for name, m, b in rows]


def _test_table(summary: dict[str, Any]) -> list[str]:
    rows = test_table_rows(summary)
    if not rows:
        return []
    base = summary.get("constant_mask_baseline") or {}
    lines = ["", "## Best round's state on the held-out test split", "",
             f"Evaluation prompt: {describe_eval_prompt(summary.get('eval_prompt'))}.",
             f"Constant-mask baseline: the mean mask of the {base.get('fitted_on', '-')}, thresholded at "
             f"{_fmt(base.get('threshold'), 1)} (fitted on training data only).",
             "Metrics at each mask's own resolution (predictions mapped back to the image's size; HD95 in "
             "image pixels)." if summary.get("test_resolution") == "original" else
             "Metrics at the model's input resolution (HD95 in input pixels).", "",
             "| test set | Dice | IoU | HD95 | images | constant-mask Dice |", "|---|---|---|---|---|---|"]
    for name, dice, iou, hd95, n, base_dice in rows:
        lines.append(f"| {name} | {_fmt(dice)} | {_fmt(iou)} | {_fmt(hd95, 2)} | "
                     f"{'-' if n is None else int(n)} | {_fmt(base_dice)} |")
    return lines


def write_report(run_dir: str | Path, rows: list[dict[str, Any]], best_round: int,
                 extra: dict[str, Any] | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Write ``summary.json``, the plots and ``report.md`` into ``run_dir``; return the report's path.

    ``summary`` is :func:`summarize` of the same arguments when the caller already has it.
    """
    run_dir = Path(run_dir)
    summary = summarize(rows, best_round, extra) if summary is None else summary
    (run_dir / SUMMARY_NAME).write_text(json.dumps(_clean(summary), indent=2, sort_keys=True))
    plots = _plot(summary, rows, run_dir)
    g = summary["global"]
    lines = [
        "# Federated run report",
        "",
        f"- Rounds: {len(summary['rounds'])}; best round (global validation Dice): {best_round}",
        f"- Payload per client per round: up {_fmt(summary['bytes_up_per_client_round'])} B, "
        f"down {_fmt(summary['bytes_down_per_client_round'])} B; total {summary['bytes_total']} B",
        f"- Payload in all: {payload_arithmetic(rows)}",
        f"- Mean round time: {_fmt(summary['mean_round_seconds'], 1)} s; dropped replies: {summary['dropped_replies']}",
    ]
    for key, value in (extra or {}).items():
        if key in TEST_KEYS:
            continue
        text = privacy_text(value) if key == "privacy" else (
            _fmt(value) if not isinstance(value, dict) else json.dumps(_clean(value)))
        lines.append(f"- {key}: {text}")
    sources = dice_sources(rows)
    fed_head = [] if sources["same"] else ["federated Dice"]
    global_head = "global Dice (= federated)" if sources["same"] else "global Dice"
    lines += ["", f"{sources['note']} Hospital columns: the global state's Dice on each hospital's validation split.",
              "", f"| round | {global_head} | IoU | HD95 | "
              + " | ".join(fed_head + list(summary["hospital_dice"])) + " |",
              "|---" * (4 + len(fed_head) + len(summary["hospital_dice"])) + "|"]
    for k in g["dice"]:
        per = [_fmt(summary["federated_dice"].get(k))] if fed_head else []
        per += [_fmt(summary["hospital_dice"][h].get(k)) for h in summary["hospital_dice"]]
        lines.append(f"| {k} | {_fmt(g['dice'][k])} | {_fmt(g['iou'][k])} | {_fmt(g['hd95'][k], 2)} | "
                     + " | ".join(per) + " |")
    lines += _test_table(summary)
    lines += _privacy_table(rows)
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    path = run_dir / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
