"""The run report as one self-contained HTML file (``report.html``) and the overlays it shows.

Everything is inline: CSS in a ``<style>`` element, every image a base64 ``data:image/png`` URI,
no script and no external link, so the file opens offline and can be archived or mailed alone.
Sections: header (headline numbers), plots, prediction overlays, per-round metrics, payload,
privacy (only when DP was on), dropped/declined replies, and the run configuration.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from server.report import dice_sources, payload_arithmetic, test_table_rows
from shared_model.data.folder import describe_eval_prompt

HTML_REPORT_NAME = "report.html"
OVERLAY_EXAMPLES = 6  # images in the overlay grid (cheap: one batched forward pass)
PANELS = ("image", "ground truth", "saliency", "boxes", "predicted mask")
PANEL_SIZE = 320  # longest side of an embedded panel (shown at ~210 px; keeps the file small at 1024 px)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2733;background:#f4f6f9;margin:0}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
header{background:#17324d;color:#fff;padding:18px 24px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c5d3e2}
nav{margin:10px 0 0}nav a{color:#9fd1ff;margin-right:14px;text-decoration:none}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px;color:#17324d}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#eef3f8;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px;color:#17324d}.card span{font-size:12px;color:#5a6b7d}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e2e7ee;padding:4px 10px;text-align:right;vertical-align:top}
th{background:#eef3f8;font-weight:600}td.l,th.l{text-align:left}
tr.best td{background:#fff7d6}
table.kv td:first-child{font-family:ui-monospace,monospace;color:#30506e}
table.kv td,table.kv th,table.dropped td,table.dropped th{text-align:left}
.groups{display:flex;flex-wrap:wrap;gap:8px 28px;align-items:flex-start}.groups h3{font-size:14px;margin:6px 0 0}
pre{margin:4px 0;font-size:12px;max-height:360px;overflow:auto;background:#f7f9fb;padding:6px}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{width:560px;max-width:100%;border:1px solid #e2e7ee}
table.grid{width:100%;table-layout:fixed}table.grid td,table.grid th{text-align:center;padding:4px}
table.grid img{width:100%;max-width:210px;image-rendering:auto;border-radius:4px}
figure{margin:0}figcaption{font-size:12px;color:#5a6b7d;overflow-wrap:anywhere}
.note{color:#5a6b7d}
figure.cbar{width:300px;margin:4px 0 10px}figure.cbar img{width:300px;height:14px;display:block;border:1px solid #ccd}
.ticks{position:relative;height:16px;font-size:11px;color:#5a6b7d}
.ticks span{position:absolute;transform:translateX(-50%)}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number for a table cell: '-' for missing or non-finite values, thousands separators for ints."""
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return _e(value)


def _val(value: Any) -> str:
    """A config value as text: JSON spelling for booleans, null and containers, else ``str``."""
    return _e(value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else json.dumps(value))


