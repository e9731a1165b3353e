"""``promptsam report RUN_DIR``: regenerate ``report.md`` and ``report.html`` of any run folder.

Works for simulation and deployment runs alike: it reads ``metrics.jsonl`` (required),
``summary.json`` (for the best round and the extras the server added: test Dice, privacy) and the
run config (``run_config.json``, else the ``run_config.toml`` of ``promptsam simulate``, else the
one stored in ``checkpoint.pt``). The overlay grid needs a model checkpoint (default the run's
``best_model.pt``, else ``final_model.pt``) and evaluation data (``--data``, else the run config's
``global-eval`` data); without them the HTML says why instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.argtypes import add_command, non_negative_int


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The run's Flower run config from its run folder; ``{}`` when none is stored."""
    path = run_dir / "run_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    path = run_dir / "run_config.toml"
    if path.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        return tomllib.loads(path.read_text())
    path = run_dir / "checkpoint.pt"
    if path.is_file():
        from server.checkpoint import ResumeError, load_checkpoint

        try:
            return dict(load_checkpoint(path).run_config)
        except ResumeError:
            return {}
    return {}


def _best_round(rows: list[dict[str, Any]]) -> int:
    """The round with the highest global Dice (the first on ties, as the server picks it); -1 if none."""
    best, score = -1, float("-inf")
    for r in sorted((r for r in rows if r["kind"] == "global" and r.get("dice") is not None), key=lambda r: r["round"]):
        if r["dice"] > score:
            best, score = r["round"], r["dice"]
    return best


def _overlays(run_dir: Path, run_config: dict[str, Any], checkpoint: str | None, data: str | None, n: int,
              device: str) -> tuple[list[dict[str, Any]] | None, str, str | None]:
    """``(overlays, source sentence, note when there are none)``."""
    from shared_model.checkpoint import load_model_checkpoint
    from shared_model.config import ConfigError, from_run_config
    from shared_model.data.folder import DataError

    from server.html_report import overlay_examples
    from server.loop import evaluation_sets

    if n <= 0:
        return None, "", "Example predictions were not requested (--overlays 0)."
    if checkpoint:
        path = Path(checkpoint)
        path = path if path.is_file() else run_dir / checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file (also not in {run_dir})")
    else:
        path = next((run_dir / p for p in ("best_model.pt", "final_model.pt") if (run_dir / p).is_file()), None)
        if path is None:
            return None, "", (f"No model checkpoint (best_model.pt / final_model.pt) in {run_dir}: "
                              "no example predictions.")
    try:
        settings = from_run_config(run_config)
    except ConfigError as err:
        if not data:
            return None, "", f"The run config cannot be read ({err}); pass --data for example predictions."
        settings = from_run_config({})
    if data:
        settings.federation.global_eval = str(Path(data).resolve())
    model, _ = load_model_checkpoint(path)
    try:
        eval_set, test_set = evaluation_sets(settings, model.image_size)
    except (DataError, OSError, ConfigError) as err:
        if data:
            raise
        print(f"warning: no example predictions: {err}", file=sys.stderr)
        return None, "", f"The evaluation data could not be read ({err}); pass --data for example predictions."
    dataset = test_set if test_set is not None else eval_set
    if dataset is None:
        return None, "", None
    overlays = overlay_examples(model, dataset, n, device=device)
    kind = "test split" if test_set is not None else "evaluation set"
    return overlays, f"{path.name} on {len(overlays)} of the {len(dataset)} images of the {kind}.", None


def regenerate_report(run_dir: str | Path, checkpoint: str | None = None, data: str | None = None,
                      overlays: int | None = None, device: str = "cpu") -> tuple[Path, Path]:
    """Rewrite ``summary.json``, the plots, ``report.md`` and ``report.html`` of a run folder.

    Args:
        run_dir: The run folder (holding ``metrics.jsonl``).
        checkpoint: Model checkpoint of the overlays (a path, or a file name in ``run_dir``).
        data: Evaluation data of the overlays (a dataset root or one centre's folder).
        overlays: Number of example images (default :data:`server.html_report.OVERLAY_EXAMPLES`).
        device: Device of the overlay predictions.

    Returns:
        ``(report.md, report.html)`` paths.

    Raises:
        FileNotFoundError: The run folder, its ``metrics.jsonl`` or the checkpoint is missing.
        ValueError: ``metrics.jsonl`` holds no rows or a file is not valid JSON.
    """
    from server.html_report import OVERLAY_EXAMPLES, write_reports
    from server.report import METRICS_NAME, SUMMARY_NAME, JsonLines, summarize

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    metrics = run_dir / METRICS_NAME
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no {METRICS_NAME} in the run folder (is {run_dir} a federated run?)")
    try:
        rows = JsonLines(metrics).read()
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics}: not valid JSON lines: {err}") from None
    if not rows:
        raise ValueError(f"{metrics}: empty, the run logged no round")
    summary_path = run_dir / SUMMARY_NAME
    if summary_path.is_file():
        try:
            old = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{summary_path}: not valid JSON: {err}") from None
        best_round = int(old.get("best_round", _best_round(rows)))
        extra = {k: v for k, v in old.items() if k not in summarize([], 0)}
    else:
        best_round = _best_round(rows)
        dice = {r["round"]: r.get("dice") for r in rows if r["kind"] == "global"}
        extra = {"best_dice": dice.get(best_round)}
    run_config = read_run_config(run_dir)
    n = OVERLAY_EXAMPLES if overlays is None else overlays
    grid, source, note = _overlays(run_dir, run_config, checkpoint, data, n, device)
    return write_reports(run_dir, rows, best_round, extra, run_config, grid, overlay_source=source,
                         overlay_note=note)


def cmd_report(args: argparse.Namespace) -> int:
    """Entry point of the ``report`` subcommand."""
    md, html = regenerate_report(args.run_dir, args.checkpoint, args.data, args.overlays, args.device)
    print(f"report: {md}\nreport: {html}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to the ``promptsam`` parser."""
    p = add_command(subparsers, "report", "regenerate report.md and report.html of a federated run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl")
    p.add_argument("--checkpoint", help="model checkpoint of the example predictions "
                   "(default: the run's best_model.pt, else final_model.pt)")
    p.add_argument("--data", help="evaluation data of the example predictions: a dataset root or one centre's "
                   "folder (default: the run config's global-eval data)")
    p.add_argument("--overlays", type=non_negative_int, default=None, metavar="N",
                   help="number of example images (default 6; 0 = none)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=cmd_report)
    return p