def png_bytes(image: Any, max_size: int | None = None) -> bytes:
    """PNG encoding of a PIL image or an H x W (x 3) uint8 array, shrunk to ``max_size`` if given."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if max_size and max(pil.size) > max_size:
        pil = pil.copy()
        pil.thumbnail((max_size, max_size), Image.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def overlay_examples(model: Any, dataset: Any, n: int = OVERLAY_EXAMPLES, device: str = "cpu",
                     threshold: float = 0.5) -> list[dict[str, Any]]:
    """Predict ``n`` evaluation images and draw the report's panels for each.

    The images are ``n`` evenly spaced items of ``dataset`` (the first and the last included), so
    that every centre of a pooled, centre-sorted set shows up; the choice is deterministic.

    Args:
        model: A PromptSAM holding the state to show.
        dataset: A :class:`shared_model.data.folder.PolypDataset` (items: ``image`` 3 x S x S in
            [0, 1], ``mask`` 1 x S x S, ``text``, ``stem``, ``centre``).
        n: Number of images (at most ``len(dataset)``).
        device: Device of the forward pass (``"auto"``: CUDA when present).
        threshold: Probability threshold of the predicted mask.

    Returns:
        One dict per image: ``stem``, ``centre``, ``text``, ``dice`` and ``panels`` (panel name
        of :data:`PANELS` -> PNG bytes).
    """
    import torch

    from shared_model.inference import panels, predict_images
    from shared_model.training.metrics import segmentation_metrics

    count = min(n, len(dataset))
    if count <= 0:
        return []
    indices = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, count)})
    items = [dataset[i] for i in indices]
    images = [(item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for item in items]
    truths = [item["mask"][0].numpy() > 0.5 for item in items]
    was_training = model.training
    preds = predict_images(model, images, [item["text"] for item in items], threshold=threshold, device=device)
    model.train(was_training)
    out = []
    for item, image, truth, pred in zip(items, images, truths, preds):
        dice = segmentation_metrics(torch.from_numpy(pred.mask)[None], torch.from_numpy(truth)[None])[0]["dice"]
        out.append({"stem": item["stem"], "centre": item["centre"], "text": item["text"], "dice": float(dice),
                    "panels": {name: png_bytes(p, PANEL_SIZE) for name, p in panels(image, pred, truth).items()}})
    return out


def _table(head: Sequence[str], body: list[list[str]], cls: str = "") -> str:
    """A table from pre-escaped cells; the first column is left-aligned."""
    ths = "".join(f'<th class="l">{h}</th>' if i == 0 else f"<th>{h}</th>" for i, h in enumerate(head))
    rows = "".join("<tr>" + "".join(f'<td class="l">{c}</td>' if i == 0 else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{rows}</tbody></table>'


def _header(name: str, summary: dict[str, Any]) -> str:
    test = summary.get("best_round_test") or {}
    best = summary.get("best_round")
    cards = [("rounds", _num(len(summary.get("rounds", [])))),
             ("best round", _num(best if best is not None and best >= 0 else None)),
             ("best validation Dice", _num(summary.get("best_dice"))),
             ("test Dice (best round)", _num(test.get("dice"))),
             ("payload up / client / round", f"{_num(summary.get('bytes_up_per_client_round'))} B"),
             ("total bytes", _num(summary.get("bytes_total"))),
             ("mean round time", f"{_num(summary.get('mean_round_seconds'), 1)} s"),
             ("dropped replies", _num(summary.get("dropped_replies")))]
    out = '<div class="cards">' + "".join(f'<div class="card"><b>{v}</b><span>{_e(k)}</span></div>'
                                          for k, v in cards) + "</div>"
    if summary.get("payload_arithmetic"):
        out += f'<p class="note arith">Payload: {_e(summary["payload_arithmetic"])}.</p>'

    if test:
        def cells(name: str, dice: Any, iou: Any, hd95: Any, n: Any, base: Any) -> list[str]:
            return [_e(name), _num(dice), _num(iou), _num(hd95, 2),
                    _num(int(n) if isinstance(n, float) and math.isfinite(n) else n), _num(base)]

        body = [cells(*row) for row in test_table_rows(summary)]
        fitted = (summary.get("constant_mask_baseline") or {}).get("fitted_on")
        base_note = (f" Constant mask: the mean mask of the {_e(fitted)}, thresholded (fitted on training data "
                     "only)." if fitted else " Constant mask: not computed for this run.")
        out += (f"<p>Best round's state on the held-out test split. Evaluation prompt: "
                f"{_e(describe_eval_prompt(summary.get('eval_prompt')))}.{base_note}</p>"
                + _table(["test set", "Dice", "IoU", "HD95", "images", "constant-mask Dice"], body, "test"))
    return f'<section id="summary"><h2>Summary</h2>{out}</section>'


def _config(run_config: dict[str, Any]) -> str:
    if not run_config:
        return ('<section id="config"><h2>Configuration</h2><p class="note">No run configuration was found '
                "in the run folder (run_config.json).</p></section>")
    groups: dict[str, list[list[str]]] = {}
    for key, value in run_config.items():
        parsed = None
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
        if isinstance(parsed, dict):
            group = "model, train and data"
            cell = (f"<details><summary>{len(parsed)} field{'s' if len(parsed) != 1 else ''} (JSON)</summary>"
                    f"<pre>{_e(json.dumps(parsed, indent=2, sort_keys=True))}</pre></details>")
        else:
            group = next((g for g in ("partition", "privacy") if key.startswith(g + "-")), "federation")
            cell = _val(value)
        groups.setdefault(group, []).append([_e(key), cell])
    if "privacy" in groups:
        groups["privacy"] = _privacy_config(groups["privacy"])
    tables = "".join(f"<div><h3>{_e(g)}</h3>{_table(['key', 'value'], body, 'kv')}</div>" for g, body in groups.items())
    return ('<section id="config"><h2>Configuration</h2><p class="note">The Flower run config of the run '
            f'(kebab-case keys).</p><div class="groups">{tables}</div></section>')


_PRIVACY_SWITCHES = {"privacy-central-dp": ("privacy-central-", "privacy-adaptive-"),
                     "privacy-secagg": ("privacy-secagg-",)}  # local DP (privacy-local-dp) owns the rest


def _privacy_config(body: list[list[str]]) -> list[list[str]]:
    """The privacy rows of the configuration: a switch that is off reads "off" and hides its settings.

    ``body`` holds escaped ``[key, value]`` cells of the ``privacy-*`` keys.
    """
    def switch(key: str) -> str:
        if key in _PRIVACY_SWITCHES:
            return key
        return next((k for k, prefixes in _PRIVACY_SWITCHES.items() if key.startswith(prefixes)), "privacy-local-dp")

    values = {html.unescape(k): v for k, v in body}
    off = {key for key in ("privacy-local-dp", *_PRIVACY_SWITCHES) if values.get(key) in ("false", "off")}
    out = []
    for key, value in body:
        plain = html.unescape(key)
        if plain in off:
            out.append([key, "off"])
        elif switch(plain) not in off:
            out.append([key, value])
    return out


def _rounds(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    glob = {r["round"]: r for r in rows if r["kind"] == "global"}
    fed = {r["round"]: r for r in rows if r["kind"] == "round"}
    hospitals = list(summary.get("hospital_dice", {}))
    val: dict[str, dict[int, Any]] = {}
    for r in rows:
        if r["kind"] == "train" and r.get("accepted") and "val-dice" in r:
            val.setdefault(str(r.get("hospital")), {})[r["round"]] = r.get("val-dice")
    trained = sorted(val)
    best = summary.get("best_round")
    sources = dice_sources(rows)
    mean = [] if sources["same"] else ["<th>mean</th>"]
    head1 = ('<tr><th class="l" rowspan="2">round</th><th colspan="3">global (server)</th>'
             + (f'<th colspan="{len(mean) + len(hospitals)}">federated evaluation Dice</th>'
                if mean or hospitals else "")
             + (f'<th colspan="{len(trained)}">train replies: local val-Dice</th>' if trained else "") + "</tr>")
    head2 = ("<tr><th>" + ("Dice (= federated mean)" if sources["same"] else "Dice") + "</th><th>IoU</th>"
             "<th>HD95</th>" + "".join(mean) + "".join(f"<th>{_e(h)}</th>" for h in hospitals + trained) + "</tr>")
    body = []
    for k in sorted(set(glob) | set(fed)):
        g, f = glob.get(k, {}), fed.get(k, {})
        cells = [_num(g.get("dice")), _num(g.get("iou")), _num(g.get("hd95"), 2)]
        cells += [_num(f.get("dice"))] if mean else []
        cells += [_num(summary["hospital_dice"][h].get(str(k))) for h in hospitals]
        cells += [_num(val[h].get(k)) for h in trained]
        cls = ' class="best"' if k == best else ""
        body.append(f'<tr{cls}><td class="l">{k}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ('<section id="rounds"><h2>Dice by round</h2><p class="note dice-sources">'
            f"{_e(sources['note'])} Hospital columns: the global state's Dice on each hospital's validation "
            "split; train replies: the hospital's locally trained state on it. Highlighted: the best round.</p>"
            f'<table class="rounds"><thead>{head1}{head2}</thead><tbody>{"".join(body)}</tbody></table></section>')


def _payload(rows: list[dict[str, Any]]) -> str:
    body = [[str(r["round"]), _num(r.get("accepted")), _num(r.get("dropped")), _num(r.get("bytes-up")),
             _num(r.get("bytes-down")), _num(r.get("seconds"), 1)]
            for r in sorted((r for r in rows if r["kind"] == "round"), key=lambda r: r["round"])]
    return ('<section id="payload"><h2>Payload and time by round</h2><p class="note">Bytes of the exchanged '
            "state: up = clients to server (deltas), down = server to clients (train and evaluate).</p>"
            f'<p class="arith">{_e(payload_arithmetic(rows))}.</p>'
            + _table(["round", "accepted", "dropped", "bytes up", "bytes down", "seconds"], body, "payload")
            + "</section>")


def _privacy(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    from server.report import privacy_rows

    dp = privacy_rows(rows)
    if not dp:
        return ""
    body = [[str(r["round"]), _num(r.get("epsilon-central"), 3), _num(r.get("epsilon-local-max"), 3),
             _num(r.get("declined", 0))] for r in dp]
    settings = summary.get("privacy") or {}
    shown = [[_e(k), "off" if v is False else _val(v)] for k, v in settings.items()
             if v not in (None, {}, [])]  # only what applies: no delta of a DP that is off
    kv = _table(["setting", "value"], shown, "kv") if shown else ""
    return ('<section id="privacy"><h2>Privacy</h2><p class="note">Cumulative epsilon after each round: '
            "server-side central DP (at privacy-central-delta) and the largest hospital's local DP (at its "
            "delta); declined = hospitals out of budget.</p>"
            + _table(["round", "epsilon (central)", "epsilon (local, max)", "declined"], body, "epsilon")
            + kv + "</section>")


def _dropped(rows: list[dict[str, Any]]) -> str:
    bad = [r for r in rows if r["kind"] in ("train", "evaluate") and not r.get("accepted", True)]
    if not bad:
        return ('<section id="dropped"><h2>Dropped replies</h2>'
                '<p class="note">None: every reply was accepted.</p></section>')
    body = [[str(r["round"]), _e(r["kind"]), _e(r.get("hospital", "-")), _e(r.get("node-id", "-")),
             _e(r.get("drop") or "-"), _e(r.get("reason") or "-")] for r in bad]
    return ('<section id="dropped"><h2>Dropped and declined replies</h2>'
            '<p class="note">why: timeout = no reply before the deadline (reply-timeout), error = the hospital '
            'failed or went away, declined = its local-DP budget is spent, invalid = the reply failed '
            'validation.</p>'
            + _table(["round", "phase", "hospital", "node", "why", "reason"], body, "dropped") + "</section>")


def _grid(overlays: list[dict[str, Any]] | None, source: str, note: str | None) -> str:
    if not overlays:
        text = note or ("The server had no evaluation data (global-eval = none, as usual in deployment), "
                        "so there are no example predictions.")
        return f'<section id="examples"><h2>Example predictions</h2><p class="note">{_e(text)}</p></section>'
    head = "".join(f"<th>{_e(p)}</th>" for p in PANELS)
    body = []
    for ex in overlays:
        captions = {"image": f"{ex['centre']} · {ex['stem']}", "ground truth": ex.get("text", ""),
                    "predicted mask": f"Dice {_num(ex.get('dice'), 3)}"}
        cells = "".join(f"<td><figure>{_img(ex['panels'][p], p)}<figcaption>{_e(captions.get(p, ''))}"
                        "</figcaption></figure></td>" if p in ex["panels"] else "<td></td>" for p in PANELS)
        body.append(f"<tr>{cells}</tr>")
    legend = ("Ground truth yellow; saliency = the M2IB saliency heatmap (before the CRF refinement the boxes "
              "come from), normalised per image; boxes = the box prompts (cyan); predicted mask green with the "
              "ground-truth outline.")
    return (f'<section id="examples"><h2>Example predictions</h2><p class="note">{_e(source)} {_e(legend)}</p>'
            f"{_colour_bar()}"
            f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></section>')


def _colour_bar() -> str:
    """The saliency panels' colour bar: 'jet' from the image's least (0) to its most (1) salient pixel."""
    from shared_model.inference import colour_bar

    ticks = "".join(f'<span style="left:{100 * v:.0f}%">{v:g}</span>' for v in (0, 0.25, 0.5, 0.75, 1))
    return (f'<figure class="cbar">{_img(png_bytes(colour_bar(256, 12)), "saliency colour bar")}'
            f'<div class="ticks">{ticks}</div><figcaption>saliency, normalised per image: 0 = the image\'s '
            "least salient pixel, 1 = its most salient</figcaption></figure>")


def _plots(run_dir: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    from server.report import _plot

    names = ("dice.png", "bytes.png")
    if not all((run_dir / n).is_file() for n in names):
        _plot(summary, rows, run_dir)
    imgs = "".join(_img((run_dir / n).read_bytes(), n) for n in names)
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{imgs}</div></section>'


def write_html_report(run_dir: str | Path, rows: list[dict[str, Any]], summary: dict[str, Any],
                      run_config: dict[str, Any], overlays: list[dict[str, Any]] | None, *,
                      overlay_source: str = "", overlay_note: str | None = None) -> Path:
    """Write ``report.html`` into ``run_dir`` (next to ``report.md``) and return its path.

    Args:
        run_dir: The run folder; its ``dice.png`` / ``bytes.png`` are embedded (drawn if missing).
        rows: The rows of ``metrics.jsonl``.
        summary: :func:`server.report.summarize` of the rows (with the run's extras).
        run_config: The Flower run config (kebab-case keys); JSON values are shown folded.
        overlays: :func:`overlay_examples` output, or None when there was no evaluation data.
        overlay_source: One sentence saying which state and data set the overlays show.
        overlay_note: Shown instead of the grid when ``overlays`` is empty (default: no evaluation data).
    """
    run_dir = Path(run_dir)
    name = run_dir.resolve().name
    sections = [_header(name, summary), _plots(run_dir, rows, summary), _grid(overlays, overlay_source, overlay_note),
                _rounds(rows, summary), _payload(rows), _privacy(rows, summary), _dropped(rows), _config(run_config)]
    links = [("summary", "Summary"), ("plots", "Plots"), ("examples", "Examples"), ("rounds", "Rounds"),
             ("payload", "Payload"), ("privacy", "Privacy"), ("dropped", "Dropped replies"),
             ("config", "Configuration")]
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in links if f'id="{a}"' in "".join(sections))
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Run report: {_e(name)}</title>'
           f"<style>{_CSS}</style></head><body><header><h1>Federated run report: {_e(name)}</h1>"
           f"<p>Generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))} from {_e(run_dir.resolve())}</p><nav>{nav}</nav>"
           f"</header><main>{''.join(sections)}</main></body></html>\n")
    path = run_dir / HTML_REPORT_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path


def write_reports(run_dir: str | Path, rows: list[dict[str, Any]], best_round: int, extra: dict[str, Any],
                  run_config: dict[str, Any], overlays: list[dict[str, Any]] | None, *,
                  overlay_source: str = "", overlay_note: str | None = None) -> tuple[Path, Path]:
    """Both reports of a run from one summary: ``report.md`` (+ ``summary.json``, plots) and ``report.html``."""
    from server.report import summarize, write_report

    summary = summarize(rows, best_round, extra)
    md = write_report(run_dir, rows, best_round, extra, summary)
    html = write_html_report(run_dir, rows, summary, run_config, overlays, overlay_source=overlay_source,
                             overlay_note=overlay_note)
    return md, html
